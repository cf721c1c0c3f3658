"""Image input: files, folders (flat or ImageFolder), PIL images, numpy arrays and tensors.

Everything becomes an RGB uint8 PIL image (EXIF orientation applied; grayscale, RGBA, palette, CMYK and
16-bit converted), then a float tensor through the model adapter's preprocessing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit; kept explicit


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated: first frame
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = arr.min(), arr.max()
        img = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.width < 1 or img.height < 1:
        raise ImageReadError(f"{name}: image has no pixels ({img.width}×{img.height})")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB. Errors name the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory; use iter_image_files/load_folder for folders")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes); replace or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageReadError(
                        f"{path}: {img.width}×{img.height} pixels exceeds the {MAX_PIXELS:,}-pixel safety limit "
                        "(decompression-bomb guard); downscale the image first")
                img.load()
                return _to_rgb(img, str(path))
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{path}: too many pixels (decompression-bomb guard: {e}); downscale it") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format); "
                             "check the file or remove it") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: corrupt or truncated image ({e}); re-export or remove it") from e


def to_pil(image: object, name: str = "<array>") -> Image.Image:
    """PIL image, path, numpy array (H,W[,C]) or tensor ((C,)H,W) to an RGB PIL image."""
    if isinstance(image, Image.Image):
        return _to_rgb(image, name)
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ImageReadError(f"{name}: array of shape {arr.shape} is not an image (H,W), (H,W,3) or (H,W,4)")
        if arr.size == 0:
            raise ImageReadError(f"{name}: empty array")
        if arr.dtype != np.uint8:
            a = arr.astype(np.float64)
            if not np.isfinite(a).all():
                raise ImageReadError(f"{name}: array contains NaN or inf")
            if a.max() <= 1.0 and a.min() >= 0.0:
                a = a * 255.0
            arr = np.clip(a.round(), 0, 255).astype(np.uint8)
        return _to_rgb(Image.fromarray(arr), name)
    raise ImageReadError(f"{name}: unsupported image type {type(image).__name__}")


def iter_image_files(folder: str | Path) -> list[tuple[Path, str | None]]:
    """Image files of a flat folder or an ImageFolder layout, sorted: ``[(path, class_name or None)]``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a directory")
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            rel = p.relative_to(folder)
            files.append((p, rel.parts[0] if len(rel.parts) > 1 else None))
    if not files:
        raise ImageReadError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


@dataclass
class SkipReport:
    """Files skipped by a batch job, with reasons (``skip_bad=True``)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))

    def summary(self) -> str:
        if not self.skipped:
            return "no images skipped"
        lines = [f"{len(self.skipped)} image(s) skipped:"] + [f"  {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def iter_images(source: str | Path | Iterable, skip_bad: bool = False,
                report: SkipReport | None = None) -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(image_id, RGB image)`` from a file, folder or iterable of images/paths.

    With ``skip_bad`` unreadable files are recorded in ``report`` instead of raising.
    """
    if isinstance(source, (str, Path)):
        p = Path(source)
        items: Iterable = [q for q, _ in iter_image_files(p)] if p.is_dir() else [p]
        base = p if p.is_dir() else p.parent
    else:
        items, base = source, None
    for i, item in enumerate(items):
        name = str(Path(item).relative_to(base)) if base is not None else (
            str(item) if isinstance(item, (str, Path)) else f"image_{i:06d}")
        try:
            yield name, to_pil(item, name)
        except ImageReadError as e:
            if not skip_bad:
                raise
            if report is not None:
                report.add(name, str(e))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
