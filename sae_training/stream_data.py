"""The multi-hook data provider of streamed SAE training: PFVs of several layers from the model's forward passes
over an image source, one shuffling buffer per layer, no shard cache.

sae-lens's multi-hook provider (``ActivationsStore.from_config_multi_hook`` → ``multi_hook_concat_split_iter``)
runs a TransformerLens language model over a token dataset; our models are image models behind a
:class:`~sae_cafe.models.ModelAdapter`, so the producer here is ours. The buffer follows sae-lens's
``mixing_buffer`` rule exactly (collect until ``buffer_rows``, shuffle, keep ``mix_fraction`` of the buffer,
serve the rest in batches) but is written by hand because sae-lens's version draws from the global RNG and
keeps its rows inside a generator function, which a checkpoint cannot save. Here every random draw comes from
a per-layer ``torch.Generator`` and the whole state (rows kept for mixing, rows still to serve, generator
states, the position in the image source, the outlier counts) is saved as safetensors + JSON, so a resumed run
continues with exactly the batches an uninterrupted run sees.

**Which rows.** Each layer's rows are the ones the shard path would store for the layer's token setting
(``tokens = "patch" | "all" | "cls"`` of its SAEs): they come from the extraction's own row function
(:func:`sae_cafe.activations.extract.layer_rows`, over one forward pass per image batch:
:func:`sae_cafe.activations.rows.capture_pfv`), which also flags high-norm outlier tokens with the shard path's
rule (:func:`sae_cafe.activations.outliers.flag_outliers`: per image, norm > median + k·max(MAD, 0.1·median) of
the image's patch-token norms; CNN maps are not checked) and counts them in an
:class:`~sae_cafe.activations.outliers.OutlierTally`. With ``outliers="exclude"`` flagged rows are left out
before the draw below; with ``"report"`` they are kept and counted.

Layers with different grids (a CNN's early and late stages) give different numbers of rows per image; each
layer keeps ``rows_per_image`` uniformly drawn rows per image (default: the fewest rows per image among the
layers, so every layer's buffer fills at the same rate and no PFV is computed only to be thrown away). The
draw, and each buffer's shuffles, depend on the seed, the image's index in the stream and the layer's **id**
(``zlib.crc32`` of its name, :func:`layer_key`), not on its place in the list: adding or reordering layers
leaves every other layer's stream unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from sae_cafe.activations.extract import ExtractConfig
from sae_cafe.activations.extract import layer_rows as shard_rows  # the shard path's rows, reused
from sae_cafe.activations.outliers import OutlierTally, prefix_kinds
from sae_cafe.activations.rows import capture_pfv, prefix_index
from sae_cafe.activations.shards import check_tokens
from sae_cafe.errors import SaeCafeError
from sae_cafe.image_source import ImageSource
from sae_cafe.models import PFVBatch

#: version of the provider's checkpoint state (2: layers keyed by id, token kinds, outlier counts)
STATE_FORMAT = 2


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


def layer_key(layer: str) -> int:
    """A layer's stable 32-bit id for its random draws: ``zlib.crc32`` of its name (not Python's ``hash()``,
    which changes between processes)."""
    return zlib.crc32(str(layer).encode())


def draw_seed(seed: int, image: int, key: int) -> int:
    """Seed (32 bits: torch's CPU generator ignores higher bits) of the row draw of stream image ``image`` at
    the layer with :func:`layer_key` ``key``; the layer's buffer generator uses ``image = -1``."""
    return zlib.crc32(f"{int(seed)}/{int(image)}/{int(key)}".encode())


def draw_rows(image_n: torch.Tensor, n_images: int, k: int, seed: int, first_image: int, key: int,
              keep_n: torch.Tensor | None = None) -> torch.Tensor | None:
    """Indices (sorted) of the rows kept from one forward batch: per image at most ``k`` rows, uniformly drawn
    among its rows (``keep_n`` (n,) bool: among those marked) — None when every row is kept.

    Args:
        image_n: (n,) image offset (0 … ``n_images`` − 1) of each row; each image's rows are contiguous.
        k: rows per image. seed, first_image, key: the draw of image ``first_image + i`` uses
            :func:`draw_seed` ``(seed, first_image + i, key)``.
    """
    counts = torch.bincount(image_n.long().cpu(), minlength=n_images)
    if keep_n is None and (not counts.numel() or int(counts.max()) <= k):
        return None
    starts = counts.cumsum(0) - counts
    out = []
    for i in range(n_images):
        cand = torch.arange(int(starts[i]), int(starts[i] + counts[i]))
        if keep_n is not None:
            cand = cand[keep_n[cand].cpu()]
        if cand.numel() > k:
            g = torch.Generator().manual_seed(draw_seed(seed, first_image + i, key))
            cand = cand[torch.randperm(cand.numel(), generator=g)[:k].sort().values]
        out.append(cand)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def select_rows(n_pos: int, k: int, seed: int, first_image: int, n_images: int, key: int
                ) -> torch.Tensor | None:
    """Sorted row indices (n_images, k) kept per image of ``n_pos`` rows each (None: all kept); the draw of
    :func:`draw_rows`. ``key``: the layer's :func:`layer_key`."""
    if k >= n_pos:
        return None
    idx = draw_rows(torch.arange(n_images).repeat_interleave(n_pos), n_images, k, seed, first_image, key)
    return (idx.view(n_images, k) - (torch.arange(n_images) * n_pos)[:, None]) if idx is not None else None


def rows_per_image_of(adapter: Any, n_pos: int, tokens: str) -> int:
    """Rows per image of a layer with ``n_pos`` grid positions under a ``tokens`` setting, as the shard path
    stores them: patch tokens, plus the prefix tokens (``"all"``), or the class tokens only (``"cls"``; a model
    without a class token is an error, as at extraction). CNN maps have grid positions only. The prefix tokens
    kept are :func:`sae_cafe.activations.rows.prefix_index`'s."""
    check_tokens(tokens, "SAE tokens")
    n_prefix = len(prefix_kinds(adapter)) if getattr(adapter, "kind", None) == "tokens" else 0
    kept = int(prefix_index(adapter, n_prefix, tokens).numel())
    if tokens == "cls":
        if not kept:
            raise SaeCafeError(f"tokens='cls' but {adapter.name} has no class token; use tokens='patch'")
        return kept
    return n_pos + kept


class StreamProvider:
    """Infinite ``{layer: (batch_size, d_in)}`` batches (sae-lens's ``MultiHookDataProvider``) from the model's
    forward passes over ``images``.

    Args:
        adapter: the model (a :class:`~sae_cafe.models.ModelAdapter`). layers: canonical layer ids.
        images: anything :class:`~sae_cafe.image_source.ImageSource` takes. A random-access source is read
            again from its start when it ends (``epoch`` counts the passes); a one-pass stream that ends
            raises :class:`SaeCafeError`.
        batch_size: rows per training batch. buffer_rows, mix_fraction: of each layer's :class:`MixingBuffer`.
        image_batch_size: images per forward pass. rows_per_image: rows kept per image and layer (default:
            the fewest rows per image among ``layers`` under their token settings). seed: of the buffers and
            the row draws (per layer id, :func:`layer_key`).
        device: where the buffers live and batches are served.
        tokens: ``{layer: "patch" | "all" | "cls"}`` — the token kinds of the layer's rows (default
            ``"patch"``), as :class:`~sae_training.train.SAETrainConfig` ``tokens``.
        exclude_outliers: layers whose high-norm outlier rows are left out (``outliers="exclude"``); the others
            keep them and count them (``"report"``).
        outlier_k: the outlier rule's k (:func:`~sae_cafe.activations.outliers.flag_outliers`; the extraction's
            ``outlier_k``).
    """

    def __init__(self, adapter: Any, layers: Sequence[str], images: Any, batch_size: int, buffer_rows: int,
                 mix_fraction: float = 0.5, image_batch_size: int = 32, rows_per_image: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu", tokens: Mapping[str, str] | None = None,
                 exclude_outliers: Sequence[str] = (), outlier_k: float = 10.0):
        self.adapter, self.layers = adapter, list(layers)
        self.source = ImageSource(images)
        if not outlier_k > 0:
            raise SaeCafeError(f"outlier_k must be > 0, got {outlier_k}")
        unknown = sorted(set(tokens or {}) - set(self.layers)) + sorted(set(exclude_outliers) - set(self.layers))
        if unknown:
            raise SaeCafeError(f"token/outlier settings for layers {unknown} that are not streamed ({self.layers})")
        self.tokens = {n: (tokens or {}).get(n, "patch") for n in self.layers}
        self.exclude = {n: n in set(exclude_outliers) for n in self.layers}
        self.outlier_k = float(outlier_k)
        infos = adapter.layers()
        self.n_pos = {n: int(infos[n].grid[0] * infos[n].grid[1]) for n in self.layers}
        self.n_rows = {n: rows_per_image_of(adapter, self.n_pos[n], self.tokens[n]) for n in self.layers}
        self.d_in = {n: int(infos[n].channels) for n in self.layers}
        self.rows_per_image = int(rows_per_image or min(self.n_rows.values()))
        if self.rows_per_image < 1:
            raise SaeCafeError(f"rows_per_image must be ≥ 1, got {rows_per_image}")
        self.image_batch_size, self.seed = int(image_batch_size), int(seed)
        self.keys = {n: layer_key(n) for n in self.layers}
        self._xcfg = {n: ExtractConfig(tokens=self.tokens[n], outlier_k=self.outlier_k) for n in self.layers}
        self.buffers = {n: MixingBuffer(self.d_in[n], buffer_rows, batch_size, mix_fraction,
                                        seed=draw_seed(self.seed, -1, self.keys[n]), device=device)
                        for n in self.layers}
        self.tallies = {n: OutlierTally() for n in self.layers}
        self.counts = {n: dict.fromkeys(("rows_of_kinds", "flagged_of_kinds", "pushed", "pushed_flagged",
                                         "excluded"), 0) for n in self.layers}
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

    def layer_rows(self, layer: str, act: torch.Tensor | PFVBatch, first_image: int) -> torch.Tensor:
        """The rows (n, d_in) of one layer output (raw or its :class:`PFVBatch`; B images from stream index
        ``first_image``) that go into the layer's buffer: the shard path's rows of the layer's token kinds,
        outliers flagged (and counted) by its rule, left out under ``exclude``, at most ``rows_per_image`` drawn
        per image."""
        B = (act.pfv if isinstance(act, PFVBatch) else act).shape[0]
        rows, img, _pos, _kind, flag = shard_rows(self.adapter, act, first_image, self._xcfg[layer], None,
                                                  self.tallies[layer], first_image)
        flag = flag.bool()
        c = self.counts[layer]
        c["rows_of_kinds"] += rows.shape[0]
        c["flagged_of_kinds"] += int(flag.sum())
        keep = ~flag if self.exclude[layer] and bool(flag.any()) else None
        idx = draw_rows(img - first_image, B, self.rows_per_image, self.seed, first_image, self.keys[layer], keep)
        if idx is not None:
            rows, flag = rows[idx.to(rows.device)], flag[idx]
        c["pushed"] += rows.shape[0]
        if self.exclude[layer]:
            c["excluded"] += int(keep.numel() - keep.sum()) if keep is not None else 0
        else:
            c["pushed_flagged"] += int(flag.sum())
        return rows

    @torch.no_grad()
    def _pull(self) -> None:
        """One forward pass over the next image batch; its rows go into every layer's buffer."""
        import time

        if self._it is None:
            self._it = self._image_batches()
        ids, x, nxt = next(self._it)
        t0 = time.perf_counter()
        acts = capture_pfv(self.adapter, x, self.layers) if ids else {}
        for n in self.layers:
            if not ids:
                break
            self.buffers[n].push(self.layer_rows(n, acts[n], self.images_seen))
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

    # ----- what was seen --------------------------------------------------------------------------------------
    def outlier_record(self, layer: str) -> dict[str, Any]:
        """The layer's token setting, outlier report and row counts so far, for the SAE manifest:
        ``{"tokens", "outliers", "outlier_report", "training_rows", "notes"}``. ``outlier_report`` has the
        shard path's form (the acts manifest's ``outliers``: rule, k, counts over every token of every image
        read, prefix tokens included); ``training_rows`` counts the rows of the layer's token kinds read
        (``of_kinds``, ``flagged_of_kinds``) and pushed into its buffer (``n``; ``outliers``: flagged among
        them; ``outliers_excluded``: flagged rows left out)."""
        c, report = self.counts[layer], self.tallies[layer].report(self.outlier_k)
        exclude = self.exclude[layer]
        rows = {"n": c["pushed"], "outliers": c["pushed_flagged"], "outliers_excluded": c["excluded"],
                "of_kinds": c["rows_of_kinds"], "flagged_of_kinds": c["flagged_of_kinds"],
                "images": self.images_seen, "rows_per_image": self.rows_per_image,
                "what": "rows pushed into the layer's shuffling buffer (each SAE trains on steps × batch_size "
                        "of them); images counted once per pass over the source"}
        notes = []
        if not report["checked"]:
            notes.append(f"{layer}: tokens not checked for high-norm outliers ({report['n_tokens_checked']} checked;"
                         " CNN maps and grids under 8 positions are not checked)")
        elif exclude and c["excluded"]:
            notes.append(f"{layer}: left out {c['excluded']} high-norm outlier rows (outliers='exclude')")
        elif not exclude and c["pushed_flagged"]:
            notes.append(f"{layer}: trained on {c['pushed_flagged']} high-norm outlier rows of {c['pushed']} "
                         f"(norm up to {report['norm_ratio']['max']:.1f}× the image's median); set "
                         "outliers='exclude' to leave them out")
        return {"tokens": self.tokens[layer], "outliers": "exclude" if exclude else "report",
                "outlier_report": report, "training_rows": rows, "notes": notes}

    # ----- checkpoint state -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) that :meth:`load_state` restores: buffers, generators, source position, counts."""
        tensors: dict[str, torch.Tensor] = {}
        for n, b in self.buffers.items():
            tensors.update(b.state_tensors(f"layer.{n}."))
        info = {"format": STATE_FORMAT, "layers": self.layers, "epoch": self.epoch, "next_item": self.next_item,
                "images_seen": self.images_seen, "served": self.served, "rows_per_image": self.rows_per_image,
                "tokens": self.tokens, "exclude_outliers": [n for n in self.layers if self.exclude[n]],
                "outlier_k": self.outlier_k, "tallies": {n: t.to_json() for n, t in self.tallies.items()},
                "counts": self.counts}
        return tensors, info

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        if info.get("format") != STATE_FORMAT:
            raise SaeCafeError(f"checkpointed stream state has format {info.get('format', 1)}, this sae-cafe reads "
                               f"format {STATE_FORMAT} (layer streams seeded by layer id, token kinds, outlier "
                               "counts): an older run's checkpoint cannot be resumed; restart it with resume=False "
                               "(CLI --no-resume) or delete its .stream.tmp folder")
        mine = {"layers": self.layers, "rows_per_image": self.rows_per_image, "tokens": self.tokens,
                "exclude_outliers": [n for n in self.layers if self.exclude[n]], "outlier_k": self.outlier_k}
        diff = [k for k, v in mine.items() if info.get(k) != v]
        if diff:
            raise SaeCafeError("checkpointed stream does not match this one in "
                               + ", ".join(f"{k} ({info.get(k)!r} vs {mine[k]!r})" for k in diff))
        for n, b in self.buffers.items():
            b.load_state_tensors(tensors, f"layer.{n}.")
        self.tallies = {n: OutlierTally.from_json(info["tallies"][n]) for n in self.layers}
        self.counts = {n: dict(info["counts"][n]) for n in self.layers}
        self.epoch, self.next_item = int(info["epoch"]), int(info["next_item"])
        self.images_seen, self.served = int(info["images_seen"]), int(info["served"])
        self._it = None


__all__ = ["STATE_FORMAT", "MixingBuffer", "StreamProvider", "draw_rows", "draw_seed", "layer_key",
           "rows_per_image_of", "select_rows"]
