"""The multi-hook data provider of streamed SAE training: PFVs of several layers from the model's forward passes
over an image source, one shuffling buffer per layer, no shard cache.

sae-lens's multi-hook provider (``ActivationsStore.from_config_multi_hook`` → ``multi_hook_concat_split_iter``)
runs a TransformerLens language model over a token dataset; our models are image models behind a
:class:`~sae_cafe.models.ModelAdapter`, so the producer here is ours. The buffer follows sae-lens's
``mixing_buffer`` rule exactly (collect until ``buffer_rows``, shuffle, keep ``mix_fraction`` of the buffer,
serve the rest in batches) but is written by hand because sae-lens's version draws from the global RNG and
keeps its rows inside a generator function, which a checkpoint cannot save. Here every random draw comes from
a per-layer ``torch.Generator`` and the whole state (rows kept for mixing, rows still to serve, generator
states, the position in the image source) is saved as safetensors + JSON, so a resumed run continues with
exactly the batches an uninterrupted run sees.

Layers with different grids (a CNN's early and late stages) give different numbers of PFVs per image; each
layer keeps ``rows_per_image`` uniformly drawn positions per image (default: the smallest grid among the
layers, so every layer's buffer fills at the same rate and no PFV is computed only to be thrown away). The
draw is a function of the seed, the image's index in the stream and the layer's index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sae_cafe.errors import SaeCafeError
from sae_cafe.image_source import ImageSource


class MixingBuffer:
    """A shuffling buffer of PFV rows of one layer (sae-lens ``mixing_buffer`` semantics, checkpointable).

    Args:
        d_in: row width. buffer_rows: rows collected before a shuffle. batch_size: rows per served batch.
        mix_fraction: fraction of ``buffer_rows`` kept back for mixing with the next rows.
        seed: seed of this buffer's generator. device: where rows are kept and served.
    """

    def __init__(self, d_in: int, buffer_rows: int, batch_size: int, mix_fraction: float = 0.5, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if buffer_rows < batch_size:
            raise SaeCafeError(f"buffer_rows ({buffer_rows}) must be at least batch_size ({batch_size})")
        if not 0.0 <= mix_fraction < 1.0:
            raise SaeCafeError(f"mix_fraction must be in [0, 1), got {mix_fraction}")
        self.d_in, self.buffer_rows, self.batch_size = int(d_in), int(buffer_rows), int(batch_size)
        self.mix_fraction = float(mix_fraction)
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.parts: list[torch.Tensor] = []  # rows pushed since the last shuffle (and the rows kept back)
        self.n_parts = 0
        self.serving = torch.empty(0, self.d_in, device=self.device)  # shuffled rows being served
        self.served = 0  # rows of ``serving`` already handed out

    def push(self, rows_ND: torch.Tensor) -> None:
        """Add rows (N, d_in); when ``buffer_rows`` are collected and nothing is left to serve, shuffle."""
        self.parts.append(rows_ND.detach().to(self.device, torch.float32))
        self.n_parts += rows_ND.shape[0]
        if self.n_parts >= self.buffer_rows and not self.ready():
            self._shuffle()

    def _shuffle(self) -> None:
        buf = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        if self.mix_fraction > 0:
            buf = buf[torch.randperm(buf.shape[0], generator=self.gen).to(buf.device)]
        keep = int(self.buffer_rows * self.mix_fraction)
        n_batches = max(1, (buf.shape[0] - keep) // self.batch_size)
        cut = n_batches * self.batch_size
        self.serving, self.served = buf[:cut], 0
        self.parts = [buf[cut:]]
        self.n_parts = buf.shape[0] - cut

    def ready(self) -> bool:
        """True when a batch can be served without new rows."""
        return self.serving.shape[0] - self.served >= self.batch_size

    def pop(self) -> torch.Tensor:
        """The next (batch_size, d_in) batch (call :meth:`ready` first)."""
        if not self.ready():
            raise SaeCafeError("MixingBuffer.pop on an empty buffer; push rows first")
        a = self.served
        self.served += self.batch_size
        return self.serving[a:a + self.batch_size]

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The buffer's rows and generator state as tensors (safetensors-ready, keys start with ``prefix``)."""
        kept = torch.cat(self.parts) if self.parts else torch.empty(0, self.d_in)
        return {f"{prefix}kept": kept.detach().cpu().contiguous(),
                f"{prefix}serving": self.serving[self.served:].detach().cpu().contiguous(),
                f"{prefix}gen": self.gen.get_state().clone()}

    def load_state_tensors(self, t: dict[str, torch.Tensor], prefix: str) -> None:
        kept = t[f"{prefix}kept"].to(self.device)
        self.parts, self.n_parts = ([kept] if kept.shape[0] else []), kept.shape[0]
        self.serving, self.served = t[f"{prefix}serving"].to(self.device), 0
        self.gen.set_state(t[f"{prefix}gen"])


def select_rows(n_pos: int, k: int, seed: int, first_image: int, n_images: int, layer_index: int
                ) -> torch.Tensor | None:
    """Sorted position indices (n_images, k) kept per image (None: all ``n_pos`` kept). Deterministic in
    (seed, image index in the stream, layer index)."""
    if k >= n_pos:
        return None
    rows = []
    for i in range(n_images):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + first_image + i) * 101 + layer_index)
        rows.append(torch.randperm(n_pos, generator=g)[:k].sort().values)
    return torch.stack(rows)


class StreamProvider:
    """Infinite ``{layer: (batch_size, d_in)}`` batches (sae-lens's ``MultiHookDataProvider``) from the model's
    forward passes over ``images``.

    Args:
        adapter: the model (a :class:`~sae_cafe.models.ModelAdapter`). layers: canonical layer ids.
        images: anything :class:`~sae_cafe.image_source.ImageSource` takes. A random-access source is read
            again from its start when it ends (``epoch`` counts the passes); a one-pass stream that ends
            raises :class:`SaeCafeError`.
        batch_size: rows per training batch. buffer_rows, mix_fraction: of each layer's :class:`MixingBuffer`.
        image_batch_size: images per forward pass. rows_per_image: PFVs kept per image and layer (default:
            the smallest grid among ``layers``). seed: of the buffers and the position draws.
        device: where the buffers live and batches are served.
    """

    def __init__(self, adapter: Any, layers: Sequence[str], images: Any, batch_size: int, buffer_rows: int,
                 mix_fraction: float = 0.5, image_batch_size: int = 32, rows_per_image: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.adapter, self.layers = adapter, list(layers)
        self.source = ImageSource(images)
        infos = adapter.layers()
        self.n_pos = {n: int(infos[n].grid[0] * infos[n].grid[1]) for n in self.layers}
        self.d_in = {n: int(infos[n].channels) for n in self.layers}
        self.rows_per_image = int(rows_per_image or min(self.n_pos.values()))
        if self.rows_per_image < 1:
            raise SaeCafeError(f"rows_per_image must be ≥ 1, got {rows_per_image}")
        self.image_batch_size, self.seed = int(image_batch_size), int(seed)
        self.buffers = {n: MixingBuffer(self.d_in[n], buffer_rows, batch_size, mix_fraction,
                                        seed=self.seed * 7919 + i, device=device)
                        for i, n in enumerate(self.layers)}
        self.epoch, self.next_item, self.images_seen, self.served = 0, 0, 0, 0
        self.forward_seconds = 0.0
        self._it: Iterator | None = None

    # ----- producing ------------------------------------------------------------------------------------------
    def _image_batches(self) -> Iterator[tuple[list[str], torch.Tensor, int]]:
        while True:
            got = False
            for ids, x, nxt in self.source.batches(self.adapter, self.image_batch_size, start=self.next_item):
                got = True
                yield ids, x, nxt
            if self.source.total is None:
                raise SaeCafeError(f"the image stream {self.source.description} ended after {self.images_seen} "
                                   "images; streamed training needs more tokens than the stream holds: pass a "
                                   "random-access source (folder, list, tensor; it is read again) or fewer steps")
            if not got and self.next_item == 0:
                raise SaeCafeError(f"no readable images in {self.source.description}")
            self.epoch, self.next_item = self.epoch + 1, 0

    @torch.no_grad()
    def _pull(self) -> None:
        """One forward pass over the next image batch; its PFVs go into every layer's buffer."""
        import time

        if self._it is None:
            self._it = self._image_batches()
        ids, x, nxt = next(self._it)
        t0 = time.perf_counter()
        acts = self.adapter.capture(x, self.layers, stop_early=True) if ids else {}
        for li, n in enumerate(self.layers):
            if not ids:
                break
            pfv = self.adapter.to_pfv(acts[n]).pfv  # (B, N, D)
            B, N, D = pfv.shape
            sel = select_rows(N, self.rows_per_image, self.seed, self.images_seen, B, li)
            if sel is not None:
                pfv = pfv.gather(1, sel.to(pfv.device)[..., None].expand(B, sel.shape[1], D))
            self.buffers[n].push(pfv.reshape(-1, D))
        self.forward_seconds += time.perf_counter() - t0
        self.images_seen += len(ids)
        self.next_item = nxt

    def __iter__(self) -> StreamProvider:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while not all(b.ready() for b in self.buffers.values()):
            self._pull()
        self.served += 1
        return {n: b.pop() for n, b in self.buffers.items()}

    # ----- checkpoint state -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) that :meth:`load_state` restores: buffers, generators, source position."""
        tensors: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.buffers.values()):
            tensors.update(b.state_tensors(f"layer{i}."))
        info = {"layers": self.layers, "epoch": self.epoch, "next_item": self.next_item,
                "images_seen": self.images_seen, "served": self.served, "rows_per_image": self.rows_per_image}
        return tensors, info

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        if info["layers"] != self.layers or info["rows_per_image"] != self.rows_per_image:
            raise SaeCafeError(f"checkpointed stream of layers {info['layers']} does not match {self.layers}")
        for i, b in enumerate(self.buffers.values()):
            b.load_state_tensors(tensors, f"layer{i}.")
        self.epoch, self.next_item = int(info["epoch"]), int(info["next_item"])
        self.images_seen, self.served = int(info["images_seen"]), int(info["served"])
        self._it = None


__all__ = ["MixingBuffer", "StreamProvider", "select_rows"]
