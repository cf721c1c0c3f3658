"""The two metric definition sets of the saliency benchmark (docs/metrics.md).

* ``"source"`` (default): every metric as its source paper defines it, with Quantus's reading where Quantus
  implements it (checked equal in ``tests/test_metrics.py``):
  pointing game on the raw map, 15 px tolerance at 224 scaled by H/224, tied maxima counted fractionally, a
  constant map a miss; attribution localisation on a⁺ / max|a| (Kohlbrenner et al. 2020: positive relevance;
  Quantus ``AttributionLocalisation(abs=False, positive_attributions=True)``); sparseness = Gini index of
  |a| (Chalasani et al. 2020; Quantus ``Sparseness`` defaults); μ-fidelity with the Pearson correlation
  (Bhatt et al. 2020) on the 9×9 grid subsets; stability = mean relative Frobenius change of the raw map
  under U(0, r) noise (Quantus ``AvgSensitivity`` defaults except 20 samples and r = 0.1); insertion onto a
  blurred copy and deletion to the baseline (Petsiuk et al. 2018), ≥ 16 steps.
* ``"paper"``: the post-processing of method_spec §5.2 (the authors' fork): signed max-|a| maps for pointing,
  μ-fidelity (Spearman) and insertion/deletion (10 steps, both to the baseline), positive part min–max
  for localisation, sparseness and stability.

Both sets count tied maxima of the pointing game fractionally and score a constant map as a miss (the fork's
Quantus copy counted any tied maximum, which makes an all-zero map a hit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .postprocess import POSTPROCESS_BY_DEFINITIONS


@dataclass(frozen=True)
class Definitions:
    """One definition set: per-metric post-processing, μ-fidelity correlation, insertion substrate
    (``"blur"``: a Gaussian-blurred copy of the image; ``"baseline"``: the constant baseline) and the
    default / minimum number of insertion-deletion steps."""

    name: str
    postprocess: dict[str, str] = field(default_factory=dict)
    fidelity_correlation: str = "pearson"
    insertion_substrate: str = "blur"
    default_steps: int = 16
    min_steps: int = 16
    description: str = ""


DEFINITIONS: dict[str, Definitions] = {
    "source": Definitions(
        "source", POSTPROCESS_BY_DEFINITIONS["source"], "pearson", "blur", 16, 16,
        "each metric as its source defines it: pointing game on the raw map (fractional ties, constant map a "
        "miss); localisation of a+ (Kohlbrenner et al.); Gini of |a| (Chalasani et al.); mu-fidelity with "
        "Pearson (Bhatt et al.); stability of the raw map (Quantus AvgSensitivity); insertion onto a blurred "
        "copy, deletion to the baseline (Petsiuk et al.)"),
    "paper": Definitions(
        "paper", POSTPROCESS_BY_DEFINITIONS["paper"], "spearman", "baseline", 10, 1,
        "method_spec 5.2 post-processing: signed max-|a| maps for pointing, mu-fidelity (Spearman) and "
        "insertion/deletion (both to the baseline); positive part min-max for localisation, sparseness and "
        "stability"),
}


def get_definitions(name: str) -> Definitions:
    """The definition set ``name`` (``"source"`` or ``"paper"``); ValueError naming the valid ones."""
    if name not in DEFINITIONS:
        raise ValueError(f"unknown metric definition set {name!r}; expected one of {tuple(DEFINITIONS)}")
    return DEFINITIONS[name]
