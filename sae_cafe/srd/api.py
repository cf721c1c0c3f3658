"""Public SRD API: class saliency, iERFs, hidden-layer relevance, APOP — for CNNs and ViTs.

``model`` is a model adapter or any supported ``nn.Module`` as constructed. A call never changes the
model's parameters, buffers, hooks or module tree (also when it raises), works under ``torch.no_grad()``
and with frozen parameters. Maps are float32 (``dtype=torch.float64`` on request) at the resolution of
``x``; ``differentiable=True`` keeps the autograd graph to ``x``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import MismatchError, NonFiniteError, SaeCafeError, UnsupportedModuleError
from ..models import ModelAdapter, get_adapter
from ..models.base import eval_mode
from .engine import SRDRun, _apply_head_module
from .graph import SRDGraph

Position = tuple[int, int] | int | str | torch.Tensor
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


# ----- preparation ------------------------------------------------------------------------------------------
def _signature(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, str(t.device))
                 for t in (*model.parameters(), *model.buffers()))


def get_graph(adapter: ModelAdapter, x: torch.Tensor, dtype: torch.dtype) -> SRDGraph:
    """The (cached) stage graph; checked once against ``model(x)`` whenever it is (re)built."""
    if not hasattr(adapter, "srd_graph"):
        raise UnsupportedModuleError(f"SRD has no rules for model family {adapter.family!r} ({adapter.name})")
    cache = _GRAPHS.setdefault(adapter.model, {})
    sig = _signature(adapter.model)
    if dtype not in cache or cache[dtype][0] != sig:
        with torch.no_grad(), eval_mode(adapter.model):
            graph = adapter.srd_graph(dtype)
            _verify(adapter, graph, x[:2])
        cache[dtype] = (sig, graph)
    return cache[dtype][1]


def _verify(adapter: ModelAdapter, graph: SRDGraph, x: torch.Tensor) -> None:
    xd = x.detach().to(graph.stages[0].branches[0].conv.weight.dtype)
    ours = SRDRun(graph, xd).logits().to(torch.float64)
    ref = adapter.model(x.detach()).to(torch.float64)
    err = float((ours - ref).abs().max())
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if not err <= tol:
        raise UnsupportedModuleError(
            f"{adapter.name}: the SRD stage graph does not reproduce model(x) (max |Δlogit| = {err:.3g}); the "
            f"model's forward differs from the standard {adapter.family} structure, so SRD cannot explain it")


def _prepare(model, x, dtype) -> tuple[ModelAdapter, torch.Tensor]:
    adapter = get_adapter(model)
    if not isinstance(x, torch.Tensor):
        x = adapter.preprocess(x)
    if x.ndim != 4 or x.shape[1] != 3:
        raise MismatchError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NonFiniteError("input images contain NaN/inf values; check the image loading/preprocessing")
    return adapter, x.to(adapter.device)


def _targets(target, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(target, device=device).long().flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise MismatchError(f"target has {t.numel()} entries for {n} images")
    return t


def _run(adapter, x, dtype, differentiable, until=None, fuse=False) -> tuple[SRDGraph, SRDRun]:
    graph = get_graph(adapter, x, dtype)
    xd = x.to(dtype)
    if not differentiable:
        xd = xd.detach()
    with torch.set_grad_enabled(differentiable):
        return graph, SRDRun(graph, xd, until, fuse)


def _node(adapter: ModelAdapter, graph: SRDGraph, layer) -> str:
    name = adapter.resolve_layer(layer)
    return graph.layer_nodes[name]


def _is_vit(adapter: ModelAdapter) -> bool:
    return adapter.family == "vit"


def _check_contrast(contrast: str) -> None:
    if contrast not in ("mean", "none"):
        raise SaeCafeError(f"contrast must be 'mean' or 'none', got {contrast!r}")


# ----- public API -------------------------------------------------------------------------------------------
def srd_saliency(model, x, target, contrast: str = "mean", differentiable: bool = False,
                 dtype: torch.dtype = torch.float32, return_sink: bool = False):
    """Class saliency maps (N, H, W) for images ``x`` (N, 3, H, W) and class ``target`` (int or (N,)).

    ``contrast="mean"`` subtracts each image's mean top-layer relevance before propagating (class-
    discriminative; the map then sums to 0); ``"none"`` keeps the exact logit shares (the map sums to the
    logit). ViTs: ``return_sink=True`` also returns the relevance that reached the class/register tokens.
    """
    _check_contrast(contrast)
    adapter, x = _prepare(model, x, dtype)
    if _is_vit(adapter):
        from .vit import vit_srd_saliency

        return vit_srd_saliency(adapter, x, target, contrast=contrast, return_sink=return_sink,
                                differentiable=differentiable, dtype=dtype)
    graph, run = _run(adapter, x, dtype, differentiable, fuse=True)
    with torch.set_grad_enabled(differentiable):
        top = run.top_relevance(_targets(target, x.shape[0], x.device))
        if contrast == "mean":
            top = top - top.mean((-2, -1), keepdim=True)
        maps = run.propagate({graph.head.source: top.unsqueeze(1)})[0][:, 0]
    if return_sink:
        return maps, torch.zeros(maps.shape[0], dtype=maps.dtype, device=maps.device)
    return maps


def srd_relevance(model, x, target, layers: Sequence[str | int], contrast: str = "mean",
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Relevance maps (N, h, w) at the outputs of ``layers`` during the class-``target`` propagation."""
    _check_contrast(contrast)
    adapter, x = _prepare(model, x, dtype)
    if _is_vit(adapter):
        from .vit import vit_srd_relevance

        return vit_srd_relevance(adapter, x, target, layers, contrast=contrast, dtype=dtype)
    graph, run = _run(adapter, x, dtype, False, fuse=True)
    nodes = {str(layer): _node(adapter, graph, layer) for layer in layers}
    with torch.no_grad():
        top = run.top_relevance(_targets(target, x.shape[0], x.device)).detach()
        if contrast == "mean":
            top = top - top.mean((-2, -1), keepdim=True)
        _, rec = run.propagate({graph.head.source: top.unsqueeze(1)}, record=tuple(nodes.values()))
    return {layer: rec[node][:, 0] for layer, node in nodes.items()}


def srd_ierf_from_relevance(model, x, layer, relevance: torch.Tensor, differentiable: bool = False,
                            dtype: torch.dtype = torch.float32, return_sink: bool = False):
    """Propagate relevance maps ``relevance`` (N, S, h, w) given at ``layer`` to the pixels: (N, S, H, W).

    One-hot seeds give iERFs (each sums to 1); activation maps or any other seeds work the same way. μ is
    computed once per image and shared by all S seeds.
    """
    adapter, x = _prepare(model, x, dtype)
    if _is_vit(adapter):
        from .vit import vit_srd_ierf_from_relevance

        return vit_srd_ierf_from_relevance(adapter, x, layer, relevance, return_sink=return_sink,
                                           differentiable=differentiable, dtype=dtype)
    return _propagate_seeds(adapter, x, layer, lambda grid: relevance, differentiable, dtype, return_sink)


def _propagate_seeds(adapter, x, layer, make_seeds, differentiable, dtype, return_sink):
    node = _node(adapter, get_graph(adapter, x, dtype), layer)
    graph, run = _run(adapter, x, dtype, differentiable, until=node, fuse=True)
    grid = tuple(run.post[node].shape[-2:])
    relevance = make_seeds(grid)
    if relevance.ndim != 4 or relevance.shape[0] != x.shape[0] or tuple(relevance.shape[-2:]) != grid:
        raise MismatchError(f"relevance for layer {adapter.resolve_layer(layer)!r} must be (N={x.shape[0]}, S, "
                            f"{grid[0]}, {grid[1]}), got {tuple(relevance.shape)}")
    if not torch.isfinite(relevance).all():
        raise NonFiniteError("relevance seeds contain NaN/inf")
    with torch.set_grad_enabled(differentiable):
        maps = run.propagate({node: relevance.to(device=x.device, dtype=dtype)})[0]
    if return_sink:
        return maps, torch.zeros(maps.shape[:2], dtype=maps.dtype, device=maps.device)
    return maps


def position_seeds(positions: Position, n: int, grid: tuple[int, int], layer: str, device) -> torch.Tensor:
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


def srd_ierf(model, x, layer, position: Position, differentiable: bool = False,
             dtype: torch.dtype = torch.float32, return_sink: bool = False):
    """iERF (N, H, W) of the PFV at ``position`` of ``layer``'s output; each map sums to 1."""
    adapter, x = _prepare(model, x, dtype)
    if _is_vit(adapter):
        from .vit import vit_srd_ierf

        return vit_srd_ierf(adapter, x, layer, position, return_sink=return_sink,
                            differentiable=differentiable, dtype=dtype)
    name = adapter.resolve_layer(layer)
    out = _propagate_seeds(adapter, x, layer, lambda grid: position_seeds(position, x.shape[0], grid, name, x.device),
                           differentiable, dtype, return_sink)
    if return_sink:
        return out[0][:, 0], out[1][:, 0]
    return out[:, 0]


def apop_forward(model, x, x_prime) -> torch.Tensor:
    """Activation-pattern-only prediction: ReLU masks (gates act(z)/z), pool indices and frozen statistics
    (LayerNorm σ, SE gates) from ``x``, input ``x_prime`` (a tensor like ``x`` or a scalar such as 0).
    Returns logits (N, classes)."""
    adapter, x = _prepare(model, x, torch.float32)
    if not isinstance(x_prime, torch.Tensor) or x_prime.ndim == 0:
        x_prime = torch.full_like(x, float(x_prime))
    if _is_vit(adapter):
        from .vit import vit_apop_forward

        return vit_apop_forward(adapter, x, x_prime)
    graph, run = _run(adapter, x, torch.float32, False)
    with torch.no_grad():
        return _apop(graph, run, x_prime.to(x.device, torch.float32))


def _gate(act, z: torch.Tensor) -> torch.Tensor:
    if act is torch.relu:
        return (z > 0).to(z.dtype)
    safe = torch.where(z != 0, z, torch.ones_like(z))
    return torch.where(z != 0, act(z) / safe, torch.zeros_like(z))


def _apop(graph: SRDGraph, run: SRDRun, xp: torch.Tensor) -> torch.Tensor:
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


def srd_diagnostics(model, x, target, contrast: str = "none") -> dict[str, dict[str, float]]:
    """Per-stage max |Σμ − 1| and per-stage conservation deltas |Σ R_sources − Σ R_target|."""
    adapter, x = _prepare(model, x, torch.float64)
    graph, run = _run(adapter, x, torch.float64, False)
    top = run.top_relevance(_targets(target, x.shape[0], x.device)).detach()
    if contrast == "mean":
        top = top - top.mean((-2, -1), keepdim=True)
    deltas: dict[str, float] = {}
    run.propagate({graph.head.source: top.unsqueeze(1)}, deltas=deltas)
    return {"mu_sum_error": run.mu_sum_error(), "conservation_delta": deltas}
