"""Shuffling data provider over activation shards for sae-lens's ``SAETrainer`` (an infinite iterator of
``(batch, d_in)`` tensors).

Written by hand: sae-lens's ``ActivationsStore`` reads language-model token caches; this one mixes our
PFV shards. Memory is bounded by ``buffer_rows`` whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae_cafe.activations import ShardReader
from sae_cafe.errors import SaeCafeError


def holdout_split(n_images: int, holdout: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Image-index ranges ``(train, held_out)``: the last ``holdout`` fraction of images is held out."""
    if not 0.0 <= holdout < 1.0:
        raise SaeCafeError(f"holdout must be in [0, 1), got {holdout}")
    cut = n_images - int(round(n_images * holdout))
    if holdout > 0 and cut == n_images and n_images > 1:
        cut = n_images - 1
    return (0, cut), (cut, n_images)


@torch.no_grad()
def training_rows(reader: ShardReader, image_range: tuple[int, int] | None = None, tokens: str | None = "patch",
                  exclude_outliers: bool = False) -> dict[str, Any]:
    """One pass over the shards: the rows an SAE trains on (``tokens``, outliers kept or not, images in
    ``image_range``) — ``n`` rows, their exact ``mean_norm`` (float64) and ``outliers`` (flagged rows among
    them; with ``exclude_outliers`` the number left out instead, under ``outliers_excluded``)."""
    n, total, flagged, excluded = 0, 0.0, 0, 0
    for sh in reader.iter_shards():
        m = reader.row_mask(sh, tokens, False, image_range)
        acts, out = (sh["acts"], sh["outlier"]) if m is None else (sh["acts"][m], sh["outlier"][m])
        if exclude_outliers:
            keep = out == 0
            excluded += int((~keep).sum())
            acts, out = acts[keep], out[keep]
        n += acts.shape[0]
        flagged += int(out.sum())
        for c in range(0, acts.shape[0], 8192):  # float64 in chunks (bounded memory)
            total += float(acts[c:c + 8192].double().norm(dim=-1).sum())
    return {"n": n, "mean_norm": total / n if n else float("nan"),
            "outliers": flagged, "outliers_excluded": excluded}


class ShardDataProvider:
    """Infinite shuffled batches of PFVs from an ``acts`` stage.

    Shards are read in a random order each epoch into a mixing buffer of ``buffer_rows`` rows; the buffer is
    shuffled and half of it is served as batches before it is refilled (as sae-lens's mixing buffer does).
    The stream is a function of the seed alone: :attr:`served` counts the batches handed out and
    :meth:`skip` fast-forwards a fresh provider to that point (how a resumed training run continues with the
    exact batches an uninterrupted run would have seen, without storing the mixing buffer in checkpoints).

    Args:
        acts: an acts stage directory or a :class:`ShardReader`.
        batch_size: rows per batch.
        image_range: only PFVs of images with index in ``[lo, hi)`` (hold-out split).
        tokens: only rows of these token kinds (``"patch"``, ``"all"``, ``"cls"``; None: every row).
        exclude_outliers: leave out rows flagged as high-norm outliers at extraction.
        buffer_rows: mixing-buffer size (default: about 256 MB of fp32, at least 8 batches).
        dtype, device: of the served batches.
    """

    def __init__(self, acts: str | Path | ShardReader, batch_size: int = 4096,
                 image_range: tuple[int, int] | None = None, buffer_rows: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tokens: str | None = None,
                 exclude_outliers: bool = False):
        self.reader = acts if isinstance(acts, ShardReader) else ShardReader(acts)
        self.tokens, self.exclude_outliers = tokens, bool(exclude_outliers)
        self.batch_size = int(batch_size)
        self.image_range = image_range
        d = self.reader.d_in
        self.shard_ids = [i for i, s in enumerate(self.reader.shards) if self._shard_in_range(s)]
        available = sum(int(self.reader.shards[i]["n"]) for i in self.shard_ids)  # upper bound in range
        if buffer_rows is None:
            buffer_rows = min(max(8 * batch_size, min(2 ** 20, (256 << 20) // (4 * d))), available)
        self.buffer_rows = max(int(buffer_rows), 2 * self.batch_size)
        self.dtype, self.device = dtype, torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        if not self.shard_ids:
            raise SaeCafeError(f"no activation shards in image range {image_range} at {self.reader.directory}")
        self.epoch = 0
        self.served = 0
        self._order: list[int] = []
        self._buf = torch.empty(0, d, dtype=dtype)
        self._iter = self._batches()

    def _shard_in_range(self, s: dict) -> bool:
        if self.image_range is None:
            return True
        lo, hi = self.image_range
        return s["last_image"] >= lo and s["first_image"] < hi

    def n_rows(self) -> int:
        """PFV rows served from: in the image range, of the token kinds, outliers left out or not (reads the
        shards' provenance columns)."""
        if self.image_range is None and self.tokens in (None, "all") and not self.exclude_outliers:
            return self.reader.n
        total = 0
        for i in self.shard_ids:
            sh = self.reader.load_shard(i)
            m = self.reader.row_mask(sh, self.tokens, self.exclude_outliers, self.image_range)
            total += sh["acts"].shape[0] if m is None else int(m.sum())
        return total

    def _next_shard(self) -> torch.Tensor:
        if not self._order:
            perm = torch.randperm(len(self.shard_ids), generator=self.gen).tolist()
            self._order = [self.shard_ids[i] for i in perm]
            self.epoch += 1
        sh = self.reader.load_shard(self._order.pop())
        acts = sh["acts"]
        m = self.reader.row_mask(sh, self.tokens, self.exclude_outliers, self.image_range)
        if m is not None:
            acts = acts[m]
        return acts.to(self.dtype)

    def _batches(self) -> Iterator[torch.Tensor]:
        bs = self.batch_size
        while True:
            parts = [self._buf]
            rows = self._buf.shape[0]
            while rows < self.buffer_rows:
                a = self._next_shard()
                parts.append(a)
                rows += a.shape[0]
                if self.epoch > 2 and rows == 0:
                    raise SaeCafeError(f"no PFVs in image range {self.image_range} (tokens={self.tokens!r}, "
                                       f"exclude_outliers={self.exclude_outliers}) at {self.reader.directory}")
            buf = torch.cat(parts)
            buf = buf[torch.randperm(buf.shape[0], generator=self.gen)]
            serve = max(bs, (buf.shape[0] // 2) // bs * bs)
            for a in range(0, serve, bs):
                yield buf[a:a + bs]
            self._buf = buf[serve:]

    def skip(self, n_batches: int) -> None:
        """Advance the stream by ``n_batches`` batches without serving them (resume)."""
        for _ in range(int(n_batches)):
            next(self._iter)
        self.served += int(n_batches)

    def __iter__(self) -> ShardDataProvider:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._iter)
        self.served += 1
        return batch.to(self.device, non_blocking=True)
