"""Export of a generated world as an ImageFolder + ground truth, and the evaluation-dataset API.

Layout of ``indexes/<run>/world/``::

    images/<class_name>/<id>.png     the scenes (the generic image path reads them like any folder)
    ground_truth.safetensors         labels (N,), instance (N,H,W) uint8, shape/colour/pattern/background
                                     maps (N,H,W) int8 (-1 = n/a), boxes (N,K,4) int16, object_* (N,K)
    labels.json                      per image: id, file, label, class_name, background, objects
    vocabulary.json                  ``vocab.vocabulary()``
    examples.png                     contact sheet: up to 48 scenes, target outlines in white
    manifest.json                    kind "world", config {n, seed, world: WorldConfig}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_json, read_manifest, stage_dir, stage_path, write_manifest
from ..errors import ArtifactError
from . import vocab as V
from .generator import World, WorldConfig, generate

GROUND_TRUTH = "ground_truth.safetensors"
_OBJ_KEYS = ("shape", "colour", "pattern", "present", "cx", "cy", "radius", "angle")


@dataclass
class WorldSample:
    """One scene with its ground truth.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        label: class index; ``class_name`` its name.
        target_mask: (H, W) bool mask of the target object.
        instance: (H, W) uint8 instance ids (0 background, 1 target, 2.. distractors).
        attributes: {"shape"|"colour"|"pattern"|"background": (H, W) int8}, -1 where not applicable.
        boxes: (K, 4) int16 (x0, y0, x1, y1) per object slot, -1 for absent slots; row 0 is the target.
    """

    id: str
    image: np.ndarray
    label: int
    class_name: str
    target_mask: np.ndarray
    instance: np.ndarray
    attributes: dict[str, np.ndarray]
    boxes: np.ndarray


class WorldDataset:
    """Scenes with masks and attribute maps, for any scorer (``len``, indexing, ``iter_batches``).

    Build it from a generated :class:`World` (``WorldDataset(world)``) or read an export
    (:func:`load_world`). ``files`` holds the PNG paths of an export (else None).
    """

    def __init__(self, world: World, files: list[Path] | None = None, root: Path | None = None):
        self.world, self.files, self.root = world, files, root
        self.class_names = list(V.CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.world)

    def image_id(self, i: int) -> str:
        return f"{i:06d}"

    def __getitem__(self, i: int) -> WorldSample:
        w = self.world
        if not -len(w) <= i < len(w):
            raise IndexError(f"index {i} out of range for a world of {len(w)} images")
        i = i % len(w)
        maps = {k: v[i] for k, v in w.attribute_maps().items()}
        return WorldSample(self.image_id(i), w.images[i], int(w.labels[i]), V.CLASS_NAMES[w.labels[i]],
                           w.instance[i] == 1, w.instance[i], maps, w.boxes[i])

    def iter_batches(self, batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of batched arrays: images (B,H,W,3) uint8, labels (B,), target_mask (B,H,W) bool,
        instance (B,H,W), shape/colour/pattern/background (B,H,W) int8, boxes (B,K,4), index (B,)."""
        w = self.world
        for s in range(0, len(w), batch_size):
            sl = slice(s, s + batch_size)
            yield {"index": np.arange(s, min(s + batch_size, len(w))), "images": w.images[sl],
                   "labels": w.labels[sl], "target_mask": w.instance[sl] == 1, "instance": w.instance[sl],
                   "boxes": w.boxes[sl], **{k: v[sl] for k, v in w.attribute_maps().items()}}

    @property
    def images_dir(self) -> Path | None:
        """The ImageFolder directory of an export (``<world>/images``)."""
        return None if self.root is None else self.root / "images"


def _ground_truth_arrays(world: World) -> dict[str, np.ndarray]:
    arrays = {"labels": world.labels.astype(np.int64), "instance": world.instance,
              "shape_map": world.shape_map, "colour_map": world.colour_map, "pattern_map": world.pattern_map,
              "background_map": world.background_map, "boxes": world.boxes, "background": world.background}
    for k in _OBJ_KEYS:
        a = world.objects[k]
        arrays[f"object_{k}"] = a.astype(np.uint8) if a.dtype == bool else a
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def _labels_json(world: World, files: list[str]) -> list[dict]:
    rows = []
    o = world.objects
    for i in range(len(world)):
        objs = [{"slot": k, "instance_id": k + 1, "is_target": k == 0, "shape": V.SHAPES[o["shape"][i, k]],
                 "colour": V.COLOURS[o["colour"][i, k]], "pattern": V.PATTERNS[o["pattern"][i, k]],
                 "box_xyxy": [int(b) for b in world.boxes[i, k]]}
                for k in range(o["present"].shape[1]) if o["present"][i, k]]
        rows.append({"id": f"{i:06d}", "file": files[i], "label": int(world.labels[i]),
                     "class_name": V.CLASS_NAMES[world.labels[i]],
                     "background": V.BACKGROUNDS[world.background[i]], "objects": objs})
    return rows


def contact_sheet(world: World, n: int = 48, cols: int = 8) -> np.ndarray:
    """(rows·H, cols·W, 3) uint8 grid of the first ``n`` scenes with the target mask outlined in white."""
    n = min(n, len(world))
    imgs = world.images[:n].copy()
    t = world.instance[:n] == 1
    inner = t.copy()
    c = t[:, 1:-1, 1:-1]
    inner[:, 1:-1, 1:-1] = c & t[:, :-2, 1:-1] & t[:, 2:, 1:-1] & t[:, 1:-1, :-2] & t[:, 1:-1, 2:]
    imgs[t & ~inner] = 255
    rows = -(-n // cols)
    H, W = imgs.shape[1:3]
    sheet = np.zeros((rows * H, cols * W, 3), np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        sheet[r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    return sheet


def write_world(run: str, n: int = 2000, seed: int = 0, config: WorldConfig | None = None,
                root: str | Path | None = None, world: World | None = None) -> Path:
    """Generate ``n`` scenes (or take ``world``) and export them to ``<root>/<run>/world`` atomically."""
    from PIL import Image
    from safetensors.numpy import save_file
    from tqdm import tqdm

    world = world if world is not None else generate(n, seed, config=config)
    final = stage_path(run, "world", root=root)
    with stage_dir(final) as tmp:
        files = []
        for name in V.CLASS_NAMES:
            (tmp / "images" / name).mkdir(parents=True)
        for i in tqdm(range(len(world)), desc="write world", unit="img", leave=False):
            rel = f"images/{V.CLASS_NAMES[world.labels[i]]}/{i:06d}.png"
            Image.fromarray(world.images[i]).save(tmp / rel, optimize=False)
            files.append(rel)
        save_file(_ground_truth_arrays(world), str(tmp / GROUND_TRUTH))
        atomic_write_json(tmp / "labels.json", _labels_json(world, files))
        atomic_write_json(tmp / "vocabulary.json", V.vocabulary())
        Image.fromarray(contact_sheet(world)).save(tmp / "examples.png")
        write_manifest(tmp, "world", {"n": len(world), "seed": world.seed, "world": world.config},
                       count=len(world), class_names=list(V.CLASS_NAMES))
    return final


def load_world(path: str | Path) -> WorldDataset:
    """Read an exported world (``indexes/<run>/world`` or the run directory) as a :class:`WorldDataset`."""
    from safetensors.numpy import load_file

    from ..images import load_image

    path = Path(path)
    if not (path / "manifest.json").exists() and (path / "world" / "manifest.json").exists():
        path = path / "world"
    manifest = read_manifest(path, "world")
    gt_path = path / GROUND_TRUTH
    if not gt_path.exists():
        raise ArtifactError(f"{path}: {GROUND_TRUTH} is missing; regenerate with `sae-cafe make-world`")
    gt = load_file(str(gt_path))
    rows = json.loads((path / "labels.json").read_text())
    if len(rows) != len(gt["labels"]):
        raise ArtifactError(f"{path}: labels.json has {len(rows)} rows but ground truth {len(gt['labels'])}; "
                            "the export is inconsistent, regenerate it")
    files = [path / r["file"] for r in rows]
    if not files:
        raise ArtifactError(f"{path}: the exported world is empty; regenerate it with --n > 0")
    images = np.stack([np.asarray(load_image(f)) for f in files])
    cfg_d = manifest["config"]["world"]
    cfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_d.items()})
    objects = {k: gt[f"object_{k}"] for k in _OBJ_KEYS}
    objects["present"] = objects["present"].astype(bool)
    world = World(images=images, labels=gt["labels"], instance=gt["instance"], shape_map=gt["shape_map"],
                  colour_map=gt["colour_map"], pattern_map=gt["pattern_map"],
                  background_map=gt["background_map"], objects=objects, boxes=gt["boxes"],
                  background=gt["background"], config=cfg, seed=manifest["config"]["seed"])
    return WorldDataset(world, files, path)
