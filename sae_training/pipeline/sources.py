"""Generated image sources a run config can name instead of a folder: ``images = "skimage_crops:200"``.

A generated source is written once as an ordinary ImageFolder under ``<root>/<run>/images/`` (one sub-folder
per photo) and then read like any user folder, so every stage and the viewer see plain image files. The folder
holds ``source.json`` (the spec, the generator version and the file names); it is rewritten only when that
record does not match (a finished folder is never touched again, so the stages' image keys, which hash file
sizes and times, stay valid).

``skimage_crops:N[:SIZE]`` — N square crops (SIZE px, default 224) of the colour photos bundled with
scikit-image (``skimage.data``; nothing is downloaded), spread round-robin over the photos (one class folder
per photo), each crop a seeded random square of 1/2 to the full short side, resized with bicubic filtering.
Deterministic: the same spec gives the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sae_cafe.errors import SaeCafeError

#: bundled colour photos of ``skimage.data`` (class folder name → loader name); none needs a download
SKIMAGE_PHOTOS = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket",
                  "galaxies": "hubble_deep_field", "tissue": "immunohistochemistry", "retina": "retina",
                  "motorcycle": "stereo_motorcycle"}
VERSION = 1
RECORD = "source.json"


def is_generated(images: str | None) -> bool:
    """True when ``images`` names a generated source (``<generator>:<args>``) rather than a path."""
    return bool(images) and str(images).split(":", 1)[0] in GENERATORS and ":" in str(images)


def parse(spec: str) -> tuple[str, int, int]:
    """``"skimage_crops:N[:SIZE]"`` → (generator, N, SIZE); a clear error for anything else."""
    parts = str(spec).split(":")
    name = parts[0]
    if name not in GENERATORS or len(parts) not in (2, 3):
        raise SaeCafeError(f"images = {spec!r}: a generated source is written 'skimage_crops:N' or "
                           f"'skimage_crops:N:SIZE' (generators: {sorted(GENERATORS)}); else give a folder path")
    try:
        n, size = int(parts[1]), int(parts[2]) if len(parts) == 3 else 224
    except ValueError:
        raise SaeCafeError(f"images = {spec!r}: N and SIZE must be integers, e.g. 'skimage_crops:200'") from None
    if n < 1 or not 16 <= size <= 1024:
        raise SaeCafeError(f"images = {spec!r}: need N ≥ 1 and 16 ≤ SIZE ≤ 1024 in 'skimage_crops:N:SIZE'")
    return name, n, size


def skimage_crops(folder: Path, n: int, size: int = 224, seed: int = 0) -> list[str]:
    """Write ``n`` crops (``size`` px, PNG) of :data:`SKIMAGE_PHOTOS` into ``folder/<photo>/``, round-robin
    over the photos; returns the relative file names (sorted)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    photos = list(SKIMAGE_PHOTOS.items())
    arrays = {}
    for i in range(n):
        cls, loader = photos[i % len(photos)]
        if cls not in arrays:
            a = getattr(skimage.data, loader)()
            a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
            arrays[cls] = np.asarray(a)[..., :3]
        a = arrays[cls]
        h, w = a.shape[:2]
        short = min(h, w)
        s = int(rng.integers(short // 2, short + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = Image.fromarray(a[y:y + s, x:x + s]).convert("RGB").resize((size, size), Image.BICUBIC)
        rel = f"{cls}/{cls}_{i // len(photos):04d}.png"
        (folder / cls).mkdir(parents=True, exist_ok=True)
        img.save(folder / rel)
        names.append(rel)
    return sorted(names)


GENERATORS = {"skimage_crops": skimage_crops}


def materialize(spec: str, folder: str | Path) -> Path:
    """The image folder of a generated source ``spec``, written to ``folder`` unless it already holds exactly
    this source (its ``source.json`` matches). Written into a temporary sibling and renamed into place."""
    name, n, size = parse(spec)
    folder = Path(folder)
    want = {"spec": spec, "generator": name, "n": n, "size": size, "version": VERSION}
    rec = folder / RECORD
    if rec.exists():
        try:
            have = json.loads(rec.read_text())
        except json.JSONDecodeError:
            have = {}
        if {k: have.get(k) for k in want} == want and all((folder / f).is_file() for f in have.get("files", [])):
            return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = GENERATORS[name](tmp, n, size)
    (tmp / RECORD).write_text(json.dumps({**want, "files": files}, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder
