"""Named concepts: a latent's label from where its evidence maps put their mass on per-pixel attribute maps.

Input: a latent's evidence maps over its top exemplars ``maps_EHW`` (iERF, upsampled activation map, input
gradient, optimised mask … any non-negative-meaningful map; negative values are clipped) and per-pixel
attribute maps ``{attribute: (N, H, W) int, -1 = n/a}`` (the concept world's ``World.attribute_maps()``:
shape / colour / pattern / background). Per exemplar e and (attribute a, value v) the *share*
``s_e(a, v)`` is the fraction of the map's positive mass on pixels where a = v
(:func:`sae_cafe.cafe.metrics.attribute_mass`, the function CAFE's purity uses).

Rule (fixed before any accuracy was measured):

* ``m(a, v)`` = mean of ``s_e(a, v)`` over the exemplars with positive mass (0 where a = v is absent);
* the label is the (a, v) with the largest ``m`` (ties: the first in sorted (attribute, value) order);
* **raw confidence** = ``m(winner) − m(runner-up)``, the runner-up being the best other (a, v) — in [0, 1].
  Shape, colour and pattern of one object cover the same pixels, so one exemplar cannot tell them apart;
  the margin is large only when the exemplars agree on the winner *and* disagree on the alternatives
  (a "red" latent firing on red objects of several shapes). A latent that only ever fires on red circles
  gets margin ≈ 0: its evidence cannot say whether it is "red" or "circle", and the confidence says so.
* ``agreement`` (shown, not used in the confidence) = share of exemplars whose own best (a, v) is the winner
  (ties count as agreeing).
* **calibrated confidence**: the raw confidence mapped through the binned table
  ``sae_cafe/concepts/calibration.json`` (label accuracy per raw-confidence bin against counterfactual
  ground truth, per evidence type; written by the label-accuracy benchmark). Without that file, or without
  a table for the evidence type, ``confidence = raw_confidence`` and ``calibration = "uncalibrated"``. A bin
  without samples uses its nearest non-empty lower neighbour, and the label's ``calibration`` says so
  (:meth:`Calibration.apply`).

Hand-written: the rule is this project's definition; the mass shares reuse ``cafe.metrics.attribute_mass``.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..errors import ArtifactError, SaeCafeError
from ..world import vocab as V

#: identifier of the raw-confidence formula (calibration tables name the formula they were fitted to)
RAW_CONFIDENCE = "margin-v1"
RAW_CONFIDENCE_DOC = ("m(winner) - m(runner-up), m(a, v) = mean over exemplars of the share of the positive "
                      "evidence mass on pixels with attribute a = v")
UNCALIBRATED = "uncalibrated"
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
LABELS_FILE = "labels.json"
LABELS_SCHEMA = 1
#: readable value names of the concept world's attributes
WORLD_VALUES: dict[str, tuple[str, ...]] = {"shape": V.SHAPES, "colour": V.COLOURS, "pattern": V.PATTERNS,
                                            "background": V.BACKGROUNDS}

Share = dict[tuple[str, int], float]


def value_name(attribute: str, value: int, names: Mapping[str, Sequence[str]] | None = None) -> str:
    """Readable name of ``attribute = value``: "stripes", "red", "circle", "grass background", "solid pattern";
    ``names`` maps an attribute to its value names (default: the concept world's vocabulary); an attribute
    without names reads ``"<attribute>=<value>"``."""
    if names is None:
        return _world_value_name(attribute, int(value))
    return _value_name(attribute, value, names)


@functools.lru_cache(maxsize=4096)
def _world_value_name(attribute: str, value: int) -> str:
    return _value_name(attribute, value, WORLD_VALUES)


def _value_name(attribute: str, value: int, table: Mapping[str, Sequence[str]]) -> str:
    vals = table.get(attribute)
    if vals is None or not 0 <= int(value) < len(vals):
        return f"{attribute}={int(value)}"
    v = str(vals[int(value)])
    if attribute == "background":
        return f"{v} background"
    if attribute == "pattern" and v == "solid":
        return "solid pattern"
    return v


@dataclass(frozen=True)
class ConceptLabel:
    """A latent's named concept with its confidence and evidence.

    Attributes:
        latent: latent id (-1 when not tied to one). name: readable label ("" when unlabelled).
        attribute, value: the winning attribute and value id (None when unlabelled).
        raw_confidence: ``m(winner) − m(runner-up)`` (see the module docstring), in [0, 1].
        confidence: calibrated confidence (= raw when ``calibration == "uncalibrated"``).
        calibration: "uncalibrated" or "calibration.json:<evidence>" (the table used; followed by
            "(calibrated by the [a, b] bin: the [c, d] bin has no samples)" when the raw value's bin is empty).
        evidence: the map type the label was made from ("ierf", "act", "gradient", "mask", "dissection", …).
        share, runner_up, runner_up_share: ``m(winner)``, the runner-up's name and ``m(runner-up)``.
        agreement: share of exemplars whose own best (attribute, value) is the winner.
        n_exemplars: exemplars with positive evidence mass that the label is made from.
        masses: per attribute ``{value name: m(a, v)}`` (the evidence behind the label).
        note: why a latent is unlabelled, or other remarks.
    """

    latent: int
    name: str
    attribute: str | None
    value: int | None
    raw_confidence: float
    confidence: float
    calibration: str
    evidence: str
    share: float = 0.0
    runner_up: str | None = None
    runner_up_share: float = 0.0
    agreement: float = 0.0
    n_exemplars: int = 0
    masses: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""

    @property
    def labelled(self) -> bool:
        return self.attribute is not None

    def to_json(self) -> dict:
        # by hand: dataclasses.asdict deep-copies and is ~20× slower (labels.json of thousands of latents)
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["masses"] = {a: dict(v) for a, v in self.masses.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> ConceptLabel:
        try:
            kw = {k: d[k] for k in ("latent", "name", "attribute", "value", "raw_confidence", "confidence",
                                    "calibration", "evidence")}
        except KeyError as e:
            raise ArtifactError(f"concept label JSON lacks field {e}; rebuild the labels") from e
        opt = {k: d[k] for k in ("share", "runner_up", "runner_up_share", "agreement", "n_exemplars", "note")
               if k in d}
        masses = {str(a): {str(n): float(x) for n, x in vs.items()} for a, vs in (d.get("masses") or {}).items()}
        return cls(**kw, **opt, masses=masses)


def unlabelled(latent: int, evidence: str, note: str) -> ConceptLabel:
    return ConceptLabel(int(latent), "", None, None, 0.0, 0.0, UNCALIBRATED, evidence, note=note)


# ----- calibration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Binned map raw confidence → label accuracy, per evidence type.

    ``tables[evidence] = (edges, accuracy, n)``: bin i holds raw confidences in ``[edges[i], edges[i+1])``
    (the last bin includes its right edge); ``accuracy[i]`` the measured label accuracy there, ``n[i]`` its
    count. File format (``calibration.json``)::

        {"schema": 1, "raw_confidence": "margin-v1", "source": "<what measured it>",
         "evidence": {"ierf": {"edges": [0, 0.1, ..., 1], "accuracy": [...], "n": [...]}, "act": {...}}}
    """

    tables: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]]
    source: str = ""
    path: str = ""

    def apply(self, raw: float, evidence: str) -> tuple[float, str]:
        """(confidence, calibration tag) of a raw confidence; raw and "uncalibrated" without a table.

        A bin without samples takes the calibration of its nearest non-empty lower neighbour (the lowest bins,
        when empty, of the nearest non-empty upper one), said in the tag: ``"calibration.json:ierf (calibrated
        by the [0.3, 0.5] bin: the [0.5, 1] bin has no samples)"`` — the same result as the table with that
        bin merged into its neighbour (:func:`merge_empty_bins`, what the benchmark writes). Raw and
        ``"uncalibrated (no calibration bin has samples)"`` when every bin is empty."""
        t = self.tables.get(evidence)
        if t is None:
            return raw, UNCALIBRATED
        edges, acc, n = t
        i = min(max(bisect.bisect_right(edges, raw) - 1, 0), len(acc) - 1)
        j = filled_bin(acc, n, i)
        if j is None:
            return raw, f"{UNCALIBRATED} (no calibration bin has samples)"
        tag = f"calibration.json:{evidence}"
        if j != i:
            tag += f" (calibrated by the {_bin(edges, j)} bin: the {_bin(edges, i)} bin has no samples)"
        return float(acc[j]), tag


def _filled(acc: Sequence[float | None], n: Sequence[int], i: int) -> bool:
    return n[i] > 0 and acc[i] is not None and math.isfinite(acc[i])


def _bin(edges: Sequence[float], i: int) -> str:
    return f"[{edges[i]:g}, {edges[i + 1]:g}]"


def filled_bin(acc: Sequence[float | None], n: Sequence[int], i: int) -> int | None:
    """The bin whose calibration bin ``i`` uses: ``i`` when it has samples (n > 0, finite accuracy), else the
    nearest such bin below it, else (``i`` below every filled bin) the nearest above; None when all are empty."""
    for j in [*range(i, -1, -1), *range(i + 1, len(n))]:
        if _filled(acc, n, j):
            return j
    return None


def merge_empty_bins(edges: Sequence[float], acc: Sequence[float | None],
                     n: Sequence[int]) -> tuple[list[float], list[float | None], list[int]]:
    """A calibration table without empty bins: each bin with no samples joins its lower neighbour (empty bins
    below every filled one join the first filled bin above). Exact: a merged bin holds the same samples, so
    its accuracy is unchanged, and ``Calibration.apply`` gives the same confidence for every raw value with
    either table. A table with no filled bin is returned unchanged."""
    if not len(edges) == len(acc) + 1 == len(n) + 1:
        raise SaeCafeError(f"a calibration table needs B+1 edges, B accuracies and B counts; got {len(edges)}, "
                           f"{len(acc)}, {len(n)}")
    keep = [i for i in range(len(n)) if _filled(acc, n, i)]
    if not keep:
        return list(edges), list(acc), list(n)
    # bin keep[k] now spans from its own lower edge (the table's lowest edge for the first) to the next kept
    # bin's lower edge (the table's highest edge for the last)
    lower = [edges[0], *(edges[i] for i in keep[1:])]
    return [*map(float, lower), float(edges[-1])], [acc[i] for i in keep], [int(n[i]) for i in keep]


def parse_calibration(data: Mapping, where: str = "calibration.json") -> Calibration:
    """Check and read a calibration table (format: :class:`Calibration`)."""
    if data.get("raw_confidence") != RAW_CONFIDENCE:
        raise ArtifactError(f"{where} was fitted to raw confidence {data.get('raw_confidence')!r}, this version "
                            f"computes {RAW_CONFIDENCE!r}; rerun the label-accuracy benchmark to refit it")
    tables = {}
    for ev, t in (data.get("evidence") or {}).items():
        edges, acc, n = (tuple(t.get(k, ())) for k in ("edges", "accuracy", "n"))
        if len(edges) != len(acc) + 1 or len(n) != len(acc) or list(edges) != sorted(edges) or not acc:
            raise ArtifactError(f"{where}: table {ev!r} needs sorted edges (B+1), accuracy (B) and n (B) with "
                                f"B >= 1, got {len(edges)}, {len(acc)}, {len(n)}; rewrite the file")
        tables[str(ev)] = (tuple(map(float, edges)), tuple(float("nan") if a is None else float(a) for a in acc),
                           tuple(int(x) for x in n))
    return Calibration(tables, str(data.get("source", "")), where)


def load_calibration(path: str | Path | None = None) -> Calibration | None:
    """The calibration table (default: ``sae_cafe/concepts/calibration.json``), or None when there is none."""
    p = Path(path) if path is not None else CALIBRATION_FILE
    if not p.exists():
        if path is not None:
            raise ArtifactError(f"no calibration table at {p}; pass an existing file or None")
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p} is not JSON ({e}); rewrite it or delete it (labels are then uncalibrated)") from e
    return parse_calibration(data, str(p))


# ----- the rule -------------------------------------------------------------------------------------------
def evidence_shares(maps_EHW: torch.Tensor, attributes: Mapping[str, object],
                    images: Sequence[int] | torch.Tensor | None = None) -> list[Share]:
    """Per exemplar ``{(attribute, value): share of positive mass}`` ({} when a map has no positive mass).

    Args:
        maps_EHW: (E, H, W) evidence maps (resized bilinearly to the attribute maps when sizes differ).
        attributes: {name: (N, H', W') int maps, -1 = n/a}; ``images`` (E,) picks exemplar e's image.
        images: None when the attribute maps are already one per exemplar (N = E).
    """
    # imported here: sae_cafe.cafe's build imports this module, so a module-level import would make
    # `import sae_cafe.concepts` (before sae_cafe.cafe) run into a half-initialised package
    from ..cafe.metrics import attribute_mass

    maps_EHW = torch.as_tensor(maps_EHW)
    if maps_EHW.ndim != 3:
        raise SaeCafeError(f"evidence maps must be (E, H, W), got shape {tuple(maps_EHW.shape)}")
    if images is None:
        for k, v in attributes.items():
            if len(v) != maps_EHW.shape[0]:
                raise SaeCafeError(f"attribute map {k!r} has {len(v)} images but there are {maps_EHW.shape[0]} "
                                   "evidence maps; pass images= (the image of each exemplar)")
        images = torch.arange(maps_EHW.shape[0])
    images = torch.as_tensor(images).long()
    if images.shape != maps_EHW.shape[:1]:
        raise SaeCafeError(f"images must be (E,) = ({maps_EHW.shape[0]},), got {tuple(images.shape)}")
    return attribute_mass(maps_EHW, images, dict(attributes))


def label_from_shares(shares: Iterable[Share], latent: int = -1, evidence: str = "ierf",
                      calibration: Calibration | None = None,
                      names: Mapping[str, Sequence[str]] | None = None) -> ConceptLabel:
    """The label of one latent from its exemplars' shares (:func:`evidence_shares`); rule in the module doc."""
    used = [s for s in shares if s]
    if not used:
        return unlabelled(latent, evidence, "no exemplar with positive evidence mass (dead latent or empty maps)")
    tot: dict[tuple[str, int], float] = {}
    for s in used:
        for k, v in s.items():
            tot[k] = tot.get(k, 0.0) + v
    m = {k: v / len(used) for k, v in sorted(tot.items())}
    order = sorted(m, key=lambda k: -m[k])  # stable: ties keep sorted (attribute, value) order
    win = order[0]
    second = order[1] if len(order) > 1 else None
    m2 = m[second] if second is not None else 0.0
    raw = max(0.0, min(1.0, m[win] - m2))
    agree = sum(1 for s in used if s.get(win, 0.0) >= max(s.values()) - 1e-9) / len(used)
    masses: dict[str, dict[str, float]] = {}
    for (a, v), x in m.items():
        masses.setdefault(a, {})[value_name(a, v, names)] = round(x, 6)
    conf, tag = calibration.apply(raw, evidence) if calibration is not None else (raw, UNCALIBRATED)
    return ConceptLabel(int(latent), value_name(*win, names), win[0], int(win[1]), raw, conf, tag, evidence,
                        share=m[win], runner_up=None if second is None else value_name(*second, names),
                        runner_up_share=m2, agreement=agree, n_exemplars=len(used), masses=masses)


def label_latent(maps_EHW: torch.Tensor, attributes: Mapping[str, object],
                 images: Sequence[int] | torch.Tensor | None = None, latent: int = -1, evidence: str = "ierf",
                 calibration: Calibration | None = None,
                 names: Mapping[str, Sequence[str]] | None = None) -> ConceptLabel:
    """Label one latent from its evidence maps over its top exemplars (see :func:`evidence_shares` for the
    arguments, :func:`label_from_shares` and the module docstring for the rule)."""
    return label_from_shares(evidence_shares(maps_EHW, attributes, images), latent, evidence, calibration, names)


def label_all(shares: Sequence[Share], ex_latent: torch.Tensor, n_latents: int, evidence: str = "ierf",
              calibration: Calibration | None = None) -> list[ConceptLabel]:
    """Labels of all ``n_latents`` latents from per-exemplar shares (rows aligned with ``ex_latent`` (E,))."""
    rows: dict[int, list[Share]] = {}
    for e, s in enumerate(ex_latent.tolist()):
        rows.setdefault(int(s), []).append(shares[e])
    return [label_from_shares(rows[s], s, evidence, calibration) if s in rows
            else unlabelled(s, evidence, "no exemplars (the latent never fired on the images)")
            for s in range(n_latents)]


# ----- storage and search ---------------------------------------------------------------------------------
def labels_document(by_evidence: Mapping[str, Sequence[ConceptLabel]], primary: str = "ierf",
                    source: str = "world attribute maps", calibration: Calibration | None = None) -> dict:
    """The ``labels.json`` document: ``primary`` evidence type, the rule, the calibration table used (its file
    and source, or None) and the labels per evidence type."""
    if primary not in by_evidence:
        raise SaeCafeError(f"primary evidence {primary!r} is not among {sorted(by_evidence)}")
    return {"schema": LABELS_SCHEMA, "primary": primary, "raw_confidence": RAW_CONFIDENCE,
            "raw_confidence_doc": RAW_CONFIDENCE_DOC, "source": source,
            "calibration": None if calibration is None else {"path": calibration.path, "source": calibration.source},
            "labels": {k: [lab.to_json() for lab in v] for k, v in by_evidence.items()}}


def read_labels(stage: str | Path, evidence: str | None = None) -> dict[int, ConceptLabel]:
    """A stage's labels ``{latent: ConceptLabel}`` (``evidence`` default: the primary); {} when the stage has
    no ``labels.json`` (built before labels, or from images without attribute maps: use
    :mod:`sae_cafe.concepts.dissection` or a :mod:`sae_cafe.concepts.labeller` there)."""
    p = Path(stage) / LABELS_FILE
    if not p.exists():
        return {}
    try:
        doc = json.loads(p.read_text())
        ev = evidence or doc["primary"]
        rows = doc["labels"][ev]
    except (json.JSONDecodeError, KeyError) as e:
        raise ArtifactError(f"{p} is not a labels document (missing {e}); rebuild the CAFE stage") from e
    return {int(r["latent"]): ConceptLabel.from_json(r) for r in rows}


def search_labels(labels: Mapping[int, ConceptLabel], query: str, min_confidence: float = 0.0) -> list[int]:
    """Latents whose label matches ``query`` (case-insensitive; "latents labelled stripes" → "stripes"; an
    ``attribute:`` prefix such as "background:" or "colour:" matches a whole attribute), best confidence first."""
    q = query.strip().lower()
    for prefix in ("latents labelled ", "labelled ", "label:"):
        if q.startswith(prefix):
            q = q[len(prefix):].strip()
    if not q:
        return []
    hits = []
    for s, lab in labels.items():
        if not lab.labelled or lab.confidence < min_confidence:
            continue
        whole = q.endswith(":") and (lab.attribute or "").lower() == q[:-1]
        if whole or q in lab.name.lower() or q == f"{lab.attribute}={lab.value}".lower():
            hits.append(s)
    return sorted(hits, key=lambda s: (-labels[s].confidence, s))


__all__ = ["CALIBRATION_FILE", "LABELS_FILE", "RAW_CONFIDENCE", "UNCALIBRATED", "Calibration", "ConceptLabel",
           "evidence_shares", "filled_bin", "label_all", "label_from_shares", "label_latent", "labels_document",
           "load_calibration", "merge_empty_bins", "parse_calibration", "read_labels", "search_labels", "value_name"]
