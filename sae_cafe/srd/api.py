"""Public SRD API: class saliency, iERFs, hidden-layer relevance, APOP — one API for every model family.

``model`` is a model adapter or any supported ``nn.Module`` as constructed. This module validates and
prepares once (images, dtype, NaN/inf, layer ids, the target range, contrast) and delegates to the SRD
backend the model's adapter supplies (``adapter.srd_backend()``, see :mod:`sae_cafe.srd.backend`); it knows
no model family. A call never changes the model's parameters, buffers, hooks or module tree (also when it
raises), works under ``torch.no_grad()`` and with frozen parameters. Maps are float32
(``dtype=torch.float64`` on request; ``None``: the model's dtype) at the resolution of ``x``;
``differentiable=True`` keeps the autograd graph to ``x``.

``return_sink``: the relevance that reaches no pixel (ViT class/register tokens; zero for CNNs) —
``True`` gives its total, ``"tokens"`` one value per sink token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import MismatchError, NonFiniteError, SaeCafeError, UnsupportedModuleError
from ..models import ModelAdapter, get_adapter
from .backend import SRDBackend, check_images
from .graph_backend import get_graph, position_seeds  # noqa: F401  (kept importable from here)

Position = tuple[int, int] | int | str | torch.Tensor
SinkOption = bool | str


# ----- validation and preparation (all families) -------------------------------------------------------------
def srd_backend(adapter: ModelAdapter) -> SRDBackend:
    """The SRD backend of an adapter; a clear error when its family has none."""
    make = getattr(adapter, "srd_backend", None)
    backend = make() if callable(make) else None
    if not isinstance(backend, SRDBackend):
        raise UnsupportedModuleError(
            f"SRD has no backend for model {adapter.name!r} (family {adapter.family!r}): its adapter "
            f"{type(adapter).__name__}.srd_backend() returned {type(backend).__name__}; a family plugs in by "
            "returning an SRDBackend (see sae_cafe.srd.backend and CONVENTIONS.md, 'SRD backends')")
    return backend


def _prepare(model, x) -> tuple[ModelAdapter, SRDBackend, Tensor]:
    adapter = get_adapter(model)
    backend = srd_backend(adapter)
    if not isinstance(x, Tensor):
        x = adapter.preprocess(x)
    x = check_images(x, adapter.name)
    return adapter, backend, x.to(adapter.device)


def _check_dtype(dtype) -> None:
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise SaeCafeError(f"dtype must be a floating point torch dtype (float32/float64) or None, got {dtype!r}")


def _check_contrast(contrast: str) -> None:
    if contrast not in ("mean", "none"):
        raise SaeCafeError(f"contrast must be 'mean' or 'none', got {contrast!r}")


def _targets(target, n: int, n_out: int, device, headless: bool = False) -> Tensor:
    """Class ids (N,) long from an int or an (N,) tensor/sequence, each in 0 … n_out − 1; or directions
    (N, n_out) float from a floating-point tensor (n_out,) or (N, n_out) (the map decomposes ⟨output, d⟩)."""
    if isinstance(target, Tensor) and target.is_floating_point() and (
            target.ndim == 2 or (target.ndim == 1 and target.numel() == n_out
                                 and (headless or n_out != n or not torch.equal(target, target.round())))):
        d = target.to(device)
        if d.ndim == 1:
            d = d[None].expand(n, -1)
        if d.shape != (n, n_out):
            raise MismatchError(f"target direction has shape {tuple(target.shape)}; give ({n_out},) or "
                                f"(N={n}, {n_out}) — the model's output width is {n_out}")
        if not torch.isfinite(d).all():
            raise NonFiniteError("target direction contains NaN/inf values")
        return d
    if headless:
        raise MismatchError(f"this model has no classifier head (its output is a {n_out}-dim feature vector), "
                            "so a class id cannot be explained: pass target as a direction, a float tensor "
                            f"({n_out},) or (N, {n_out}) (e.g. a text embedding or a linear probe's weight row)")
    t = torch.as_tensor(target, device=device)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise MismatchError(f"target must be integer class ids (an int or an (N,) integer tensor) or a "
                            f"direction ({n_out},) / (N, {n_out}), got values like {t.flatten()[:3].tolist()}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise MismatchError(f"target has {t.numel()} entries for {n} images; give an int or an (N,) tensor")
    bad = (t < 0) | (t >= n_out)
    if bad.any():
        raise MismatchError(f"target class {int(t[bad][0])} is out of range: the model has {n_out} outputs, "
                            f"so a target must be in 0 … {n_out - 1}")
    return t


def _contrast_for(contrast: str | None, target: Tensor) -> str:
    """None → "mean" for class ids, "none" for directions."""
    if contrast is None:
        return "none" if target.is_floating_point() else "mean"
    return contrast


def _sink(sink_tok: Tensor, return_sink: SinkOption) -> Tensor:
    if return_sink not in (True, "tokens"):
        raise SaeCafeError(f"return_sink must be False, True or 'tokens', got {return_sink!r}")
    return sink_tok if return_sink == "tokens" else sink_tok.sum(-1)


def _ret(maps: Tensor, sink_tok: Tensor, return_sink: SinkOption):
    return (maps, _sink(sink_tok, return_sink)) if return_sink else maps


def _class_call(model, x, target, contrast, dtype):
    if contrast is not None:
        _check_contrast(contrast)
    _check_dtype(dtype)
    adapter, backend, x = _prepare(model, x)
    with torch.no_grad():
        n_out = backend.prepare(x, dtype)
    t = _targets(target, x.shape[0], n_out, x.device, bool(getattr(backend, "headless", False)))
    return backend, x, t, _contrast_for(contrast, t)


# ----- public API -------------------------------------------------------------------------------------------
def srd_saliency(model, x, target, contrast: str | None = None, differentiable: bool = False,
                 dtype: torch.dtype | None = torch.float32, return_sink: SinkOption = False):
    """Saliency maps (N, H, W) for images ``x`` (N, 3, H, W) and ``target``.

    ``target``: a class id (int or (N,) integers), or a *direction* — a floating-point tensor of the
    output's width K, (K,) or one per image (N, K) — whose map decomposes ⟨output, direction⟩ (a CLIP text
    embedding for zero-shot saliency, a linear probe's weight row; the only target of a headless backbone,
    where a class id is a MismatchError; with exactly K images a (K,) float tensor of whole numbers reads as
    class ids, so pass (N, K) there). ``contrast="mean"`` subtracts each image's mean top-layer
    relevance before propagating (class-discriminative; the map then sums to 0 for CNNs); ``"none"`` keeps
    the exact shares (map + sink sums to the logit or to ⟨output, direction⟩). Default (None): "mean" for
    class ids, "none" for directions. ``return_sink=True`` also returns the sink (N,) (``"tokens"``: (N, E)).
    """
    backend, x, t, contrast = _class_call(model, x, target, contrast, dtype)
    maps, sink = backend.saliency(x, t, contrast, differentiable, dtype)
    return _ret(maps, sink, return_sink)


def srd_relevance(model, x, target, layers: Sequence[str | int], contrast: str | None = None,
                  dtype: torch.dtype | None = torch.float32, return_sink: SinkOption = False):
    """Relevance maps {str(layer): (N, h, w)} at the outputs of ``layers`` during the propagation of
    ``target`` (class id or direction, as in :func:`srd_saliency`; contrast default "mean" for class ids,
    "none" for directions); with ``return_sink`` also {str(layer): sink (N,) or (N, E)}."""
    if isinstance(layers, str | int):
        layers = [layers]
    adapter = get_adapter(model)
    names = {str(layer): adapter.resolve_layer(layer) for layer in layers}
    backend, x, t, contrast = _class_call(model, x, target, contrast, dtype)
    out, sinks = backend.relevance(x, t, names, contrast, dtype)
    if return_sink:
        return out, {k: _sink(s, return_sink) for k, s in sinks.items()}
    return out


def srd_ierf_from_relevance(model, x, layer, relevance: Tensor, differentiable: bool = False,
                            dtype: torch.dtype | None = torch.float32, return_sink: SinkOption = False):
    """Propagate relevance maps ``relevance`` (N, S, h, w) given at ``layer`` to the pixels: (N, S, H, W).

    One-hot seeds give iERFs (each sums to 1 with its sink); activation maps or any other seeds work the
    same way. μ is computed once per image and shared by all S seeds. ViTs also take (N, S, T) over all
    tokens (prefix tokens first). Sink: (N, S) or, with ``"tokens"``, (N, S, E).
    """
    _check_dtype(dtype)
    adapter, backend, x = _prepare(model, x)
    name = backend.resolve_layer(layer)
    if not isinstance(relevance, Tensor):
        raise MismatchError(f"relevance must be a tensor (N, S, h, w), got {type(relevance).__name__}")
    if not torch.isfinite(relevance).all():
        raise NonFiniteError("relevance seeds contain NaN/inf")
    with torch.no_grad():
        backend.prepare(x, dtype)
    maps, sink = backend.ierf_from_relevance(x, name, relevance, differentiable, dtype)
    return _ret(maps, sink, return_sink)


def srd_ierf(model, x, layer, position: Position, differentiable: bool = False,
             dtype: torch.dtype | None = torch.float32, return_sink: SinkOption = False):
    """iERF (N, H, W) of the PFV at ``position`` of ``layer``'s output; each map (plus its sink) sums to 1.

    ``position``: (row, col), a patch index, a LongTensor (N, 2), or ``"cls"`` for a ViT class token.
    """
    _check_dtype(dtype)
    adapter, backend, x = _prepare(model, x)
    name = backend.resolve_layer(layer)
    with torch.no_grad():
        backend.prepare(x, dtype)
    maps, sink = backend.ierf(x, name, position, differentiable, dtype)
    return _ret(maps, sink, return_sink)


def apop_forward(model, x, x_prime, dtype: torch.dtype | None = None) -> Tensor:
    """Activation-pattern-only prediction: ReLU masks (gates act(z)/z), pool indices and frozen statistics
    (LayerNorm σ, SE gates, attention probabilities) from ``x``, input ``x_prime`` (a tensor like ``x`` or
    a scalar such as 0). Returns logits (N, classes)."""
    _check_dtype(dtype)
    adapter, backend, x = _prepare(model, x)
    if not isinstance(x_prime, Tensor) or x_prime.ndim == 0:
        x_prime = torch.full_like(x, float(x_prime))
    if x_prime.shape != x.shape:
        raise MismatchError(f"x_prime {tuple(x_prime.shape)} must have the shape of x {tuple(x.shape)}")
    if not torch.isfinite(x_prime).all():
        raise NonFiniteError("x_prime contains NaN/inf values")
    with torch.no_grad():
        backend.prepare(x, dtype)
    return backend.apop(x, x_prime, dtype)


def srd_diagnostics(model, x, target, contrast: str = "none") -> dict[str, dict[str, float]]:
    """Per-stage max |Σμ − 1| and per-stage conservation deltas |Σ R_sources − Σ R_target| (float64)."""
    backend, x, t, contrast = _class_call(model, x, target, contrast, torch.float64)
    return backend.diagnostics(x, t, contrast)
