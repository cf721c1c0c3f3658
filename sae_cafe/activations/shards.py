"""Activation shards: PFVs with provenance in sharded safetensors files.

A layer's stage directory ``indexes/<run>/acts/<model>/<layer>/`` holds

- ``shard_00000.safetensors`` …: ``acts`` (n, D) in fp32/fp16/bf16, ``image`` (n,) int64 image index,
  ``pos`` (n, 2) int32 (row, col) on the layer grid (ViT prefix tokens: row = -1, col = token index),
  ``kind`` (n,) uint8 token kind (index into :data:`TOKEN_KINDS`: patch, cls, register, dist) and ``outlier``
  (n,) uint8 (1: a high-norm token flagged at extraction). Shards written before these columns existed read
  as ``kind`` = patch for grid rows and, for prefix rows (row = -1), cls for token 0 and register after it
  (such shards cannot tell a distillation token apart), ``outlier`` = 0;
- ``images.txt``: the image ids, one per line (line i = image index i);
- ``manifest.json`` (kind ``acts``): model, weights hash, layer, d_in, grid, preprocessing, dataset,
  counts, dtype and the shard list.

Written by hand: no library stores sharded activations with per-row provenance for vision models.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts import atomic_write_json, read_manifest
from ..errors import ArtifactError, MismatchError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
CANONICAL_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
IMAGES_FILE = "images.txt"
#: token kinds, in the order of their codes in the shards' ``kind`` column
TOKEN_KINDS = ("patch", "cls", "register", "dist")
#: the ``tokens`` settings (extraction and SAE training) and the token kinds each one takes
TOKEN_SETTINGS = {"patch": ("patch",), "all": TOKEN_KINDS, "cls": ("cls",)}


def check_tokens(tokens: str, where: str = "tokens") -> tuple[str, ...]:
    """The token kinds of a ``tokens`` setting (``"patch"``, ``"all"`` or ``"cls"``); anything else is a
    :class:`MismatchError` naming the setting."""
    if tokens not in TOKEN_SETTINGS:
        raise MismatchError(f"{where}={tokens!r} is not a token setting; use one of "
                            f"{', '.join(repr(t) for t in TOKEN_SETTINGS)}")
    return TOKEN_SETTINGS[tokens]


def kind_codes(kinds: Sequence[str]) -> torch.Tensor:
    """Token kind names → their uint8 codes in the ``kind`` column."""
    bad = [k for k in kinds if k not in TOKEN_KINDS]
    if bad:
        raise MismatchError(f"unknown token kind(s) {bad}; token kinds are {', '.join(TOKEN_KINDS)}")
    return torch.tensor([TOKEN_KINDS.index(k) for k in kinds], dtype=torch.uint8)


def legacy_kinds(pos_N2: torch.Tensor) -> torch.Tensor:
    """``kind`` codes of rows of a shard written without a ``kind`` column, from their positions: grid rows
    are patch tokens, prefix rows (row = -1) cls (token 0) or register (later tokens)."""
    kind = torch.zeros(pos_N2.shape[0], dtype=torch.uint8)
    prefix = pos_N2[:, 0] < 0
    kind[prefix & (pos_N2[:, 1] == 0)] = TOKEN_KINDS.index("cls")
    kind[prefix & (pos_N2[:, 1] != 0)] = TOKEN_KINDS.index("register")
    return kind


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp16"``/``"float16"``/``torch.float16`` … → torch dtype (fp32, fp16, bf16 only)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in CANONICAL_DTYPE:
            raise MismatchError(f"unsupported shard dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise MismatchError(f"unsupported shard dtype {dtype!r}; use one of float32, float16, bfloat16") from None


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_shard(path: str | Path, acts: torch.Tensor, image: torch.Tensor, pos: torch.Tensor,
                kind: torch.Tensor | None = None, outlier: torch.Tensor | None = None) -> None:
    """Write one shard atomically (temp file + rename). ``kind`` defaults to the kinds read from ``pos``
    (:func:`legacy_kinds`), ``outlier`` to 0."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pos = pos.to(torch.int32)
    kind = legacy_kinds(pos) if kind is None else kind
    outlier = torch.zeros(pos.shape[0], dtype=torch.uint8) if outlier is None else outlier
    save_file({"acts": acts.contiguous(), "image": image.to(torch.int64).contiguous(),
               "pos": pos.contiguous(), "kind": kind.to(torch.uint8).contiguous(),
               "outlier": outlier.to(torch.uint8).contiguous()}, str(tmp))
    os.replace(tmp, path)


class ShardWriter:
    """Buffers PFVs of whole image batches and writes a shard once ``shard_size`` rows are buffered.

    A shard always ends at an image boundary, so a shard holds every PFV of images ``[first, last]`` —
    which is what makes resuming exact. Memory: at most ``shard_size`` rows plus one batch.

    Args:
        directory: stage (temporary) directory.
        d_in: PFV dimension D.
        dtype: storage dtype.
        shard_size: rows per shard (a shard may exceed it by less than one batch).
        shards: already finished shards (resume), as recorded by :attr:`shards`.
    """

    def __init__(self, directory: str | Path, d_in: int, dtype: str | torch.dtype = "float32",
                 shard_size: int = 65536, shards: Sequence[dict[str, Any]] = ()):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.d_in = int(d_in)
        self.dtype = parse_dtype(dtype)
        self.shard_size = int(shard_size)
        self.shards: list[dict[str, Any]] = [dict(s) for s in shards]
        self._buf: list[tuple[torch.Tensor, ...]] = []
        self._rows = 0

    @property
    def n_written(self) -> int:
        return sum(s["n"] for s in self.shards)

    @property
    def images_done(self) -> int:
        """Images whose PFVs are all in finished shards (the next image index to write)."""
        if not self.shards:
            return 0
        return int(self.shards[-1].get("images_end", self.shards[-1]["last_image"] + 1))

    def add(self, acts_ND: torch.Tensor, image_N: torch.Tensor, pos_N2: torch.Tensor,
            kind_N: torch.Tensor | None = None, outlier_N: torch.Tensor | None = None, **info: Any) -> bool:
        """Buffer the PFVs of whole images; returns True when a shard was written.

        ``kind_N`` (uint8 codes of :data:`TOKEN_KINDS`; default from ``pos_N2``) and ``outlier_N`` (default 0)
        are the rows' token kinds and high-norm flags. ``info`` (e.g. ``images_end``, the next image index) is
        recorded in the shard entry on flush.
        """
        if acts_ND.ndim != 2 or acts_ND.shape[1] != self.d_in:
            raise MismatchError(f"expected PFVs of shape (n, {self.d_in}), got {tuple(acts_ND.shape)}")
        if acts_ND.shape[0]:
            pos = pos_N2.detach().cpu()
            kind = legacy_kinds(pos) if kind_N is None else kind_N.detach().cpu().to(torch.uint8)
            outlier = (torch.zeros(pos.shape[0], dtype=torch.uint8) if outlier_N is None
                       else outlier_N.detach().cpu().to(torch.uint8))
            self._buf.append((acts_ND.detach().to("cpu", self.dtype), image_N.detach().cpu(), pos, kind, outlier))
            self._rows += acts_ND.shape[0]
        if self._rows >= self.shard_size:
            self.flush(**info)
            return True
        return False

    def flush(self, **info: Any) -> None:
        """Write the buffer (if any) as one shard; ``info`` is stored in its entry."""
        if not self._rows:
            return
        acts, image, pos, kind, outlier = (torch.cat([b[j] for b in self._buf]) for j in range(5))
        i = len(self.shards)
        write_shard(self.directory / shard_name(i), acts, image, pos, kind, outlier)
        self.shards.append({"file": shard_name(i), "n": int(acts.shape[0]), "first_image": int(image.min()),
                            "last_image": int(image.max()), **info})
        self._buf, self._rows = [], 0


class ShardReader:
    """Read a finished ``acts`` stage: batches, random access, provenance.

    Attributes: ``n`` PFVs, ``d_in``, ``layer``, ``model``, ``grid``, ``dtype``, ``manifest``,
    ``image_ids`` (list, index = image index).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, "acts")
        m = self.manifest
        self.shards: list[dict[str, Any]] = m["shards"]
        self.d_in: int = int(m["d_in"])
        self.layer: str = m["layer"]
        self.model: str = m["model"]
        self.weights_hash: str | None = m.get("weights_hash")
        self.grid: tuple[int, int] = tuple(m["grid"])
        self.dtype = parse_dtype(m["dtype"])
        self._offsets = [0]
        for s in self.shards:
            self._offsets.append(self._offsets[-1] + int(s["n"]))
        self.n: int = self._offsets[-1]
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._image_ids: list[str] | None = None

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"ShardReader({str(self.directory)!r}, model={self.model!r}, layer={self.layer!r}, "
                f"n={self.n}, d_in={self.d_in}, shards={len(self.shards)})")

    @property
    def n_images(self) -> int:
        return int(self.manifest["counts"]["n_images"])

    @property
    def image_ids(self) -> list[str]:
        if self._image_ids is None:
            text = (self.directory / IMAGES_FILE).read_text()
            self._image_ids = text.splitlines() if text else []
        return self._image_ids

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard ``i`` as ``{"acts": (n, D), "image": (n,), "pos": (n, 2), "kind": (n,) uint8, "outlier": (n,)
        uint8}`` (last one cached; shards without ``kind``/``outlier`` get them from :func:`legacy_kinds` / 0)."""
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        path = self.directory / self.shards[i]["file"]
        if not path.exists():
            raise ArtifactError(f"shard {path} listed in the manifest is missing; re-run `sae-cafe extract`")
        out = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in ("acts", "image", "pos"):
                    out[k] = f.get_tensor(k)
                names = set(f.keys())
                out["kind"] = f.get_tensor("kind") if "kind" in names else legacy_kinds(out["pos"])
                out["outlier"] = (f.get_tensor("outlier") if "outlier" in names
                                  else torch.zeros(out["pos"].shape[0], dtype=torch.uint8))
        except Exception as e:  # noqa: BLE001 - truncated/corrupt file or missing tensor: same user error
            raise ArtifactError(f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}); delete "
                                f"{self.directory} and re-run `sae-cafe extract`") from e
        if out["acts"].shape[0] != int(self.shards[i]["n"]):
            raise ArtifactError(f"shard {path} holds {out['acts'].shape[0]} rows, the manifest says "
                                f"{self.shards[i]['n']}; delete {self.directory} and re-run `sae-cafe extract`")
        self._cache = (i, out)
        return out

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self.shards)):
            yield self.load_shard(i)

    def row_mask(self, shard: dict[str, torch.Tensor], tokens: str | None = None,
                 exclude_outliers: bool = False, image_range: tuple[int, int] | None = None) -> torch.Tensor | None:
        """(n,) bool: the rows of a loaded ``shard`` of the token kinds of ``tokens`` (``"patch"``, ``"all"``,
        ``"cls"``; None: every row), without flagged outliers (``exclude_outliers``), of images in
        ``image_range`` ``[lo, hi)``; None when every row is kept."""
        m = None
        if tokens is not None and tokens != "all":
            codes = kind_codes(check_tokens(tokens))
            m = torch.isin(shard["kind"], codes)
        if exclude_outliers:
            m = (shard["outlier"] == 0) if m is None else m & (shard["outlier"] == 0)
        if image_range is not None:
            r = (shard["image"] >= image_range[0]) & (shard["image"] < image_range[1])
            m = r if m is None else m & r
        return None if m is None or bool(m.all()) else m

    def iter_batches(self, batch_size: int = 4096, dtype: torch.dtype | None = None,
                     with_provenance: bool = False, tokens: str | None = None,
                     exclude_outliers: bool = False) -> Iterator[Any]:
        """Sequential batches of ``(b, D)`` acts (or ``(acts, image, pos)`` with provenance); ``tokens`` /
        ``exclude_outliers`` keep only those rows (:meth:`row_mask`)."""
        for sh in self.iter_shards():
            m = self.row_mask(sh, tokens, exclude_outliers)
            if m is not None:
                sh = {k: sh[k][m] for k in ("acts", "image", "pos")}
            n = sh["acts"].shape[0]
            for a in range(0, n, batch_size):
                acts = sh["acts"][a:a + batch_size]
                acts = acts.to(dtype) if dtype is not None else acts
                yield (acts, sh["image"][a:a + batch_size], sh["pos"][a:a + batch_size]) \
                    if with_provenance else acts

    def _locate(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.tensor(self._offsets)
        shard = torch.bucketize(idx, offsets[1:], right=True)
        return shard, idx - offsets[shard]

    def _gather(self, idx: int | slice | Sequence[int] | torch.Tensor, key: str) -> torch.Tensor:
        if isinstance(idx, int):
            if not -self.n <= idx < self.n:
                raise IndexError(f"PFV index {idx} out of range for {self.n} PFVs")
            idx %= self.n
            s = bisect.bisect_right(self._offsets, idx) - 1
            return self.load_shard(s)[key][idx - self._offsets[s]]
        if isinstance(idx, slice):
            idx = torch.arange(self.n)[idx]
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"PFV indices out of range for {self.n} PFVs")
        shard, local = self._locate(idx)
        first = self.load_shard(0)[key]
        out = torch.empty((idx.numel(), *first.shape[1:]), dtype=first.dtype)
        for s in shard.unique().tolist():
            m = shard == s
            out[m] = self.load_shard(s)[key][local[m]]
        return out

    def __getitem__(self, idx: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Acts of PFV index/indices (global, over all shards)."""
        return self._gather(idx, "acts")

    def provenance(self, idx: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(…, 3) long ``(image index, row, col)`` of PFV index/indices."""
        img = self._gather(idx, "image").long()
        pos = self._gather(idx, "pos").long()
        return torch.cat([img.unsqueeze(-1), pos], -1)

    def kinds(self, idx: int | slice | Sequence[int] | torch.Tensor) -> list[str] | str:
        """Token kind name(s) (:data:`TOKEN_KINDS`) of PFV index/indices."""
        k = self._gather(idx, "kind")
        return TOKEN_KINDS[int(k)] if k.ndim == 0 else [TOKEN_KINDS[int(c)] for c in k]

    @property
    def tokens(self) -> str:
        """The ``tokens`` setting these shards were extracted with (``"patch"`` for shards that predate it)."""
        cfg = self.manifest.get("config") or {}
        if "tokens" in cfg:
            return str(cfg["tokens"])
        return "all" if cfg.get("include_cls") else "patch"

    @property
    def outlier_report(self) -> dict[str, Any] | None:
        """The high-norm outlier report of the extraction (None for shards that predate it)."""
        return self.manifest.get("outliers")

    def check(self, model: str | None = None, layer: str | None = None, d_in: int | None = None,
              weights_hash: str | None = None) -> None:
        """Raise :class:`MismatchError` (naming both sides) if these shards are not for this model/layer."""
        problems = []
        if model is not None and model != self.model:
            problems.append(f"model {self.model!r} (expected {model!r})")
        if layer is not None and str(layer) != self.layer:
            problems.append(f"layer {self.layer!r} (expected {str(layer)!r})")
        if d_in is not None and int(d_in) != self.d_in:
            problems.append(f"d_in {self.d_in} (expected {int(d_in)})")
        if weights_hash and self.weights_hash and weights_hash != self.weights_hash:
            problems.append(f"weights hash {self.weights_hash[:12]}… (expected {weights_hash[:12]}…)")
        if problems:
            raise MismatchError(f"activation shards at {self.directory} are for " + ", ".join(problems)
                                + "; extract activations for this model and layer with `sae-cafe extract`")


def write_progress(directory: str | Path, progress: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / "progress.json", progress)
