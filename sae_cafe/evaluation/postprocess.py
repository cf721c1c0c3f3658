"""The one post-processing of saliency maps per metric, applied identically to every method.

Maps from every method arrive as ``maps_NHW`` (signed, at input resolution). Each metric then sees them
through exactly one of the transforms below, so no method gets a friendlier normalisation than another.
Which transform a metric uses depends on the definition set (:mod:`.definitions`):

* ``"raw"``       – the map as the method returned it.
* ``"signed"``    – the raw signed map divided by its max |value| (Quantus ``normalise_by_max``; a positive
  rescaling: it changes nothing for rank-based metrics and keeps values comparable across methods).
* ``"abs"``       – |map| divided by its max (Quantus ``abs=True, normalise=True``).
* ``"positive"``  – positive part divided by its maximum (min–max of the positive part, since its min is 0);
  an all-non-positive map becomes all zeros (paper protocol, method_spec §5.2, gap G13 proposal).
* ``"signed_positive"`` – positive part of the ``"signed"`` map, i.e. a⁺ / max|a| (Quantus
  ``normalise=True, positive_attributions=True``).
"""

from __future__ import annotations

import torch

POSTPROCESS_NAMES = ("raw", "signed", "abs", "positive", "signed_positive")

#: metric name → post-processing of the paper protocol (method_spec §5.2), kept under its old name.
METRIC_POSTPROCESS: dict[str, str] = {
    "pointing": "signed",
    "localisation": "positive",
    "sparseness": "positive",
    "fidelity": "signed",
    "stability": "positive",
    "insertion": "signed",
    "deletion": "signed",
}

#: metric name → post-processing of the source definitions (each metric as its paper / Quantus defines it).
SOURCE_POSTPROCESS: dict[str, str] = {
    "pointing": "raw",
    "localisation": "signed_positive",
    "sparseness": "abs",
    "fidelity": "signed",
    "stability": "raw",
    "insertion": "raw",
    "deletion": "raw",
}

#: definition set → {metric → post-processing}
POSTPROCESS_BY_DEFINITIONS: dict[str, dict[str, str]] = {"source": SOURCE_POSTPROCESS, "paper": METRIC_POSTPROCESS}


def _per_map_max(maps_NHW: torch.Tensor) -> torch.Tensor:
    return maps_NHW.flatten(1).amax(1).view(-1, *([1] * (maps_NHW.ndim - 1)))


def signed_maxabs(maps_NHW: torch.Tensor) -> torch.Tensor:
    """Divide each map by its max |value| (zero maps stay zero). (N,H,W) → (N,H,W) in [-1, 1]."""
    m = _per_map_max(maps_NHW.abs())
    return maps_NHW / torch.where(m > 0, m, torch.ones_like(m))


def positive_minmax(maps_NHW: torch.Tensor) -> torch.Tensor:
    """Positive part divided by its max. (N,H,W) → (N,H,W) in [0, 1]; non-positive maps → zeros."""
    pos = maps_NHW.clamp(min=0)
    m = _per_map_max(pos)
    return pos / torch.where(m > 0, m, torch.ones_like(m))


def postprocess(maps_NHW: torch.Tensor, how: str) -> torch.Tensor:
    """Apply the named post-processing (one of :data:`POSTPROCESS_NAMES`) to (N,H,W) maps."""
    if how == "raw":
        return maps_NHW
    if how == "signed":
        return signed_maxabs(maps_NHW)
    if how == "abs":
        return signed_maxabs(maps_NHW.abs())
    if how == "positive":
        return positive_minmax(maps_NHW)
    if how == "signed_positive":
        return signed_maxabs(maps_NHW).clamp(min=0)
    raise ValueError(f"unknown post-processing {how!r}; expected one of {POSTPROCESS_NAMES}")


def for_metric(maps_NHW: torch.Tensor, metric: str, definitions: str = "source") -> torch.Tensor:
    """The post-processing that ``metric`` uses under the definition set ``definitions``."""
    if definitions not in POSTPROCESS_BY_DEFINITIONS:
        raise ValueError(f"unknown definition set {definitions!r}; expected one of {tuple(POSTPROCESS_BY_DEFINITIONS)}")
    return postprocess(maps_NHW.float(), POSTPROCESS_BY_DEFINITIONS[definitions][metric])
