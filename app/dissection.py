"""Network Dissection labels for the viewer: read the folder ``sae-cafe dissect`` writes beside a CAFE stage and
put its labels next to the stage's own (iERF) concept labels. Pure functions (no Streamlit); the cached loader
and the path confinement are in :mod:`app.data` (:func:`app.data.dissection`).

Layout read (written by :func:`sae_cafe.concepts.dissection.write_dissection` through ``sae-cafe dissect``,
whose default output for the CAFE stage ``<run>/cafe/<model>/<layer>`` is
``<run>/dissection/<model>/<layer>``):

* ``dissection.json``: concepts, quantile, iou_min, methods (``act``, and ``ierf`` with ``--evidence``), notes,
  and from the CLI model, layer, sae, masks, format, n_images, cafe;
* ``labels.json``: one :class:`~sae_cafe.concepts.label.ConceptLabel` per latent and method
  (``dissection-act`` / ``dissection-ierf``; ``confidence = raw_confidence = IoU``);
* ``iou.safetensors``: ``iou_<method>`` (S, C) IoU tables and ``threshold_<method>`` (S,) thresholds ``T_k``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_cafe.concepts.label import ConceptLabel
from sae_cafe.errors import ArtifactError

FILES = ("dissection.json", "labels.json", "iou.safetensors")
#: readable names of the dissection methods
METHOD_NAMES = {"act": "activation map", "ierf": "iERF evidence"}


@dataclass(frozen=True)
class DissectionLabels:
    """One dissection output folder, read for display.

    Attributes:
        path: the folder. meta: ``dissection.json``. methods: ``("act", …)`` (``act`` first when present).
        labels: ``{method: {latent: ConceptLabel}}`` (unlabelled latents included, ``name == ""``).
        best_iou: ``{method: (S,) float}``: each latent's best IoU over the concepts (also below ``iou_min``).
        best_concept: ``{method: (S,) str}``: the concept of that best IoU.
        thresholds: ``{method: (S,) float}``: the activation level ``T_k`` that counts as "on".
    """

    path: Path
    meta: dict
    methods: tuple[str, ...]
    labels: dict[str, dict[int, ConceptLabel]]
    best_iou: dict[str, np.ndarray]
    best_concept: dict[str, tuple[str, ...]]
    thresholds: dict[str, np.ndarray]

    @property
    def n_latents(self) -> int:
        return len(self.best_iou[self.methods[0]])

    @property
    def primary(self) -> str:
        return self.methods[0]

    def label(self, latent: int, method: str | None = None) -> ConceptLabel | None:
        return self.labels[method or self.primary].get(int(latent))


def read_dissection(path: str | Path) -> DissectionLabels:
    """Read a ``sae-cafe dissect`` output folder (layout in the module docstring); :class:`ArtifactError`
    naming the file and the command to rerun when a file is missing or does not fit the others."""
    from safetensors.numpy import load_file

    p = Path(path)
    rerun = "rerun `sae-cafe dissect` for this layer"
    missing = [f for f in FILES if not (p / f).exists()]
    if missing:
        raise ArtifactError(f"the dissection folder {p} lacks {', '.join(missing)}; {rerun}")
    try:
        meta = json.loads((p / "dissection.json").read_text())
        doc = json.loads((p / "labels.json").read_text())
        tensors = load_file(str(p / "iou.safetensors"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as e:
        raise ArtifactError(f"the dissection folder {p} is unreadable ({e}); {rerun}") from e
    concepts = tuple(str(c) for c in meta.get("concepts", ()))
    methods = sorted(meta.get("methods") or [k[4:] for k in tensors if k.startswith("iou_")],
                     key=lambda m: (m != "act", m))
    if not methods or not concepts:
        raise ArtifactError(f"{p / 'dissection.json'} names no methods or no concepts; {rerun}")
    labels, best_iou, best_concept, thresholds = {}, {}, {}, {}
    for m in methods:
        iou = tensors.get(f"iou_{m}")
        rows = (doc.get("labels") or {}).get(f"dissection-{m}")
        if iou is None or rows is None or iou.ndim != 2 or iou.shape[1] != len(concepts):
            raise ArtifactError(f"{p}: method {m!r} needs iou_{m} (S, {len(concepts)}) in iou.safetensors and "
                                f"'dissection-{m}' labels in labels.json; {rerun}")
        labs = {int(r["latent"]): ConceptLabel.from_json(r) for r in rows}
        if sorted(labs) != list(range(iou.shape[0])):
            raise ArtifactError(f"{p}: labels.json has {len(labs)} '{m}' labels for {iou.shape[0]} latents; {rerun}")
        labels[m] = labs
        arg = iou.argmax(1) if iou.shape[1] else np.zeros(iou.shape[0], int)
        best_iou[m] = iou.max(1).astype(np.float64)
        best_concept[m] = tuple(concepts[int(c)] for c in arg)
        thresholds[m] = tensors.get(f"threshold_{m}", np.full(iou.shape[0], np.nan)).astype(np.float64)
    return DissectionLabels(p, meta, tuple(methods), labels, best_iou, best_concept, thresholds)


def agree(label: ConceptLabel | None, dissection: ConceptLabel | None) -> bool | None:
    """Whether the stage's own label and the dissection label name the same concept (case and surrounding
    spaces ignored); None when either is missing or unlabelled."""
    if label is None or dissection is None or not label.labelled or not dissection.labelled:
        return None
    return label.name.strip().lower() == dissection.name.strip().lower()


def mismatch(dis: DissectionLabels, cafe_manifest: dict, n_latents: int) -> tuple[str | None, str | None]:
    """(error, warning) of showing ``dis`` beside a CAFE stage: an error (not shown) when the latent count or
    the layer differs; a warning when the two record different SAE folders."""
    layer = dis.meta.get("layer")
    if dis.n_latents != n_latents:
        return (f"the dissection in {dis.path} labels {dis.n_latents} latents, the CAFE stage has {n_latents}: it "
                "was made for another SAE; rerun `sae-cafe dissect` for this stage"), None
    if layer is not None and cafe_manifest.get("layer") is not None and str(layer) != str(cafe_manifest["layer"]):
        return (f"the dissection in {dis.path} is of layer {layer!r}, the CAFE stage of {cafe_manifest['layer']!r}; "
                "rerun `sae-cafe dissect` for this stage"), None
    a, b = dis.meta.get("sae"), cafe_manifest.get("sae_path")
    if a and b and Path(a).resolve() != Path(b).resolve():
        return None, (f"the dissection used the SAE {a}, the CAFE stage {b}: latent ids match only if they are the "
                      "same SAE")
    return None, None


def hint(root: str | Path, run: str, model: str, layer: str) -> str:
    """The command that makes dissection labels for a stage (the user supplies the segmentation dataset)."""
    return (f"sae-cafe dissect --run {run} --root {root} --model {model} --layer {layer} --masks SEGMENTATION "
            "(a folder of images/ + masks/<image>/<concept>.png, or index.json / index.csv; "
            "docs/concept_labels_dissection.md)")


def describe(dis: DissectionLabels, latent: int, own: ConceptLabel | None, method: str) -> str:
    """One Markdown line for a latent's card: the dissection concept, its IoU, the threshold and whether it
    agrees with the stage's own label ``own``."""
    lab = dis.label(latent, method)
    iou, thr = float(dis.best_iou[method][latent]), float(dis.thresholds[method][latent])
    q, iou_min = dis.meta.get("quantile"), dis.meta.get("iou_min")
    on = f"'on' where the map ≥ T = {thr:.3g}" + (f" (the top {100 * q:g} % of its values)" if q else "")
    what = METHOD_NAMES.get(method, method)
    if lab is None or not lab.labelled:
        return (f"dissection ({what}): no concept — best IoU {iou:.3f} ({dis.best_concept[method][latent]}) is "
                f"below {iou_min} · {on}")
    a = agree(own, lab)
    verdict = ("" if a is None else " · **agrees** with the label" if a
               else f" · **differs** from the label ({own.name})")
    run_up = f", runner-up {lab.runner_up} {lab.runner_up_share:.3f}" if lab.runner_up else ""
    return f"**dissection ({what}): {lab.name}** · IoU {iou:.3f}{run_up} · {on}, labelled at IoU ≥ {iou_min}{verdict}"


__all__ = ["METHOD_NAMES", "DissectionLabels", "agree", "describe", "hint", "mismatch", "read_dissection"]
