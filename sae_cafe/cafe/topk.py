"""Streaming top-k mining of SAE latents over a dataset, exact under a total order, mergeable, resumable.

For every latent ``s`` the miner keeps its ``K`` best exemplars ``(activation, image id, position)`` under
the total order (activation desc, image id asc, position asc); only firing PFVs (activation > 0) are
exemplars, empty slots hold ``-inf`` / ``-1``. Beside the top-k it keeps a uniform sample of each latent's
firing PFVs (a bottom-R hash sketch, for the lower activation quantiles) and firing statistics. Memory is
O(S·(K+R)) whatever the dataset size.

Written by hand: no library mines exact, tie-stable, mergeable per-column top-k over a stream
(``torch.topk`` is neither tie-stable nor mergeable by itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..errors import ArtifactError, MismatchError, NonFiniteError

EMPTY_PRIO = 1 << 40  # larger than every sketch priority (31-bit hashes)
_M31 = (1 << 31) - 1


def _order_key(image: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Secondary sort key (image id, position) as one int64; empty slots (image < 0) sort last."""
    key = image * (1 << 22) + pos
    return torch.where(image < 0, torch.full_like(key, torch.iinfo(torch.int64).max), key)


def lexsort_select(primary: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, k: int,
                   descending: bool = True) -> torch.Tensor:
    """Indices (S, k) of the first ``k`` per row under (primary, image asc, pos asc).

    Args:
        primary: (S, M) float or int key; sorted descending (activations) or ascending (priorities).
        image, pos: (S, M) int64 tie breakers.
    """
    o = torch.argsort(_order_key(image, pos), dim=1, stable=True)
    p = primary.gather(1, o)
    o2 = torch.argsort(-p if descending else p, dim=1, stable=True)
    return o.gather(1, o2)[:, :k]


def sketch_priority(latent: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Deterministic 31-bit hash of (latent, image, position): the priority of the uniform sample sketch.

    All products stay below 2**63 (no int64 overflow).
    """
    h = ((latent * 73856093) ^ (image * 19349663) ^ (pos * 83492791) ^ (seed * 2654435761)) & _M31
    for _ in range(2):
        h = (h * 0x45D9F3B) & _M31
        h = h ^ (h >> 16)
    return h


@dataclass
class TopKState:
    """Mining state (all CPU tensors). S latents, K top slots, R sample slots.

    Attributes:
        values/image/pos: (S, K) top-k activations (desc), image ids, flat grid positions (row*w+col).
        s_values/s_image/s_pos/s_prio: (S, R) uniform sample of firing PFVs (bottom-R hash priorities).
        n_fire: (S,) firing PFVs; n_img_fire: (S,) images where it fires; sum_act: (S,) float64; max_act: (S,).
        n_pfv / n_images: () PFVs / images seen.
    """

    values: torch.Tensor
    image: torch.Tensor
    pos: torch.Tensor
    s_values: torch.Tensor
    s_image: torch.Tensor
    s_pos: torch.Tensor
    s_prio: torch.Tensor
    n_fire: torch.Tensor
    n_img_fire: torch.Tensor
    sum_act: torch.Tensor
    max_act: torch.Tensor
    n_pfv: torch.Tensor
    n_images: torch.Tensor

    @classmethod
    def empty(cls, n_latents: int, k: int, n_sample: int = 0) -> TopKState:
        S = n_latents

        def slots(m: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((S, m), fill, dtype=dtype)

        return cls(slots(k, float("-inf"), torch.float32), slots(k, -1, torch.long), slots(k, -1, torch.long),
                   slots(n_sample, 0.0, torch.float32), slots(n_sample, -1, torch.long),
                   slots(n_sample, -1, torch.long), slots(n_sample, EMPTY_PRIO, torch.long),
                   torch.zeros(S, dtype=torch.long), torch.zeros(S, dtype=torch.long),
                   torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float32),
                   torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long))

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def n_sample(self) -> int:
        return self.s_values.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).contiguous() for f in fields(self)}

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Atomically write the state as safetensors (``meta`` JSON in the header)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        save_file(self.tensors(), str(tmp), metadata={"meta": json.dumps(meta or {}, sort_keys=True)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> tuple[TopKState, dict]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            return cls(**t), meta
        except Exception as e:  # noqa: BLE001 - any decoding failure is the same user error
            raise ArtifactError(f"cannot read top-k state {path}: {e}; delete it to restart mining") from e


class TopKMiner:
    """Stream (B, N, S) latent activations into a :class:`TopKState`.

    Args:
        n_latents: S. k: exemplars per latent. n_sample: R uniform-sample slots (0 = none). seed: sketch seed.
        distinct_images: top-k over images (each image's max over positions, first argmax position; spec §3.2)
            instead of over all (image, position) pairs. The sample and statistics are over all PFVs.
    """

    def __init__(self, n_latents: int, k: int, n_sample: int = 0, seed: int = 0,
                 state: TopKState | None = None, distinct_images: bool = False):
        self.seed = seed
        self.distinct_images = distinct_images
        self.state = state if state is not None else TopKState.empty(n_latents, k, n_sample)
        if self.state.values.shape[0] != n_latents:
            raise MismatchError(f"top-k state has {self.state.values.shape[0]} latents, the SAE {n_latents}")

    @torch.no_grad()
    def update(self, acts_BNS: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Add a batch: ``acts_BNS`` (B, N, S) latent activations of B images at N grid positions each,
        ``image_ids`` (B,) unique int64 ids (dataset order)."""
        st = self.state
        acts = acts_BNS.detach().float().cpu()
        B, N, S = acts.shape
        if st.values.shape[0] != S:
            raise MismatchError(f"activations have {S} latents, the miner {st.values.shape[0]}")
        if not torch.isfinite(acts).all():
            raise NonFiniteError(f"non-finite SAE activations in images {image_ids.tolist()[:8]}; check the "
                                 "SAE and model weights")
        ids = torch.as_tensor(image_ids, dtype=torch.long).cpu()
        order = torch.argsort(ids, stable=True)  # rows in (image id, position) order → stable ties
        acts, ids = acts[order], ids[order]
        A = acts.reshape(B * N, S)
        img = ids.repeat_interleave(N)
        pos = torch.arange(N).repeat(B)
        fire = A > 0
        st.n_fire += fire.sum(0)
        st.n_img_fire += (acts > 0).any(1).sum(0)
        st.sum_act += A.clamp(min=0).sum(0, dtype=torch.float64)
        st.max_act = torch.maximum(st.max_act, A.max(0).values)
        st.n_pfv += B * N
        st.n_images += B
        # --- top-k: exact candidate set per column, ties at the threshold resolved in row order
        if self.distinct_images:
            Ac, arg = acts.max(1)  # (B, S): each image's best position (first of equal maxima)
            img_c, pos_c = ids[:, None].expand(B, S), arg
        else:
            Ac, img_c, pos_c = A, img[:, None].expand(B * N, S), pos[:, None].expand(B * N, S)
        M = Ac.shape[0]
        k = min(st.k, M)
        tv, ti = torch.topk(Ac, k, dim=0)  # (k, S)
        thr = tv[-1]
        ties = ((Ac >= thr).sum(0) > k) & (thr > 0)
        for col in ties.nonzero().flatten().tolist():
            ti[:, col] = torch.argsort(-Ac[:, col], stable=True)[:k]
        cv = Ac.gather(0, ti).T  # (S, k)
        ok = cv > 0
        cv = torch.where(ok, cv, torch.full_like(cv, float("-inf")))
        ci = torch.where(ok, img_c.gather(0, ti).T, torch.full_like(cv, -1, dtype=torch.long))
        cp = torch.where(ok, pos_c.gather(0, ti).T, torch.full_like(cv, -1, dtype=torch.long))
        self._merge_top(cv, ci, cp)
        # --- uniform sample of firing PFVs: keep the R smallest hash priorities
        if st.n_sample:
            lat = torch.arange(S)[None, :]
            prio = sketch_priority(lat, img[:, None], pos[:, None], self.seed)  # (BN, S)
            prio = torch.where(fire, prio, torch.full_like(prio, EMPTY_PRIO))
            r = min(st.n_sample, B * N)
            pv, pi = torch.topk(prio, r, dim=0, largest=False)  # hash ties are resolved by lexsort below
            okp = pv < EMPTY_PRIO
            sv = torch.where(okp, A.gather(0, pi), torch.zeros_like(pv, dtype=torch.float32)).T
            si = torch.where(okp, img[pi], torch.full_like(pv, -1)).T
            sp = torch.where(okp, pos[pi], torch.full_like(pv, -1)).T
            self._merge_sample(sv, si, sp, pv.T)

    def _merge_top(self, cv: torch.Tensor, ci: torch.Tensor, cp: torch.Tensor) -> None:
        st = self.state
        v = torch.cat([st.values, cv], 1)
        i = torch.cat([st.image, ci], 1)
        p = torch.cat([st.pos, cp], 1)
        sel = lexsort_select(v, i, p, st.k)
        st.values, st.image, st.pos = v.gather(1, sel), i.gather(1, sel), p.gather(1, sel)

    def _merge_sample(self, sv, si, sp, spr) -> None:
        st = self.state
        v = torch.cat([st.s_values, sv], 1)
        i = torch.cat([st.s_image, si], 1)
        p = torch.cat([st.s_pos, sp], 1)
        pr = torch.cat([st.s_prio, spr], 1)
        sel = lexsort_select(pr, i, p, st.n_sample, descending=False)
        st.s_values, st.s_image, st.s_pos, st.s_prio = (t.gather(1, sel) for t in (v, i, p, pr))


def merge_topk(states: list[TopKState]) -> TopKState:
    """Exact merge of states mined on disjoint image sets (shards or ranks): equals one miner over all."""
    if not states:
        raise ValueError("merge_topk needs at least one state")
    S, K, R = states[0].values.shape[0], states[0].k, states[0].n_sample
    for s in states:
        if (s.values.shape[0], s.k, s.n_sample) != (S, K, R):
            raise MismatchError(f"cannot merge top-k states of shapes {(S, K, R)} and "
                                f"{(s.values.shape[0], s.k, s.n_sample)}: mine with the same SAE, k, sample")
    miner = TopKMiner(S, K, R)  # merging is the same for both top-k modes
    out = miner.state
    for s in states:
        miner._merge_top(s.values, s.image, s.pos)
        if R:
            miner._merge_sample(s.s_values, s.s_image, s.s_pos, s.s_prio)
        out.n_fire += s.n_fire
        out.n_img_fire += s.n_img_fire
        out.sum_act += s.sum_act
        out.max_act = torch.maximum(out.max_act, s.max_act)
        out.n_pfv += s.n_pfv
        out.n_images += s.n_images
    return out


def gather_topk(state: TopKState, group=None) -> TopKState:
    """All-gather a state across ``torch.distributed`` ranks (tensors only, no pickling) and merge exactly.

    Every rank returns the same merged state. Call after each rank mined its own images.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name, t in state.tensors().items():
        bufs = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(bufs, t, group=group)
        for r in range(world):
            parts[r][name] = bufs[r]
    return merge_topk([TopKState(**p) for p in parts])


def brute_force_topk(acts_BNS: torch.Tensor, image_ids: torch.Tensor, k: int, distinct_images: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: sort every (activation, image, position) triple per latent (small data only).

    Returns (S, k) values, image ids and positions in the miner's layout (padding -inf / -1).
    """
    B, N, S = acts_BNS.shape
    out_v = torch.full((S, k), float("-inf"))
    out_i = torch.full((S, k), -1, dtype=torch.long)
    out_p = torch.full((S, k), -1, dtype=torch.long)
    ids = [int(i) for i in image_ids]
    for s in range(S):
        triples = [(-float(acts_BNS[b, n, s]), ids[b], n) for b in range(B) for n in range(N)
                   if acts_BNS[b, n, s] > 0]
        triples.sort()
        if distinct_images:
            seen: set[int] = set()
            triples = [t for t in triples if not (t[1] in seen or seen.add(t[1]))]
        for j, (v, i, p) in enumerate(triples[:k]):
            out_v[s, j], out_i[s, j], out_p[s, j] = -v, i, p
    return out_v, out_i, out_p
