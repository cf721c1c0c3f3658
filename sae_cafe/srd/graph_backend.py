"""Stage-graph SRD backend: CNN-like families whose adapters build an :class:`~sae_cafe.srd.graph.SRDGraph`.

A family supplies ``build(dtype) -> SRDGraph`` (its adapter's ``srd_graph``); this backend caches the graph
per model, dtype and weights version, checks it once against ``model(x)``, and runs saliency, hidden
relevance, iERFs, APOP and diagnostics with :class:`~sae_cafe.srd.engine.SRDRun`. There is no sink (every
relevance reaches a pixel): sinks are (…, 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import MismatchError, SaeCafeError, UnsupportedModuleError
from ..models.base import eval_mode
from .backend import SRDBackend, cached_build
from .engine import SRDRun, _apply_head_module
from .graph import SRDGraph


def _dtype(adapter, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    p = next(adapter.model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _verify(adapter, graph: SRDGraph, x: Tensor) -> int:
    """The graph's logits must equal ``model(x)``; returns the number of outputs."""
    xd = x.detach().to(graph.stages[0].branches[0].conv.weight.dtype)
    ours = SRDRun(graph, xd).logits().to(torch.float64)
    ref = adapter.model(x.detach()).to(torch.float64)
    err = float((ours - ref).abs().max())
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if not err <= tol:
        raise UnsupportedModuleError(
            f"{adapter.name}: the SRD stage graph does not reproduce model(x) (max |Δlogit| = {err:.3g}); the "
            f"model's forward differs from the standard {adapter.family} structure, so SRD cannot explain it")
    return int(ref.shape[1])


def get_graph(adapter, x: Tensor, dtype: torch.dtype | None) -> SRDGraph:
    """The (cached) stage graph of a stage-graph adapter; checked once against ``model(x)`` when (re)built."""
    backend = adapter.srd_backend()
    if not isinstance(backend, StageGraphBackend):
        raise UnsupportedModuleError(f"{adapter.name}: family {adapter.family!r} has no SRD stage graph "
                                     f"(its backend is {type(backend).__name__})")
    return backend.graph(x, dtype)[0]


def position_seeds(positions, n: int, grid: tuple[int, int], layer: str, device) -> Tensor:
    """One-hot seeds (N, 1, h, w) from a (row, col), a patch index, or a LongTensor (N, 2)."""
    h, w = grid
    if isinstance(positions, str):
        raise SaeCafeError(f"position {positions!r} is only valid for ViT layers")
    if isinstance(positions, int):
        positions = (positions // w, positions % w) if 0 <= positions < h * w else (-1, -1)
    pos = torch.as_tensor(positions, device=device).long()
    if pos.ndim == 1:
        pos = pos.view(1, 2).expand(n, 2)
    if pos.shape != (n, 2):
        raise MismatchError(f"positions must be a (row, col) tuple or a (N={n}, 2) tensor, got {tuple(pos.shape)}")
    bad = (pos[:, 0] < 0) | (pos[:, 0] >= h) | (pos[:, 1] < 0) | (pos[:, 1] >= w)
    if bad.any():
        raise SaeCafeError(f"position {pos[bad][0].tolist()} is off the {h}×{w} grid of layer {layer!r}")
    seeds = torch.zeros(n, 1, h, w, device=device)
    seeds[torch.arange(n, device=device), 0, pos[:, 0], pos[:, 1]] = 1.0
    return seeds


class StageGraphBackend(SRDBackend):
    """SRD over a stage graph built by ``build(dtype)`` (see :mod:`sae_cafe.srd.graph`)."""

    def __init__(self, adapter, build: Callable[[torch.dtype], SRDGraph]):
        super().__init__(adapter)
        self.build = build

    def graph(self, x: Tensor, dtype: torch.dtype | None) -> tuple[SRDGraph, int]:
        """(graph in ``dtype``, number of outputs); built and checked against ``model(x[:2])`` when needed."""
        dtype = _dtype(self.adapter, dtype)

        def build() -> tuple[SRDGraph, int]:
            with torch.no_grad(), eval_mode(self.adapter.model):
                graph = self.build(dtype)
                return graph, _verify(self.adapter, graph, x[:2])

        return cached_build(self.adapter.model, ("graph", dtype), build)

    def prepare(self, x: Tensor, dtype: torch.dtype | None) -> int:
        return self.graph(x, dtype)[1]

    def _run(self, x: Tensor, dtype, differentiable: bool, until: str | None = None,
             fuse: bool = False) -> tuple[SRDGraph, SRDRun]:
        dtype = _dtype(self.adapter, dtype)
        graph = self.graph(x, dtype)[0]
        xd = x.to(dtype)
        if not differentiable:
            xd = xd.detach()
        with torch.set_grad_enabled(differentiable):
            return graph, SRDRun(graph, xd, until, fuse)

    def _top(self, run: SRDRun, target: Tensor, contrast: str) -> Tensor:
        top = run.top_relevance(target)
        return top - top.mean((-2, -1), keepdim=True) if contrast == "mean" else top

    def saliency(self, x, target, contrast, differentiable, dtype):
        graph, run = self._run(x, dtype, differentiable, fuse=True)
        with torch.set_grad_enabled(differentiable):
            top = self._top(run, target, contrast)
            maps = run.propagate({graph.head.source: top.unsqueeze(1)})[0][:, 0]
        return maps, maps.new_zeros(maps.shape[0], 0)

    def relevance(self, x, target, layers, contrast, dtype):
        graph, run = self._run(x, dtype, False, fuse=True)
        nodes = {key: graph.layer_nodes[name] for key, name in layers.items()}
        with torch.no_grad():
            top = self._top(run, target, contrast).detach()
            _, rec = run.propagate({graph.head.source: top.unsqueeze(1)}, record=tuple(nodes.values()))
        out = {key: rec[node][:, 0] for key, node in nodes.items()}
        return out, {key: r.new_zeros(r.shape[0], 0) for key, r in out.items()}

    def _propagate_seeds(self, x, layer: str, make_seeds, differentiable, dtype) -> tuple[Tensor, Tensor]:
        node = self.graph(x, _dtype(self.adapter, dtype))[0].layer_nodes[layer]
        _, run = self._run(x, dtype, differentiable, until=node, fuse=True)
        grid = tuple(run.post[node].shape[-2:])
        relevance = make_seeds(grid)
        if relevance.ndim != 4 or relevance.shape[0] != x.shape[0] or tuple(relevance.shape[-2:]) != grid:
            raise MismatchError(f"relevance for layer {layer!r} must be (N={x.shape[0]}, S, {grid[0]}, {grid[1]}), "
                                f"got {tuple(relevance.shape)}")
        with torch.set_grad_enabled(differentiable):
            maps = run.propagate({node: relevance.to(device=x.device, dtype=run.x.dtype)})[0]
        return maps, maps.new_zeros(*maps.shape[:2], 0)

    def ierf_from_relevance(self, x, layer, relevance, differentiable, dtype):
        return self._propagate_seeds(x, layer, lambda grid: relevance, differentiable, dtype)

    def ierf(self, x, layer, position, differentiable, dtype):
        maps, sink = self._propagate_seeds(
            x, layer, lambda grid: position_seeds(position, x.shape[0], grid, layer, x.device), differentiable,
            dtype)
        return maps[:, 0], sink[:, 0]

    def apop(self, x, x_prime, dtype):
        graph, run = self._run(x, dtype, False)
        with torch.no_grad():
            return _apop(graph, run, x_prime.to(x.device, run.x.dtype))

    def diagnostics(self, x, target, contrast):
        graph, run = self._run(x, torch.float64, False)
        top = self._top(run, target, contrast).detach()
        deltas: dict[str, float] = {}
        run.propagate({graph.head.source: top.unsqueeze(1)}, deltas=deltas)
        return {"mu_sum_error": run.mu_sum_error(), "conservation_delta": deltas}


def _gate(act, z: Tensor) -> Tensor:
    if act is torch.relu:
        return (z > 0).to(z.dtype)
    safe = torch.where(z != 0, z, torch.ones_like(z))
    return torch.where(z != 0, act(z) / safe, torch.zeros_like(z))


def _apop(graph: SRDGraph, run: SRDRun, xp: Tensor) -> Tensor:
    """Logits of ``xp`` through ``run``'s activation pattern: gates act(z)/z, pool indices, frozen records."""
    post = {"input": xp}
    for i, stage in enumerate(graph.stages):
        z = 0
        for j, br in enumerate(stage.branches):
            v = post[br.source]
            if br.pool is not None:
                idx = run._pool(br)[1]
                v = v.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
            z = z + (br.frozen_forward(run.frozen[i, j], v) if br.freeze is not None else br.forward(v))
        post[stage.target] = z * _gate(stage.act, run.pre[stage.target]) if stage.act is not None else z
    head, v0 = graph.head, run.post[graph.head.source]
    with torch.enable_grad():
        _, f = torch.autograd.functional.jvp(head.pool, v0, post[head.source])
    f, a = f.flatten(1), head.pool(v0).flatten(1)
    for m in head.mlp:
        if isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten)):
            f, a = _apply_head_module(m, f), _apply_head_module(m, a)
        elif hasattr(m, "frozen_apply"):  # e.g. a LayerNorm with x's σ
            f, a = m.frozen_apply(a, f), m(a)
        else:
            f, a = f * _gate(m, a), m(a)
    return f
