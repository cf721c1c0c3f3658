"""One image source for every stage: random access (CAFE, evaluation) and streaming (extraction).

:class:`ImageSource` takes a folder (flat or ImageFolder), an image file, a list of paths / PIL images / arrays
/ ``(image, label)`` pairs, an indexable dataset (e.g. a torchvision dataset of ``(image, label)``), a
preprocessed float tensor (N, 3, H, W), or any one-pass iterable of images or of (N, 3, H, W) batches
(streaming only). Image ids are positions 0..N-1 in this sequence; names are paths relative to the folder,
the given paths, or ``image_<i:06d>``.

Written by hand: torchvision's ``ImageFolder`` reads only folders of files and has no streaming resume point
(``next_item``) or per-file skip report.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .artifacts import hash_json
from .errors import ImageReadError, SaeCafeError
from .images import SkipReport, iter_image_files, to_pil


def _is_pair(item: object) -> bool:
    """``(image, label)``: a 2-tuple whose second element is a class id or name."""
    return (isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (int, str))
            and (isinstance(item[1], (int, str)) or (isinstance(item[1], torch.Tensor) and item[1].numel() == 1)))


def _label_value(label: object) -> int | str:
    return int(label) if isinstance(label, torch.Tensor) else label  # type: ignore[return-value]


class ImageSource:
    """Images with stable ids 0..N-1, names and optional labels; see the module docstring for inputs.

    Attributes:
        names: one name per image (random-access sources). labels: folder class names / dataset labels or None.
        root: the folder the images were read from (None for other sources). description: for messages and
            manifests. total: number of images (None for a one-pass stream).
    """

    def __init__(self, images: object):
        if isinstance(images, ImageSource):
            self.__dict__.update(images.__dict__)
            return
        self.tensor: torch.Tensor | None = None
        self.items: Sequence | None = None
        self.stream: Iterable | None = None
        self.labels: list[str | int | None] | None = None
        self.root: Path | None = None
        self.names: list[str] = []
        self._fingerprint: Any = None
        self.description = type(images).__name__
        if isinstance(images, (str, Path)):
            self._init_path(Path(images))
        elif isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images[None]
            if images.ndim != 4 or images.shape[1] != 3:
                raise ImageReadError(f"image tensor must be (N,3,H,W) preprocessed, got {tuple(images.shape)}")
            self.tensor, self.items = images, range(images.shape[0])
            self.names = [f"image_{i:06d}" for i in range(images.shape[0])]
            self.description = f"tensor{tuple(images.shape)}"
            flat = images.detach().float().flatten()
            self._fingerprint = [list(images.shape), float(flat[:: max(1, flat.numel() // 4096)].sum())]
        elif isinstance(images, (list, tuple)) or (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
            self.items = images
            paths = isinstance(images, (list, tuple)) and all(isinstance(i, (str, Path)) for i in images)
            self.names = ([str(i) for i in images] if paths else [f"image_{i:06d}" for i in range(len(images))])
            self.description = f"list[{len(images)}]" if isinstance(images, (list, tuple)) else (
                f"{type(images).__name__}[{len(images)}]")
            self._fingerprint = self.names if paths else None
            if isinstance(images, (list, tuple)) and images and all(_is_pair(i) for i in images):
                self.labels = [_label_value(i[1]) for i in images]
        elif isinstance(images, Iterable):
            self.stream = images
        else:
            raise SaeCafeError(f"unsupported image source {type(images).__name__}: pass a folder, an image file, a "
                               "list of images/paths, an indexable dataset, a (N,3,H,W) tensor or an iterable")
        if self.items is not None and len(self.items) == 0:
            raise ImageReadError(f"the image source {self.description} is empty; pass at least one image")

    def _init_path(self, p: Path) -> None:
        if not p.exists():
            raise ImageReadError(f"{p}: no such file or folder of images; pass a folder of images or an image file")
        files = iter_image_files(p) if p.is_dir() else [(p, None)]
        self.root = p if p.is_dir() else p.parent
        self.items = [f for f, _ in files]
        self.names = [str(f.relative_to(self.root)) for f, _ in files]
        self.labels = [c for _, c in files] if any(c is not None for _, c in files) else None
        self.description = str(p)
        self._fingerprint = [[n, f.stat().st_size] for n, f in zip(self.names, self.items, strict=True)]

    # ----- size, identity ---------------------------------------------------------------------------------------
    @property
    def base(self) -> Path | None:
        """Alias of :attr:`root`."""
        return self.root

    @property
    def total(self) -> int | None:
        return None if self.items is None else len(self.items)

    def __len__(self) -> int:
        if self.items is None:
            raise SaeCafeError(f"{self.description}: a one-pass stream of images has no length or random access; "
                               "pass a folder, a list, an indexable dataset or a (N,3,H,W) tensor")
        return len(self.items)

    def require_random_access(self) -> None:
        """Raise :class:`SaeCafeError` for a one-pass stream (which has no length or random access)."""
        len(self)

    def fingerprint(self) -> str | None:
        """Hash identifying the images (folder: relative names and sizes; tensor: shape and a strided sum;
        paths: the paths; other random-access sources: their count). None for a one-pass stream."""
        if self._fingerprint is not None:
            return hash_json(self._fingerprint)
        return None if self.items is None else hash_json({"n": len(self.items)})

    # ----- random access ----------------------------------------------------------------------------------------
    def _item(self, i: int) -> object:
        it = self.items[i]
        return it[0] if _is_pair(it) else it

    def label(self, i: int) -> str | int | None:
        """The folder class name / dataset label of image ``i`` (None when there is none)."""
        if self.labels is not None:
            return self.labels[i]
        if self.tensor is None and self.items is not None:
            it = self.items[i]
            if _is_pair(it):
                return _label_value(it[1])
        return None

    def pil(self, i: int, adapter: Any = None):
        """Image ``i`` as an RGB PIL image (a preprocessed tensor is denormalised with ``adapter``)."""
        self.require_random_access()
        if self.tensor is not None:
            x = self.tensor[i:i + 1]
            if adapter is not None:
                x = adapter.denormalize(x)
            return to_pil(x[0].clamp(0, 1).cpu())
        return to_pil(self._item(i), self.names[i])

    def batch(self, indices: Sequence[int], adapter: Any) -> torch.Tensor:
        """Preprocessed (B, 3, H, W) of images ``indices`` on the adapter's device (unreadable images raise)."""
        self.require_random_access()
        if self.tensor is not None:
            return self.tensor[list(indices)].to(adapter.device)
        return adapter.preprocess([self.pil(i) for i in indices]).to(adapter.device)

    # ----- streaming --------------------------------------------------------------------------------------------
    def batches(self, adapter: Any, batch_size: int, start: int = 0, skip_bad: bool = False,
                report: SkipReport | None = None) -> Iterator[tuple[list[str], torch.Tensor, int]]:
        """Batches ``(ids, x (B,3,H,W) on the adapter's device, next_item)`` from source item ``start`` on.

        ``next_item`` is the source position after the batch (what a resumed run passes as ``start``). With
        ``skip_bad`` unreadable images are left out of the batch and recorded in ``report``.
        """
        if self.tensor is not None:
            for a in range(start, self.tensor.shape[0], batch_size):
                x = adapter.preprocess(self.tensor[a:a + batch_size])
                yield self.names[a:a + x.shape[0]], x.to(adapter.device), a + x.shape[0]
        elif self.items is not None:
            for a in range(start, len(self.items), batch_size):
                idx = range(a, min(a + batch_size, len(self.items)))
                yield self._read(list(idx), [self._item(i) for i in idx], [self.names[i] for i in idx],
                                 adapter, skip_bad, report)
        else:
            yield from self._stream(adapter, batch_size, start, skip_bad, report)

    def _read(self, positions: list[int], items: list, names: list[str], adapter: Any, skip_bad: bool,
              report: SkipReport | None) -> tuple[list[str], torch.Tensor, int]:
        ids, pils = [], []
        for item, name in zip(items, names, strict=True):
            try:
                pils.append(to_pil(item, name))
                ids.append(name)
            except ImageReadError as e:
                if not skip_bad:
                    raise
                if report is not None:
                    report.add(name, str(e))
        x = adapter.preprocess(pils).to(adapter.device) if pils else torch.empty(0)
        return ids, x, positions[-1] + 1

    def _stream(self, adapter: Any, batch_size: int, start: int, skip_bad: bool,
                report: SkipReport | None) -> Iterator[tuple[list[str], torch.Tensor, int]]:
        """A one-pass iterable of images, ``(image, label)`` pairs or (N,3,H,W) batches (also ``(x, y)``)."""
        pos = 0
        pending: list = []
        pending_pos: list[int] = []

        def flush():
            names = [str(it) if isinstance(it, (str, Path)) else f"image_{p:06d}"
                     for it, p in zip(pending, pending_pos, strict=True)]
            return self._read(pending_pos, pending, names, adapter, skip_bad, report)

        for el in self.stream:
            if isinstance(el, (tuple, list)) and el and isinstance(el[0], torch.Tensor) and el[0].ndim == 4:
                el = el[0]
            if isinstance(el, torch.Tensor) and el.ndim == 4:
                if pending:
                    yield flush()
                    pending, pending_pos = [], []
                b, skip = el.shape[0], max(0, start - pos)
                if skip < b:
                    x = adapter.preprocess(el[skip:]).to(adapter.device)
                    yield [f"image_{pos + i:06d}" for i in range(skip, b)], x, pos + b
                pos += b
                continue
            if pos >= start:
                pending.append(el[0] if _is_pair(el) else el)
                pending_pos.append(pos)
            pos += 1
            if len(pending) == batch_size:
                yield flush()
                pending, pending_pos = [], []
        if pending:
            yield flush()


__all__ = ["ImageSource"]
