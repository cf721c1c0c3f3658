"""Saliency baselines behind one registry, all with ``srd_saliency``'s signature
``fn(model, x, target) -> maps (N, H, W)`` at input resolution.

``model`` is a model adapter or an ``nn.Module``; ``x`` is (N, 3, H, W) preprocessed; ``target`` is
(N,) long, an int, or None (predicted class). Pixel methods (Captum, zennit) return the sum over colour
channels of their (N, 3, H, W) attribution (Saliency and SmoothGrad: of its absolute value, as Captum's
``abs=True``); CAM methods return pytorch-grad-cam's maps (min–max scaled to [0, 1], resized bilinearly).

A method that does not apply to a model raises :class:`NotApplicable` with the reason (see
:func:`applicability`) instead of returning a silently wrong map. No method leaves hooks behind or
modifies the model: hook-based Captum methods (Guided Backprop, DeepLift) run on a deep copy traced with
``torch.fx`` in which every ReLU call site has its own non-in-place ``nn.ReLU``.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SaeCafeError
from ..models import get_adapter
from ..models.base import ModelAdapter
from . import vit_baselines as VB

SaliencyFn = Callable[[ModelAdapter, torch.Tensor, torch.Tensor], torch.Tensor]


class NotApplicable(SaeCafeError):
    """A saliency method that does not apply to this model; ``reason`` says why."""

    def __init__(self, method: str, reason: str):
        self.method, self.reason = method, reason
        super().__init__(f"saliency method {method!r} does not apply: {reason}")


@dataclass
class Baseline:
    name: str
    fn: SaliencyFn
    library: str
    cheap: bool = True
    check: Callable[[ModelAdapter], str | None] | None = None
    description: str = ""


REGISTRY: dict[str, Baseline] = {}


def register_baseline(name: str, library: str, cheap: bool = True,
                      check: Callable[[ModelAdapter], str | None] | None = None, description: str = ""):
    """Decorator: add ``fn(adapter, x, target) -> (N,H,W)`` to the registry."""

    def deco(fn: SaliencyFn) -> SaliencyFn:
        REGISTRY[name] = Baseline(name, fn, library, cheap, check, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def list_baselines(cheap_only: bool = False) -> list[str]:
    return [n for n, b in REGISTRY.items() if b.cheap or not cheap_only]


def _lookup(name: str) -> Baseline:
    if name not in REGISTRY:
        raise SaeCafeError(f"unknown saliency method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def applicability(name: str, model: ModelAdapter | nn.Module) -> str | None:
    """None if method ``name`` applies to ``model``, else the reason it does not."""
    b = _lookup(name)
    return b.check(get_adapter(model)) if b.check else None


def as_target(model: ModelAdapter | nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """(N,) long targets: given ones, a broadcast int, or the predicted classes when None."""
    N = x.shape[0]
    if target is None:
        module = model.model if isinstance(model, ModelAdapter) else model
        with torch.no_grad():
            return module(x).argmax(1)
    t = torch.as_tensor(target, dtype=torch.long, device=x.device)
    return t.expand(N).clone() if t.ndim == 0 else t


def explain(name: str, model: ModelAdapter | nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
    """Run saliency method ``name``: (N,3,H,W) → (N,H,W) float, detached. Raises :class:`NotApplicable`."""
    b = _lookup(name)
    adapter = get_adapter(model)
    reason = b.check(adapter) if b.check else None
    if reason:
        raise NotApplicable(name, reason)
    t = as_target(adapter, x, target)
    with warnings.catch_warnings():  # Captum/grad-cam chatter about hooks and requires_grad on every call
        warnings.simplefilter("ignore", UserWarning)
        maps = b.fn(adapter, x, t)
    if maps.shape != (x.shape[0], *x.shape[2:]):
        raise SaeCafeError(f"{name} returned maps of shape {tuple(maps.shape)}, expected "
                           f"{(x.shape[0], *x.shape[2:])}")
    return maps.detach().float()


def make_explainer(name: str, model: ModelAdapter | nn.Module
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``explain(x, target)`` closure for metrics that re-explain (stability)."""
    return lambda x, t: explain(name, model, x, t)


# ------------------------------------------------------------------ helpers ---------------------------------
def _is_conv_model(a: ModelAdapter) -> str | None:
    return None if a.kind == "conv" else f"needs a convolutional model ({a.name} is a {a.family} token model)"


def cam_target_layer(adapter: ModelAdapter) -> tuple[str, Callable | None]:
    """CAM layer and reshape transform from the adapter's PFV layers.

    Conv models: the last PFV layer (ResNet ``layer4`` stage output, VGG last ReLU of ``features``).
    Token models: the input of the last block (= output of the second-to-last block), reshaped from patch
    tokens to (B, D, h, w) — the last block's patch tokens never reach the class token, so their
    gradient is zero.
    """
    names = list(adapter.layers())
    if adapter.kind == "conv":
        last = names[-1]
        stage = last.rsplit(".", 1)[0]
        # prefer the enclosing stage (``layer4``) when it is itself a PFV layer with the same output
        layer = stage if stage in names else last
        if type(adapter).to_pfv is ModelAdapter.to_pfv:
            return layer, None
        # a family whose maps are not (B, C, h, w) (e.g. Swin's channels-last stages): its own PFV layout

        def to_bchw(t: torch.Tensor) -> torch.Tensor:
            pfv = adapter.to_pfv(t, layer)
            h, w = pfv.grid
            return pfv.pfv.transpose(1, 2).reshape(t.shape[0], -1, h, w)

        return layer, to_bchw
    layer = names[-2] if len(names) > 1 else names[-1]
    p = getattr(adapter, "num_prefix_tokens", 1)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[1] - p
        h = int(round(n ** 0.5))
        return t[:, p:].reshape(t.shape[0], h, n // h, t.shape[2]).permute(0, 3, 1, 2)

    return layer, reshape


_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)


def per_site_relu_copy(module: nn.Module) -> nn.Module:
    """Deep copy traced with ``torch.fx`` where every ReLU call site (module or functional) is its own
    non-in-place ``nn.ReLU`` — what Captum's hook-based methods need. The user's model is untouched."""
    import torch.fx as fx

    gm = fx.symbolic_trace(copy.deepcopy(module))
    n_site = 0
    for node in list(gm.graph.nodes):
        is_mod = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU)
        is_fn = node.op == "call_function" and node.target in _RELU_FUNCS
        is_meth = node.op == "call_method" and node.target in ("relu", "relu_")
        if not (is_mod or is_fn or is_meth):
            continue
        name = f"relu_site_{n_site}"
        n_site += 1
        gm.add_submodule(name, nn.ReLU(inplace=False))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


_DEEPLIFT_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.MaxPool2d,
                     nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, nn.Identity)
_DEEPLIFT_FUNCS = {operator.add, operator.iadd, torch.add, torch.flatten, operator.getitem, getattr,
                   torch.cat, *_RELU_FUNCS}


def _deeplift_check(a: ModelAdapter) -> str | None:
    """DeepLift (rescale) has rules only for ReLU/pooling between linear layers; anything else would give a
    silently wrong map."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(copy.deepcopy(a.model))
    except Exception as e:  # noqa: BLE001
        return f"model cannot be traced with torch.fx to give each ReLU its own module ({type(e).__name__})"
    bad = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if not isinstance(m, _DEEPLIFT_MODULES):
                bad.add(type(m).__name__)
        elif node.op == "call_function" and node.target not in _DEEPLIFT_FUNCS:
            bad.add(getattr(node.target, "__name__", str(node.target)))
        elif node.op == "call_method" and node.target not in ("relu", "relu_", "flatten", "view", "reshape",
                                                              "size", "add", "add_"):
            bad.add(f".{node.target}()")
    if bad:
        return f"Captum DeepLift has no rescale rule for {', '.join(sorted(bad))}"
    return None


def _gbp_check(a: ModelAdapter) -> str | None:
    if not any(isinstance(m, nn.ReLU) for m in a.model.modules()):
        return "the model has no ReLU modules: guided backprop would equal the plain gradient"
    return _fx_check(a)


def _fx_check(a: ModelAdapter) -> str | None:
    import torch.fx as fx

    try:
        fx.symbolic_trace(copy.deepcopy(a.model))
    except Exception as e:  # noqa: BLE001
        return f"model cannot be traced with torch.fx to give each ReLU its own module ({type(e).__name__})"
    return None


def _chsum(attr: torch.Tensor) -> torch.Tensor:
    return attr.sum(1)


# ------------------------------------------------------------------ Captum ----------------------------------
IG_STEPS = 32


@register_baseline("saliency", "captum")
def saliency(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Captum Saliency: |∂f_t/∂x| summed over channels."""
    from captum.attr import Saliency

    return _chsum(Saliency(a.model).attribute(x, target=t, abs=True))


@register_baseline("input_x_gradient", "captum")
def input_x_gradient(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Captum InputXGradient: x·∂f_t/∂x summed over channels."""
    from captum.attr import InputXGradient

    return _chsum(InputXGradient(a.model).attribute(x, target=t))


@register_baseline("integrated_gradients", "captum")
def integrated_gradients(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Captum IntegratedGradients, zero baseline, 32 Gauss–Legendre steps."""
    from captum.attr import IntegratedGradients

    return _chsum(IntegratedGradients(a.model).attribute(x, target=t, n_steps=IG_STEPS,
                                                         internal_batch_size=max(IG_STEPS, x.shape[0])))


@register_baseline("smoothgrad", "captum", cheap=False)
def smoothgrad(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Captum NoiseTunnel(Saliency), 16 samples, σ = 0.15·(max − min of x)."""
    from captum.attr import NoiseTunnel, Saliency

    sd = 0.15 * float(x.max() - x.min())
    return _chsum(NoiseTunnel(Saliency(a.model)).attribute(x, target=t, nt_type="smoothgrad", nt_samples=16,
                                                             nt_samples_batch_size=16, stdevs=sd, abs=True))


@register_baseline("guided_backprop", "captum", check=lambda a: _gbp_check(a))
def guided_backprop(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Captum GuidedBackprop on a per-call-site ReLU copy."""
    from captum.attr import GuidedBackprop

    return _chsum(GuidedBackprop(per_site_relu_copy(a.model)).attribute(x, target=t))


@register_baseline("deeplift", "captum", check=lambda a: _deeplift_check(a))
def deeplift(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Captum DeepLift (rescale), zero baseline, on a per-call-site ReLU copy."""
    from captum.attr import DeepLift

    return _chsum(DeepLift(per_site_relu_copy(a.model)).attribute(x, target=t))


# ------------------------------------------------------------------ pytorch-grad-cam ------------------------
def _cam(cls_name: str, a: ModelAdapter, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = cam_target_layer(a)
    cls = getattr(pytorch_grad_cam, cls_name)
    was_training = a.model.training
    # the library's per-channel tqdm bars and FullGrad's print (in its constructor) would garble the
    # benchmark's progress
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null), \
            cls(model=a.model, target_layers=[a.model.get_submodule(layer)], reshape_transform=reshape) as cam:
        for k, v in kw.items():
            setattr(cam, k, v)
        with torch.enable_grad():
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t])
    a.model.train(was_training)
    return torch.from_numpy(out).to(x.device)


def _register_cam(name: str, cls_name: str, cheap: bool = True, conv_only: bool = False, **kw) -> None:
    check = _is_conv_model if conv_only else None

    def fn(a, x, t):
        return _cam(cls_name, a, x, t, **kw)

    fn.__doc__ = f"pytorch-grad-cam {cls_name} at the adapter's CAM layer (see cam_target_layer)."
    register_baseline(name, "pytorch-grad-cam", cheap=cheap, check=check)(fn)


_register_cam("gradcam", "GradCAM")
_register_cam("gradcam_pp", "GradCAMPlusPlus")
_register_cam("xgradcam", "XGradCAM")
_register_cam("layercam", "LayerCAM")
_register_cam("scorecam", "ScoreCAM", cheap=False, batch_size=64)
_register_cam("ablationcam", "AblationCAM", cheap=False, conv_only=True, batch_size=64)
_register_cam("fullgrad", "FullGrad", conv_only=True)


# ------------------------------------------------------------------ zennit ----------------------------------
def _zennit_check(a: ModelAdapter) -> str | None:
    if a.kind != "conv":
        return "zennit has no LRP rules for attention, LayerNorm or GELU (transformer models)"
    if a.family not in ("resnet", "vgg", "sequential"):
        return f"no zennit canonizer known for model family {a.family!r}"
    return None


def zennit_canonizers(a: ModelAdapter) -> list:
    """Canonizers per family: ResNet → ``ResNetCanonizer`` (BN merge + explicit residual sums), VGG and
    plain Sequential → ``SequentialMergeBatchNorm``."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    return [ResNetCanonizer()] if a.family == "resnet" else [SequentialMergeBatchNorm()]


def lrp_maps(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """zennit LRP-ε/z⁺ (``EpsilonPlus``: z⁺ for conv, ε for dense) summed over channels. (N,H,W)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus

    composite = EpsilonPlus(canonizers=zennit_canonizers(a))
    with Gradient(model=a.model, composite=composite, create_graph=create_graph) as attributor:
        _, rel = attributor(x if create_graph else x.detach(),
                            lambda out: F.one_hot(t, out.shape[1]).to(out.dtype))
    return rel.sum(1)


@register_baseline("lrp_epsilon_plus", "zennit", check=_zennit_check)
def lrp_epsilon_plus(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """zennit LRP EpsilonPlus (z⁺ conv, ε dense) with the family's canonizers."""
    return lrp_maps(a, x, t)


# ------------------------------------------------------------------ RISE ------------------------------------
RISE_MASKS, RISE_CELLS, RISE_P = 1000, 7, 0.5


@register_baseline("rise", "sae_cafe", cheap=False)
def rise(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """RISE (Petsiuk et al. 2018): 1000 random 7×7 masks (p=0.5), upsampled with random shifts.

    Written here: none of the installed libraries implements RISE. Seeded (0) for reproducibility.
    """
    N, _, H, W = x.shape
    g = torch.Generator().manual_seed(0)
    ch, cw = -(-H // RISE_CELLS), -(-W // RISE_CELLS)
    grid = (torch.rand(RISE_MASKS, 1, RISE_CELLS, RISE_CELLS, generator=g) < RISE_P).float()
    up = F.interpolate(grid, size=((RISE_CELLS + 1) * ch, (RISE_CELLS + 1) * cw), mode="bilinear",
                       align_corners=False)
    dy = torch.randint(0, ch, (RISE_MASKS,), generator=g)
    dx = torch.randint(0, cw, (RISE_MASKS,), generator=g)
    masks = torch.stack([up[i, 0, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(RISE_MASKS)]).to(x.device)
    out = torch.zeros(N, H, W, device=x.device)
    with torch.no_grad():
        for n in range(N):
            for i in range(0, RISE_MASKS, 64):
                m = masks[i:i + 64]
                p = a.model(x[n:n + 1] * m[:, None]).softmax(1)[:, t[n]]
                out[n] += (p[:, None, None] * m).sum(0)
    return out / (RISE_MASKS * RISE_P)


# ------------------------------------------------------------------ SRD -------------------------------------
def _srd(contrast: str) -> SaliencyFn:
    def fn(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from ..srd import srd_saliency  # lazy: written in parallel

        return srd_saliency(a, x, t, contrast=contrast)

    fn.__doc__ = f"SRD saliency (sae_cafe.srd.srd_saliency, contrast={contrast!r})."
    return fn


def _srd_check(a: ModelAdapter) -> str | None:
    try:
        from ..srd import srd_saliency  # noqa: F401
    except ImportError as e:
        return f"sae_cafe.srd.srd_saliency is not available ({e})"
    return None


register_baseline("srd", "sae_cafe", check=_srd_check)(_srd("mean"))
register_baseline("srd_none", "sae_cafe", check=_srd_check)(_srd("none"))


# ------------------------------------------------------------------ vision transformers ---------------------
register_baseline("attention_rollout", "sae_cafe", check=VB.vit_check,
                  description="Attention rollout (Abnar & Zuidema 2020) of the pooled token, upsampled.")(
    VB.attention_rollout)
register_baseline("chefer2021", "sae_cafe", check=VB.vit_check,
                  description="Chefer et al. 2021 gradient-weighted attention relevance, upsampled.")(VB.chefer2021)

ATTNLRP_NA = ("lxt not used: its torchvision-ViT AttnLRP patches torch.nn LayerNorm/GELU/MultiheadAttention and "
              "zennit's BasicHook process-wide (docs/metrics.md)")


@register_baseline("attnlrp", "lxt", check=lambda a: ATTNLRP_NA)
def attnlrp(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """AttnLRP (Achtibat et al. 2024): not available, see ``ATTNLRP_NA``."""
    raise NotApplicable("attnlrp", ATTNLRP_NA)
