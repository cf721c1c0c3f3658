"""The one post-processing of saliency maps per metric, applied identically to every method.

Maps from every method arrive as ``maps_NHW`` (signed, at input resolution). Each metric then sees them
through exactly one of the transforms below (``METRIC_POSTPROCESS``), so no method gets a friendlier
normalisation than another (method_spec §5.2, gap G13 proposal):

* ``"signed"``   – the raw signed map, divided by its max |value| (a positive rescaling: it changes
  nothing for rank-based metrics — pointing game, μ-fidelity (Spearman), insertion/deletion — and keeps
  values comparable across methods).
* ``"positive"`` – positive part, divided by its maximum (min–max of the positive part, since its min is 0);
  an all-non-positive map becomes all zeros. Used for localisation, sparseness and stability.
"""

from __future__ import annotations

import torch

POSTPROCESS_NAMES = ("signed", "positive")

#: metric name → post-processing applied to every method's maps before that metric.
METRIC_POSTPROCESS: dict[str, str] = {
    "pointing": "signed",
    "localisation": "positive",
    "sparseness": "positive",
    "fidelity": "signed",
    "stability": "positive",
    "insertion": "signed",
    "deletion": "signed",
}


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
    """Apply the named post-processing (``"signed"`` or ``"positive"``) to (N,H,W) maps."""
    if how == "signed":
        return signed_maxabs(maps_NHW)
    if how == "positive":
        return positive_minmax(maps_NHW)
    raise ValueError(f"unknown post-processing {how!r}; expected one of {POSTPROCESS_NAMES}")


def for_metric(maps_NHW: torch.Tensor, metric: str) -> torch.Tensor:
    """The post-processing that ``metric`` uses (see :data:`METRIC_POSTPROCESS`)."""
    return postprocess(maps_NHW.float(), METRIC_POSTPROCESS[metric])
