"""Image, mask and label loading for the saliency benchmark from a run's concept world or an image folder.

Library helpers shared by ``sae-cafe benchmark-saliency`` (:mod:`sae_cafe.evaluation.cli`) and the
pipeline (``sae_training.pipeline``); no argument parsing here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _note(text: str, notes: list[str] | None) -> None:
    """A note for the user: appended to ``notes`` when the caller collects them (the pipeline prints them
    under the stage they concern), else printed."""
    if notes is None:
        print(f"note: {text}")
    else:
        notes.append(text)


def mask_through_preprocess(adapter, mask: np.ndarray) -> np.ndarray:
    """Send a (h, w) bool mask through the adapter's resize/crop so it lines up with the input pixels.

    Returns a (H, W) bool array, H×W the model input size."""
    img = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    t = adapter.denormalize(adapter.preprocess_one(img)[None])[0, 0]
    return (t > 0.5).cpu().numpy()


#: scenes generated when the run has no exported world: a fixed pool, so that image ``000042`` is the same
#: scene whatever ``--n`` is and a run extended to more images resumes the images it already scored.
WORLD_POOL = 500


def load_world_data(run: str, n: int, seed: int, root=None, notes: list[str] | None = None):
    """(images uint8 (N,h,w,3), masks (N,h,w) bool, labels (N,), ids, upstream) of the concept world: the
    run's exported world, else the first ``n`` of ``max(n, WORLD_POOL)`` scenes generated with ``seed``."""
    from ..artifacts import is_finished, stage_path
    from ..world import WorldDataset, generate, load_world

    wdir = stage_path(run, "world", root=root)
    if is_finished(wdir):
        ds, upstream = load_world(wdir), {"world": wdir}
        if len(ds) < n:
            _note(f"{wdir} has {len(ds)} images; using all of them", notes)
    else:
        pool = max(n, WORLD_POOL)
        _note(f"no exported world at {wdir}; using the first {n} of {pool} scenes generated in memory "
              f"(seed {seed})", notes)
        ds, upstream = WorldDataset(generate(pool, seed)), {}
    w = ds.world
    k = min(n, len(ds))
    return w.images[:k], w.instance[:k] == 1, w.labels[:k], [ds.image_id(i) for i in range(k)], upstream


def load_folder_data(folder: str, n: int, class_names=None, notes: list[str] | None = None, files=None):
    """(images uint8 list of (h,w,3), masks list of (h,w) bool or None, labels (N,), ids, upstream {}) of
    the first ``n`` images of a folder (or of ``files``, a list of (path, class folder) pairs). Masks are
    read from ``<folder>/masks/<stem>.png`` or ``<stem>_mask.png``; when any image has none, ``masks`` is
    None and a note says that the pointing game and localisation are skipped."""
    from ..images import iter_image_files, load_image

    if files is None:
        files = iter_image_files(folder)
    files = [(p, c) for p, c in files if p.parent.name != "masks" and not p.stem.endswith("_mask")][:n]
    images, masks, labels = [], [], []
    for p, c in files:
        images.append(np.asarray(load_image(p)))
        cands = [Path(folder) / "masks" / f"{p.stem}.png", p.with_name(f"{p.stem}_mask.png")]
        m = next((q for q in cands if q.exists()), None)
        masks.append(None if m is None else np.asarray(load_image(m))[..., 0] > 127)
        labels.append(class_names.index(c) if class_names and c in class_names else -1)
    if any(m is None for m in masks):
        _note(f"{sum(m is None for m in masks)} of {len(files)} images have no mask; "
              "pointing game and localisation are skipped", notes)
        masks = None
    return images, masks, np.array(labels), [p.stem for p, _ in files], {}
