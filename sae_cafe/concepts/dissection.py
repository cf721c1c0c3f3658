"""Network Dissection on a user's segmentation data: the concept vocabulary is a folder of images with per-concept
masks, every latent is labelled with the concept whose masks its thresholded maps overlap best (IoU).

Formats (:func:`load_segmentation`; docs/concept_labels_dissection.md has examples):

* **folder**: ``<root>/images/<name>.<ext>`` and ``<root>/masks/<name>/<concept>.png`` (one binary mask per
  concept present in the image, any non-zero pixel = concept; same size as the image);
* **index file** ``<root>/index.json``: ``{"images": [{"image": "a.jpg", "masks": {"sky": "a_sky.png"}},
  {"image": "b.jpg", "label_map": "b_seg.png", "labels": {"1": "sky", "2": "grass"}}]}`` (paths relative to
  the index file; a label map is an integer PNG whose pixel value names the concept, 0 / unlisted = none);
* **index file** ``<root>/index.csv`` with header ``image,mask,concept`` (one row per image and concept).

Method (Bau et al., "Network Dissection", CVPR 2017), for each latent k and concept c:

1. ``T_k`` = the dataset-wide top-``quantile`` (default 0.005) level of the latent's map values: the m-th
   largest value, m = ceil(quantile · N · h · w) over all N images' low-resolution activation maps (exact:
   a running top-m per latent);
2. each image's map is upsampled (bilinear) to the model input, binarised ``M_k = map ≥ T_k and map > 0``;
3. ``IoU_{k,c} = Σ_x |M_k(x) ∧ L_c(x)| / Σ_x |M_k(x) ∨ L_c(x)|``, sums over all images; the label is the
   best concept, kept when ``IoU ≥ iou_min`` (0.04, the paper's detector threshold).

Two versions side by side: **activation map** (the SAE latent's map on every image, as in the paper) and
**evidence** (the latent's SRD iERFs from a CAFE stage built over the same images). Deviations (also in the
docs): masks are sent through the model's resize/crop (``evaluation.runs.mask_through_preprocess``) so that
IoU is measured at the model input; the evidence version knows a latent's evidence only on its CAFE
exemplars (its top-k images, one iERF each, seeded at the best position) and takes it as empty elsewhere,
with ``T_k`` the top-``quantile`` level over the same N · H · W pixels. Labels come back as
:class:`~sae_cafe.concepts.label.ConceptLabel` with ``evidence="dissection-act"`` / ``"dissection-ierf"``,
``attribute="concept"``, ``raw_confidence = confidence = IoU`` (uncalibrated: IoU is not a probability).

Hand-written (no maintained library implements dissection for arbitrary models and SAEs).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, SaeCafeError
from ..images import IMAGE_EXTENSIONS, load_image
from .label import UNCALIBRATED, ConceptLabel, labels_document, unlabelled, value_name

QUANTILE = 0.005
IOU_MIN = 0.04


# ----- the dataset ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentationFolder:
    """A segmentation dataset: ``images`` (paths), the ``concepts`` vocabulary (sorted names) and per image its
    masks ``masks[i] = ((concept index, mask path, label value or None), …)`` (None: a binary mask)."""

    root: Path
    images: tuple[Path, ...]
    concepts: tuple[str, ...]
    masks: tuple[tuple[tuple[int, Path, int | None], ...], ...]
    format: str = "folder"

    def __len__(self) -> int:
        return len(self.images)

    def mask(self, i: int) -> np.ndarray:
        """(C, h, w) bool masks of image ``i`` at its own resolution (all False for absent concepts)."""
        w, h = load_image(self.images[i]).size
        out = np.zeros((len(self.concepts), h, w), bool)
        cache: dict[Path, np.ndarray] = {}
        for c, path, value in self.masks[i]:
            if path not in cache:
                cache[path] = _read_mask(path)
            m = cache[path]
            if m.shape != (h, w):
                raise SaeCafeError(f"mask {path} is {m.shape[1]}×{m.shape[0]} but its image {self.images[i]} is "
                                   f"{w}×{h}; masks must have their image's size")
            out[c] |= (m != 0) if value is None else (m == value)
        return out


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.exists():
        raise SaeCafeError(f"mask file {path} does not exist; fix the path in the segmentation index/folder")
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except OSError as e:
        raise SaeCafeError(f"cannot read mask {path} ({e}); masks are PNG files") from e
    return a if a.ndim == 2 else a[..., :3].max(-1)


def load_segmentation(path: str | Path) -> SegmentationFolder:
    """Read a segmentation dataset: a folder (``images/`` + ``masks/<name>/<concept>.png``, or holding
    ``index.json`` / ``index.csv``) or the index file itself (formats in the module docstring)."""
    p = Path(path)
    if p.is_dir():
        for name in ("index.json", "index.csv"):
            if (p / name).exists():
                return load_segmentation(p / name)
        return _load_folder(p)
    if not p.exists():
        raise SaeCafeError(f"segmentation dataset {p} does not exist; pass a folder or an index.json/.csv file")
    rows: list[tuple[Path, list[tuple[str, Path, int | None]]]] = []
    base = p.parent
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
            items = data["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SaeCafeError(f"{p}: expected {{\"images\": [...]}} ({e}); see docs/concept_labels_dissection.md"
                               ) from e
        for it in items:
            if "image" not in it or not ("masks" in it or "label_map" in it):
                raise SaeCafeError(f"{p}: every entry needs 'image' and 'masks' or 'label_map' + 'labels', got {it}")
            ms = [(str(c), base / m, None) for c, m in (it.get("masks") or {}).items()]
            if "label_map" in it:
                ms += [(str(c), base / it["label_map"], int(v)) for v, c in (it.get("labels") or {}).items()]
            rows.append((base / it["image"], ms))
    elif p.suffix == ".csv":
        by_image: dict[str, list] = {}
        with open(p, newline="") as fd:
            reader = csv.DictReader(fd)
            if not reader.fieldnames or not {"image", "mask", "concept"} <= set(reader.fieldnames):
                raise SaeCafeError(f"{p}: the header must name image,mask,concept; got {reader.fieldnames}")
            for r in reader:
                by_image.setdefault(r["image"], []).append((r["concept"], base / r["mask"], None))
        rows = [(base / k, v) for k, v in by_image.items()]
    else:
        raise SaeCafeError(f"{p}: a segmentation index is index.json or index.csv, got {p.suffix!r}")
    return _make(base, rows, p.suffix[1:])


def _load_folder(root: Path) -> SegmentationFolder:
    idir, mdir = root / "images", root / "masks"
    if not idir.is_dir() or not mdir.is_dir():
        raise SaeCafeError(f"{root}: a segmentation folder holds images/ and masks/<image name>/<concept>.png (or "
                           "an index.json / index.csv); see docs/concept_labels_dissection.md")
    rows = []
    for img in sorted(q for q in idir.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()):
        md = mdir / img.stem
        ms = [(m.stem, m, None) for m in sorted(md.glob("*.png"))] if md.is_dir() else []
        rows.append((img, ms))
    return _make(root, rows, "folder")


def _make(root: Path, rows, fmt: str) -> SegmentationFolder:
    if not rows:
        raise SaeCafeError(f"{root}: no images in the segmentation dataset")
    for img, _ in rows:
        if not img.exists():
            raise SaeCafeError(f"image {img} of the segmentation dataset does not exist; fix its path")
    concepts = tuple(sorted({c for _, ms in rows for c, _, _ in ms}))
    if not concepts:
        raise SaeCafeError(f"{root}: no concept masks found; each image needs at least one mask")
    idx = {c: i for i, c in enumerate(concepts)}
    return SegmentationFolder(root, tuple(img for img, _ in rows), concepts,
                              tuple(tuple((idx[c], m, v) for c, m, v in ms) for _, ms in rows), fmt)


def export_world_segmentation(world, out: str | Path) -> SegmentationFolder:
    """Write a concept-world batch as a segmentation folder (``images/`` + ``masks/<name>/<concept>.png``, one
    mask per attribute value present: "red", "circle", "stripes", "grass background", …)."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    maps = world.attribute_maps()
    for i in range(len(world)):
        name = f"{i:06d}"
        Image.fromarray(world.images[i]).save(out / "images" / f"{name}.png")
        md = out / "masks" / name
        md.mkdir(parents=True, exist_ok=True)
        for a, m in maps.items():
            for v in np.unique(m[i]):
                if v >= 0:
                    Image.fromarray(((m[i] == v) * 255).astype(np.uint8)).save(md / f"{value_name(a, int(v))}.png")
    return load_segmentation(out)


# ----- dissection ---------------------------------------------------------------------------------------------
@dataclass
class Dissection:
    """IoU tables (S, C) and thresholds (S,) per method ("act", and "ierf" when a CAFE stage was given), labels
    per evidence type ("dissection-act", "dissection-ierf") and notes."""

    concepts: tuple[str, ...]
    iou: dict[str, torch.Tensor]
    thresholds: dict[str, torch.Tensor]
    labels: dict[str, list[ConceptLabel]]
    quantile: float
    iou_min: float
    notes: list[str] = field(default_factory=list)


def _masks_at_input(ds: SegmentationFolder, i: int, adapter) -> torch.Tensor:
    """(C, H, W) bool masks of image i through the model's resize/crop."""
    from ..evaluation.runs import mask_through_preprocess

    m = ds.mask(i)
    return torch.from_numpy(np.stack([mask_through_preprocess(adapter, mc) if mc.any()
                                      else np.zeros(adapter.input_size, bool) for mc in m]))


def _topm_update(top: torch.Tensor | None, vals_SX: torch.Tensor, m: int) -> torch.Tensor:
    cat = vals_SX if top is None else torch.cat([top, vals_SX], 1)
    return cat.topk(min(m, cat.shape[1]), dim=1).values


@torch.no_grad()
def dissect(model, sae, layer: str | int, dataset: SegmentationFolder | str | Path, cafe=None,
            quantile: float = QUANTILE, iou_min: float = IOU_MIN, batch_size: int = 16,
            latent_chunk: int = 64) -> Dissection:
    """Dissect every latent of ``sae`` at ``layer`` of ``model`` on ``dataset`` (module docstring); ``cafe``:
    a CAFE stage (or its directory) built over the same images in the same order for the evidence version."""
    from ..models import get_adapter
    from ..saes import encode_images

    adapter = get_adapter(model)
    layer = adapter.resolve_layer(layer)
    ds = dataset if isinstance(dataset, SegmentationFolder) else load_segmentation(dataset)
    if not 0 < quantile < 1:
        raise SaeCafeError(f"quantile must be in (0, 1), got {quantile}")
    N, C = len(ds), len(ds.concepts)
    H, W = adapter.input_size

    def batches():
        for s in range(0, N, batch_size):
            ids = list(range(s, min(N, s + batch_size)))
            x = adapter.preprocess([load_image(ds.images[i]) for i in ids])
            _, lat, grid = encode_images(sae, adapter, layer, x.to(adapter.device))
            yield ids, lat.cpu().float(), grid  # (B, h·w, S)

    # pass 1: dataset-wide top-quantile level per latent (exact running top-m)
    top, grid = None, (0, 0)
    for _, lat, _grid in batches():
        m = math.ceil(quantile * N * lat.shape[1])
        top = _topm_update(top, lat.permute(2, 0, 1).reshape(lat.shape[2], -1), m)
    S = top.shape[0]
    T_act = top[:, -1].clone()
    # pass 2: IoU accumulated over all images
    inter = {"act": torch.zeros(S, C, dtype=torch.float64)}
    msum = {"act": torch.zeros(S, dtype=torch.float64)}
    lsum = torch.zeros(C, dtype=torch.float64)
    masks: dict[int, torch.Tensor] = {}
    for ids, lat, grid in batches():
        L = torch.stack([_masks_at_input(ds, i, adapter) for i in ids]).float()  # (B, C, H, W)
        if cafe is not None:
            masks.update({i: L[j].bool() for j, i in enumerate(ids)})
        lsum += L.sum((0, 2, 3)).double()
        maps = lat.transpose(1, 2).reshape(len(ids), S, *grid)
        for s0 in range(0, S, latent_chunk):
            sl = slice(s0, min(S, s0 + latent_chunk))
            up = torch.nn.functional.interpolate(maps[:, sl], size=(H, W), mode="bilinear", align_corners=False)
            M = ((up >= T_act[sl, None, None]) & (up > 0)).float()
            inter["act"][sl] += torch.einsum("bshw,bchw->sc", M, L).double()
            msum["act"][sl] += M.sum((0, 2, 3)).double()
    notes = [f"{N} images, {C} concepts, layer {layer} grid {grid[0]}×{grid[1]} → masks and maps at {H}×{W}"]
    thresholds = {"act": T_act}
    if cafe is not None:
        T_ev = _evidence_iou(cafe, ds, masks, quantile, H, W, inter, msum, notes)
        thresholds["ierf"] = T_ev
    iou = {k: (inter[k] / (msum[k][:, None] + lsum[None, :] - inter[k]).clamp(min=1e-12)).float() for k in inter}
    labels = {f"dissection-{k}": _labels(v, ds.concepts, f"dissection-{k}", iou_min) for k, v in iou.items()}
    return Dissection(ds.concepts, iou, thresholds, labels, quantile, iou_min, notes)


def _evidence_iou(cafe, ds: SegmentationFolder, masks: dict[int, torch.Tensor], quantile: float, H: int, W: int,
                  inter: dict, msum: dict, notes: list[str]) -> torch.Tensor:
    """The evidence (iERF) version from a CAFE stage built over ``ds``'s images; fills inter/msum["ierf"]."""
    from ..cafe.store import Cafe, load_cafe

    cafe = cafe if isinstance(cafe, Cafe) else load_cafe(cafe)
    names = [Path(q).name for q in cafe.images.get("names", [])]
    if len(names) != len(ds) or any(Path(a).stem != Path(b).stem for a, b in zip(names, ds.images)):
        raise SaeCafeError(f"the CAFE stage {cafe.path} was built over {len(names)} other images than the "
                           f"{len(ds)} of the segmentation dataset; build it over the same images in the same order")
    if tuple(cafe.input_size) != (H, W):
        raise SaeCafeError(f"the CAFE stage {cafe.path} has input size {cafe.input_size}, the model {(H, W)}")
    ex = cafe.exemplars
    S = cafe.n_latents
    m = math.ceil(quantile * len(ds) * H * W)
    T = torch.zeros(S)
    inter["ierf"], msum["ierf"] = torch.zeros(S, len(ds.concepts), dtype=torch.float64), torch.zeros(
        S, dtype=torch.float64)
    for s in range(S):
        ids = cafe.exemplar_ids(s)
        if not ids:
            continue
        maps = cafe.ierf(ids).clamp(min=0)  # (e, H, W)
        pos = maps[maps > 0]
        if pos.numel() == 0:
            continue
        T[s] = pos.topk(min(m, pos.numel())).values[-1]
        M = (maps >= T[s]) & (maps > 0)
        for j, e in enumerate(ids):
            L = masks[int(ex["ex_image"][e])]
            inter["ierf"][s] += (M[j][None] & L).sum((1, 2)).double()
            msum["ierf"][s] += float(M[j].sum())
    notes.append(f"evidence version from CAFE stage {cafe.path}: iERFs of each latent's top exemplars only "
                 "(empty elsewhere)")
    return T


def _labels(iou: torch.Tensor, concepts: tuple[str, ...], evidence: str, iou_min: float) -> list[ConceptLabel]:
    out = []
    for s in range(iou.shape[0]):
        row = iou[s]
        order = torch.argsort(row, descending=True, stable=True).tolist()
        best = order[0]
        b = float(row[best])
        second = order[1] if len(order) > 1 else None
        if b <= 0 or b < iou_min:
            out.append(unlabelled(s, evidence, f"best IoU {b:.3f} ({concepts[best]}) < {iou_min} (detector "
                                               "threshold of Network Dissection)"))
            continue
        top = {concepts[c]: round(float(row[c]), 6) for c in order[:5]}
        out.append(ConceptLabel(s, concepts[best], "concept", best, b, b, UNCALIBRATED, evidence, share=b,
                                runner_up=None if second is None else concepts[second],
                                runner_up_share=0.0 if second is None else float(row[second]),
                                agreement=0.0, n_exemplars=0, masses={"iou": top},
                                note="raw_confidence = confidence = IoU (Network Dissection)"))
    return out


def write_dissection(result: Dissection, out: str | Path) -> Path:
    """Write ``labels.json`` (readable by :func:`~sae_cafe.concepts.label.read_labels`; primary: the
    activation-map version), ``iou.safetensors`` (S, C) per method and ``dissection.json`` to ``out``."""
    from safetensors.torch import save_file

    from ..artifacts import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not result.labels:
        raise ArtifactError("nothing to write: the dissection has no labels")
    atomic_write_json(out / "labels.json", labels_document(result.labels, "dissection-act" if "dissection-act"
                                                          in result.labels else next(iter(result.labels)),
                                                          source="network dissection"))
    save_file({f"iou_{k}": v.contiguous() for k, v in result.iou.items()}
              | {f"threshold_{k}": v.contiguous() for k, v in result.thresholds.items()}, str(out / "iou.safetensors"))
    atomic_write_json(out / "dissection.json", {"concepts": list(result.concepts), "quantile": result.quantile,
                                                "iou_min": result.iou_min, "notes": result.notes,
                                                "methods": sorted(result.iou)})
    return out


__all__ = ["IOU_MIN", "QUANTILE", "Dissection", "SegmentationFolder", "dissect", "export_world_segmentation",
           "load_segmentation", "write_dissection"]
