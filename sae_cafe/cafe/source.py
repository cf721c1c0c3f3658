"""Random-access image sources for CAFE: folders, lists of images/paths, datasets, preprocessed tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import hash_json
from ..errors import SaeCafeError
from ..images import iter_image_files, to_pil


class ImageSource:
    """Indexable images with stable ids 0..N-1 (dataset order), names and optional labels.

    Accepts a folder (flat or ImageFolder), a sequence of paths / PIL images / arrays / ``(image, label)``
    pairs (e.g. a torchvision dataset), or a preprocessed float tensor (N, 3, H, W).
    """

    def __init__(self, images: object):
        self.tensor: torch.Tensor | None = None
        self.labels: list[str | int | None] | None = None
        self.root: Path | None = None
        if isinstance(images, ImageSource):
            self.__dict__.update(images.__dict__)
            return
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise SaeCafeError(f"image tensor must be (N,3,H,W) preprocessed, got {tuple(images.shape)}")
            self.tensor = images
            self.items: Sequence = range(images.shape[0])
            self.names = [f"image_{i:06d}" for i in range(images.shape[0])]
        elif isinstance(images, (str, Path)):
            p = Path(images)
            if not p.exists():
                raise SaeCafeError(f"image source {p} does not exist; pass a folder of images or an image file")
            files = iter_image_files(p) if p.is_dir() else [(p, None)]
            self.root = p if p.is_dir() else p.parent
            self.items = [f for f, _ in files]
            self.names = [str(f.relative_to(self.root)) for f, _ in files]
            self.labels = [c for _, c in files] if any(c is not None for _, c in files) else None
        elif hasattr(images, "__len__") and hasattr(images, "__getitem__"):
            self.items = images
            self.names = [str(it) if isinstance(it, (str, Path)) else f"image_{i:06d}"
                          for i, it in enumerate(images)] if isinstance(images, (list, tuple)) else [
                f"image_{i:06d}" for i in range(len(images))]
        else:
            raise SaeCafeError(f"unsupported image source {type(images).__name__}: pass a folder, a list of "
                               "images/paths, an indexable dataset or a (N,3,H,W) tensor")
        if len(self) == 0:
            raise SaeCafeError("the image source is empty")

    def __len__(self) -> int:
        return len(self.items)

    def _item(self, i: int):
        it = self.items[i]
        if isinstance(it, tuple) and len(it) == 2:
            return it[0]
        return it

    def label(self, i: int) -> str | int | None:
        if self.labels is not None:
            return self.labels[i]
        it = self.items[i] if self.tensor is None else None
        if isinstance(it, tuple) and len(it) == 2:
            lab = it[1]
            return int(lab) if isinstance(lab, torch.Tensor) else lab
        return None

    def pil(self, i: int, adapter=None):
        """The image as an RGB PIL image (a preprocessed tensor is denormalised with ``adapter``)."""
        if self.tensor is not None:
            x = self.tensor[i:i + 1]
            if adapter is not None:
                x = adapter.denormalize(x)
            return to_pil(x[0].clamp(0, 1).cpu())
        return to_pil(self._item(i), self.names[i])

    def batch(self, indices: Sequence[int], adapter) -> torch.Tensor:
        """Preprocessed (B, 3, H, W) on the adapter's device."""
        if self.tensor is not None:
            return self.tensor[list(indices)].to(adapter.device)
        return adapter.preprocess([self.pil(i) for i in indices])

    def fingerprint(self) -> str:
        return hash_json({"n": len(self), "names": self.names,
                          "t": None if self.tensor is None else float(self.tensor.double().sum())})
