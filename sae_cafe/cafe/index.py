"""FAISS indexes over L2-normalised vectors with inner-product metric (cosine similarity).

``spec`` is a FAISS ``index_factory`` string: ``"Flat"`` (exact, default), ``"IVF{nlist},Flat"``,
``"HNSW{M}"``; ``"IVF"``/``"HNSW"`` alone pick sizes from the number of vectors. Search-time parameters
(``nprobe``, ``efSearch``) are set from the ``params`` string (FAISS ``ParameterSpace`` syntax). Indexes are
written with ``faiss.write_index`` (FAISS's own binary format, no pickle). GPU FAISS is used for search when
it is installed and a GPU is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, SaeCafeError


def normalize(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, D) → float32 C-contiguous rows of unit L2 norm (zero rows stay zero)."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(n, 1e-12), dtype=np.float32)


def resolve_spec(spec: str, n: int) -> tuple[str, str]:
    """(factory string, default search params) for ``spec`` and ``n`` vectors."""
    s = spec.strip()
    if s.upper() in ("FLAT", "EXACT"):
        return "Flat", ""
    if s.upper() == "IVF":
        nlist = max(1, min(4096, int(4 * math.sqrt(max(n, 1)))))
        s = f"IVF{nlist},Flat"
    elif s.upper() == "HNSW":
        s = "HNSW32"
    if s.upper().startswith("IVF"):
        nlist = int(s[3:].split(",")[0].split("_")[0])
        return s, f"nprobe={max(1, min(nlist, nlist // 8 if nlist >= 64 else nlist))}"
    if s.upper().startswith("HNSW"):
        return s, "efSearch=128"
    return s, ""


@dataclass
class VectorIndex:
    """A FAISS index with its factory string and search params; ids are int64 row ids."""

    index: object
    spec: str
    params: str
    _search_index: object = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (Q, k) and ids (Q, k) (-1 where fewer than k exist)."""
        q = normalize(queries)
        k = max(1, min(k, self.ntotal))
        if self._search_index is None:
            self._search_index = _searchable(self.index)
        return self._search_index.search(q, k)

    def write(self, path: str | Path) -> None:
        import faiss

        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        faiss.write_index(self.index, str(tmp))
        tmp.replace(path)


def _searchable(index):
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # pragma: no cover - GPU only
        return faiss.index_cpu_to_all_gpus(index)
    return index


def make_index(vectors: np.ndarray | torch.Tensor, spec: str = "Flat", ids: np.ndarray | None = None,
               params: str | None = None) -> VectorIndex:
    """Build an inner-product index over the L2-normalised rows of ``vectors`` (N, D).

    Args:
        spec: ``Flat`` | ``IVF`` | ``IVF{nlist},Flat`` | ``HNSW`` | ``HNSW{M}`` | any factory string.
        ids: (N,) int64 ids (default: row numbers).
        params: search parameters, e.g. ``"nprobe=32"``; default from :func:`resolve_spec`.
    """
    import faiss

    x = normalize(vectors)
    n, d = x.shape
    factory, default_params = resolve_spec(spec, n)
    try:
        base = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise SaeCafeError(f"bad FAISS index spec {spec!r} ({factory!r}): {e}. Use Flat, IVF, IVF<nlist>,Flat, "
                           "HNSW or HNSW<M>") from e
    if not base.is_trained:
        nlist = getattr(faiss.extract_index_ivf(base), "nlist", 1) if "IVF" in factory.upper() else 1
        if n < nlist:
            raise SaeCafeError(f"index {factory!r} needs at least {nlist} vectors to train, got {n}; use Flat "
                               "or a smaller IVF nlist")
        base.train(x)  # FAISS k-means is seeded (deterministic)
    index = base if factory.upper().startswith("IVF") else faiss.IndexIDMap2(base)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    index.add_with_ids(x, ids)
    p = default_params if params is None else params
    if p:
        faiss.ParameterSpace().set_index_parameters(index, p)
    return VectorIndex(index, factory, p)


def read_index(path: str | Path, spec: str = "", params: str = "") -> VectorIndex:
    """Read an index written by :meth:`VectorIndex.write` and re-apply its search params."""
    import faiss

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"FAISS index {path} is missing; rebuild the CAFE stage (sae-cafe build-index)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise ArtifactError(f"FAISS index {path} is unreadable ({e}); rebuild the CAFE stage") from e
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return VectorIndex(index, spec, params)


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Mean overlap |exact ∩ approx| / k over queries (both (Q, k))."""
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(exact_ids, approx_ids)]))
