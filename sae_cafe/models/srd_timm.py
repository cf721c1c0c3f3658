"""Family surgery for SRD on timm CNNs: ``ResNet`` (ResNet/ResNet-D/ResNeXt/SE-ResNet) and ``EfficientNet`` /
``MobileNetV3``, mapped onto the same stage-graph records as the torchvision builders (:mod:`.srd_cnn`,
:mod:`.srd_mobile`); the SRD rules themselves are the generic ones of :mod:`sae_cafe.srd.rules`.

Rules for timm's module layout:

* **BatchNorm (+ fused activation).** ``BatchNorm2d`` is folded into the preceding conv. timm's
  ``BatchNormAct2d`` is a ``BatchNorm2d`` that also applies ``drop`` (identity in eval) and ``act``: its BN
  part is folded like any BN and its ``act`` becomes the node's activation (``Identity``: no activation).
* **Deep stem (ResNet-C/D).** ``conv1`` as a Sequential (conv, BN, act, conv, BN, act, conv) + ``bn1`` +
  ``act1``: one node per activation (``conv1.2``, ``conv1.5``, ``act1``), the stem max-pool attached to the
  branches of ``layer1.0``.
* **Average-pool downsampling (ResNet-D).** ``downsample = AvgPool2d(k, k) → Conv2d 1×1 → BN`` is one
  branch of the block's output node (a stage runs from one activation to the next pre-activation): the
  pool is a depthwise conv with weights 1/k² (method_spec §2.2.6), composed with the 1×1 conv it is a k×k
  stride-k conv with weights W/k², so every source position of the pool window is its own path
  (contribution ``W v_p / k²``). ``ceil_mode``/``count_include_pad=False`` change nothing when the map size
  is a multiple of k; other sizes (partial windows) raise an :class:`UnsupportedModuleError`. The branch is
  stored as a depthwise k×k conv (weights 1/k²) with the 1×1 conv as its ``post`` matrix (same paths).
* **Group convs (ResNeXt)** are ordinary ``ConvSpec`` s with ``groups``.
* **Squeeze-excitation is a gate frozen with the activation pattern**, as in :mod:`.srd_mobile`: the SE
  module after a node is part of that node's activation, ``act(z) = se(σ(z)) = g · σ(z)`` with the channel
  gate g computed from this image; relevance passes through it unchanged, it is not attributed to the
  pixels that produced g, and ``apop_forward`` reuses it (as act(z)/z). timm's ResNet applies SE to the
  projection's BN output *before* the residual add: that output is then its own node
  (``layerI.J.bn3``, activation = the SE gate) and the add a two-branch node with the skip.
* **Heads.** ``SelectAdaptivePool2d`` ('avg') → (dropout) → ``Linear``; MobileNetV3's 1×1 ``conv_head``
  after the pool is a ``Linear`` on the pooled vector followed by ``act2``.

The SE gates and the graph's own copies of modules (``_frozen_copy``) run the model's own forward code with
parameters cast to the graph's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import Branch, ConvSpec, Head, MaxPoolSpec, SRDGraph, Stage, _pair, conv_bn_forward, conv_spec
from .base import ACTIVATIONS
from .srd_cnn import _walk_features, activation_fn

Act = Callable[[torch.Tensor], torch.Tensor]
#: modules that are the identity in eval mode (timm's stochastic depth / DropBlock, dropout)
EVAL_IDENTITY = ("Identity", "DropPath", "DropBlock2d", "Dropout")


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or type(m).__name__ in EVAL_IDENTITY


def _frozen_copy(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private eval-mode copy of ``m`` in ``dtype`` (no grad to its parameters, no in-place writes)."""
    c = copy.deepcopy(m).to(dtype).eval()
    for p in c.parameters():
        p.requires_grad_(False)
    for sub in c.modules():
        if getattr(sub, "inplace", False):
            sub.inplace = False
    return c


def _check_conv(conv: nn.Module, name: str) -> nn.Conv2d:
    if type(conv) is not nn.Conv2d:  # timm's Conv2dSame/StdConv/CondConv run other forward code
        raise UnsupportedModuleError(f"{name}: module {type(conv).__name__} has no SRD rule (expected a plain "
                                     "nn.Conv2d with numeric zero padding)")
    return conv


def bn_act(bn: nn.Module, name: str) -> tuple[nn.BatchNorm2d, nn.Module | None]:
    """The BatchNorm and the activation (None: identity) of a ``BatchNorm2d`` or timm ``BatchNormAct2d``."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise UnsupportedModuleError(f"{name}: module {type(bn).__name__} has no SRD rule (expected BatchNorm2d "
                                     "or timm BatchNormAct2d)")
    if type(bn) is nn.BatchNorm2d:
        return bn, None
    if type(bn).__name__ != "BatchNormAct2d":
        raise UnsupportedModuleError(f"{name}: norm {type(bn).__name__} has no SRD rule (supported: BatchNorm2d, "
                                     "BatchNormAct2d)")
    if not _is_identity(getattr(bn, "drop", None)):
        raise UnsupportedModuleError(f"{name}.drop: {type(bn.drop).__name__} has no SRD rule")
    act = getattr(bn, "act", None)
    if _is_identity(act):
        return bn, None
    if not isinstance(act, ACTIVATIONS):
        raise UnsupportedModuleError(f"{name}.act: module {type(act).__name__} has no SRD rule (supported: "
                                     "element-wise activations)")
    return bn, act


def conv_bn_stage(conv: nn.Module, bn: nn.Module, target: str, source: str, dtype: torch.dtype,
                  conv_name: str, bn_name: str, pool: MaxPoolSpec | None = None) -> Stage:
    """One node ``act(bn(conv(v)))``: conv + BN folded, the BN's fused activation (if any) as ``act``."""
    conv = _check_conv(conv, conv_name)
    bn, act = bn_act(bn, bn_name)
    spec, bias = conv_spec(conv, bn, conv_name, dtype)
    return Stage(target, [Branch(source, spec, pool, bias, conv_bn_forward(conv, bn, dtype))],
                 activation_fn(act) if act is not None else None)


def _then(first: Act | None, second: Act) -> Act:
    return second if first is None else (lambda z: second(first(z)))


def se_gate(se: nn.Module, name: str, dtype: torch.dtype) -> Act:
    """timm ``SEModule`` / ``SqueezeExcite`` (or torchvision ``SqueezeExcitation``) as ``v ↦ g(v)·v`` with the
    module's own forward code; SRD freezes g (see the module docstring)."""
    kind = type(se).__name__
    if kind not in ("SEModule", "SqueezeExcite", "SqueezeExcitation", "EffectiveSEModule"):
        raise UnsupportedModuleError(f"{name}: module {kind} has no SRD rule (supported gates: SEModule, "
                                     "SqueezeExcite, SqueezeExcitation)")
    return _frozen_copy(se, dtype)


# ----- timm ResNet ------------------------------------------------------------------------------------------
def _downsample_branch(ds: nn.Module | None, name: str, source: str, pool: MaxPoolSpec | None,
                       dtype: torch.dtype) -> Branch:
    """The block's shortcut: identity, Conv2d + BN, or AvgPool2d + Conv2d 1×1 + BN (one composed branch)."""
    if ds is None:
        return Branch(source, None, pool, None)
    parts = list(ds.children()) if isinstance(ds, nn.Sequential) else []
    if len(parts) == 3 and _is_identity(parts[0]):
        parts = parts[1:]
    if len(parts) == 2 and isinstance(parts[0], nn.Conv2d) and isinstance(parts[1], nn.BatchNorm2d):
        conv = _check_conv(parts[0], f"{name}.downsample.{len(ds) - 2}")
        spec, bias = conv_spec(conv, parts[1], f"{name}.downsample", dtype)
        return Branch(source, spec, pool, bias, conv_bn_forward(conv, parts[1], dtype))
    if len(parts) == 3 and type(parts[0]) is nn.AvgPool2d and isinstance(parts[1], nn.Conv2d) \
            and isinstance(parts[2], nn.BatchNorm2d):
        if pool is not None:
            raise UnsupportedModuleError(f"{name}.downsample: average-pool downsampling after a max-pool has no "
                                         "SRD rule")
        return avg_down_branch(parts[0], _check_conv(parts[1], f"{name}.downsample.1"), parts[2],
                               f"{name}.downsample", source, dtype)
    raise UnsupportedModuleError(f"{name}.downsample: layout {[type(p).__name__ for p in ds.children()]} has no "
                                 "SRD rule (supported: Conv2d + BatchNorm2d, AvgPool2d + Conv2d 1×1 + BatchNorm2d)")


def avg_down_spec(pool: nn.AvgPool2d, conv: nn.Conv2d, bn: nn.BatchNorm2d, name: str, dtype: torch.dtype
                  ) -> tuple[ConvSpec, torch.Tensor]:
    """``conv1×1(avgpool_k(v))`` + BN as one k×k stride-k conv with weights W/k² (a path per window cell),
    held as a depthwise k×k conv with weights 1/k² and ``post`` = W (BN folded): the contributions
    ``W v_p / k²`` are the same, and :mod:`sae_cafe.srd.rules_post` never forms the C_out×C_in×k×k kernel
    (the dense form cost 2-4× the forward pass of resnet50d on CPU)."""
    k, st = _pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if k != st or _pair(pool.padding) != (0, 0) or pool.divisor_override:
        raise UnsupportedModuleError(f"{name}.0: AvgPool2d{tuple(k)} with stride {st}, padding {pool.padding} has no "
                                     "SRD rule (expected kernel = stride, no padding)")
    if conv.kernel_size != (1, 1) or _pair(conv.stride) != (1, 1) or conv.groups != 1:
        raise UnsupportedModuleError(f"{name}.1: only a 1×1 stride-1 conv after the average pool has an SRD rule")
    spec, bias = conv_spec(conv, bn, f"{name}.1", dtype)
    c_in = spec.weight.shape[1]
    weight = torch.full((c_in, 1, *k), 1.0 / (k[0] * k[1]), dtype=dtype, device=spec.weight.device)
    return ConvSpec(weight, st, (0, 0), (1, 1), c_in, name, post=spec.weight.flatten(1)), bias


def avg_down_branch(pool: nn.AvgPool2d, conv: nn.Conv2d, bn: nn.BatchNorm2d, name: str, source: str,
                    dtype: torch.dtype) -> Branch:
    spec, bias = avg_down_spec(pool, conv, bn, name, dtype)
    convbn = conv_bn_forward(conv, bn, dtype)
    k = spec.kernel

    def exact(u: torch.Tensor) -> torch.Tensor:  # the model's own ops
        if pool.ceil_mode and (u.shape[-2] % k[0] or u.shape[-1] % k[1]):
            raise UnsupportedModuleError(
                f"{name}.0: AvgPool2d(ceil_mode=True) on a {tuple(u.shape[-2:])} map has partial windows, which "
                f"have no SRD rule; use an input size whose maps here are multiples of {k[0]} (e.g. 224 px)")
        return convbn(F.avg_pool2d(u, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                                   pool.count_include_pad, pool.divisor_override))
    return Branch(source, spec, None, bias, exact)


_RESNET_BLOCKS = {"BasicBlock": (("conv1", "bn1", "act1"), ("conv2", "bn2", None), "act2"),
                  "Bottleneck": (("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"), ("conv3", "bn3", None), "act3")}


def resnet_block_stages(name: str, block: nn.Module, source: str, pool: MaxPoolSpec | None,
                        dtype: torch.dtype) -> list[Stage]:
    """Stages of a timm BasicBlock/Bottleneck; the output node is the block name."""
    layout = _RESNET_BLOCKS.get(type(block).__name__)
    if layout is None or not type(block).__module__.startswith("timm."):
        raise UnsupportedModuleError(f"{name}: residual block type {type(block).__name__} has no SRD rule")
    for sub in ("drop_block", "aa", "drop_path"):
        if not _is_identity(getattr(block, sub, None)):
            raise UnsupportedModuleError(f"{name}.{sub}: module {type(getattr(block, sub)).__name__} has no SRD "
                                         "rule (anti-aliasing / eval-time dropout are not supported)")
    *convs, out_act = layout
    stages, src, src_pool = [], source, pool
    for c, b, a in convs[:-1]:
        st = conv_bn_stage(getattr(block, c), getattr(block, b), f"{name}.{b}", src, dtype, f"{name}.{c}",
                           f"{name}.{b}", src_pool)
        st.act = activation_fn(getattr(block, a))
        stages.append(st)
        src, src_pool = st.target, None
    c, b, _ = convs[-1]
    last = conv_bn_stage(getattr(block, c), getattr(block, b), f"{name}.{b}", src, dtype, f"{name}.{c}",
                         f"{name}.{b}")
    if last.act is not None:
        raise UnsupportedModuleError(f"{name}.{b}: an activation before the residual add has no SRD rule")
    skip = _downsample_branch(block.downsample, name, source, pool, dtype)
    act = activation_fn(getattr(block, out_act))
    if _is_identity(block.se):
        stages.append(Stage(name, [last.branches[0], skip], act))
    else:  # SE gates the projection before the add: its own node, activation = the frozen gate
        last.act = se_gate(block.se, f"{name}.se", dtype)
        stages += [last, Stage(name, [Branch(last.target), skip], act)]
    return stages


def _stem(model: nn.Module, dtype: torch.dtype, stages: list[Stage], nodes: dict[str, str], conv: str,
          bn: str, act: str | None) -> str:
    """Stem conv(s) + BN (+ act): nodes named after the activation modules; returns the top node."""
    c = getattr(model, conv)
    seq = [(f"{conv}.{n}", m) for n, m in c.named_children()] if isinstance(c, nn.Sequential) else [(conv, c)]
    for n, m in seq:
        if isinstance(m, nn.Conv2d):
            _check_conv(m, n)
    norm = getattr(model, bn)
    if act is None:  # timm BatchNormAct2d: the stem node is the BN module (its output is post-activation)
        norm_bn, norm_act = bn_act(norm, bn)
        if norm_act is None:
            raise UnsupportedModuleError(f"{bn}: a stem without an activation has no SRD rule")
        seq += [(bn, norm_bn), (bn, norm_act)]
    else:
        seq += [(bn, norm), (act, getattr(model, act))]
    top, tail = _walk_features(seq, "input", dtype, stages, nodes)
    if tail:
        raise UnsupportedModuleError(f"{conv}: stem layout has no SRD rule")
    return top


def _pool_and_linear(gp: nn.Module, where: str) -> None:
    kind = getattr(gp, "pool_type", None)
    if type(gp).__name__ != "SelectAdaptivePool2d" or kind != "avg":
        raise UnsupportedModuleError(f"{where}: global pool {type(gp).__name__}({kind!r}) has no SRD head rule "
                                     "(expected SelectAdaptivePool2d with pool_type='avg')")


def _global_avg(v: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(v, 1)


def build_timm_resnet_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """timm ``ResNet``: (deep) stem → ``act1`` node, max-pool attached to layer1.0's branches, blocks, head."""
    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    src = _stem(model, dtype, stages, nodes, "conv1", "bn1", "act1")
    mp = model.maxpool
    if isinstance(mp, nn.MaxPool2d):
        pool = MaxPoolSpec.from_module(mp, "maxpool")
    elif _is_identity(mp):
        pool = None
    else:
        raise UnsupportedModuleError(f"maxpool: {type(mp).__name__} has no SRD rule (expected MaxPool2d)")
    for stage_name in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage_name)):
            name = f"{stage_name}.{i}"
            stages += resnet_block_stages(name, block, src, pool, dtype)
            nodes[name] = src = name
            pool = None
        nodes[stage_name] = src
    _pool_and_linear(model.global_pool, "global_pool")
    if not isinstance(model.fc, nn.Linear):
        raise UnsupportedModuleError(f"fc: {type(model.fc).__name__} has no SRD head rule (expected Linear)")
    return SRDGraph(stages, Head(src, _global_avg, [model.fc]), nodes)


# ----- timm EfficientNet / MobileNetV3 -----------------------------------------------------------------------
#: block class → its (conv, norm) pairs in forward order, "se" where the gate sits
_EFF_BLOCKS = {"DepthwiseSeparableConv": (("conv_dw", "bn1"), "se", ("conv_pw", "bn2")),
               "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), "se", ("conv_pwl", "bn3")),
               "EdgeResidual": (("conv_exp", "bn1"), "se", ("conv_pwl", "bn2")),
               "ConvBnAct": (("conv", "bn1"),)}


def efficientnet_block_stages(name: str, block: nn.Module, source: str, dtype: torch.dtype) -> list[Stage]:
    """Stages of a timm EfficientNet/MobileNetV3 block; the output node is ``name``."""
    layout = _EFF_BLOCKS.get(type(block).__name__)
    if layout is None or not type(block).__module__.startswith("timm."):
        raise UnsupportedModuleError(f"{name}: block type {type(block).__name__} has no SRD rule (supported: "
                                     f"{', '.join(_EFF_BLOCKS)})")
    if getattr(block, "conv_s2d", None) is not None:
        raise UnsupportedModuleError(f"{name}.conv_s2d: space-to-depth blocks have no SRD rule")
    for sub in ("aa", "drop_path"):
        if not _is_identity(getattr(block, sub, None)):
            raise UnsupportedModuleError(f"{name}.{sub}: module {type(getattr(block, sub)).__name__} has no SRD "
                                         "rule")
    residual = bool(getattr(block, "has_skip", False))
    stages: list[Stage] = []
    src = source
    for k, part in enumerate(layout):
        if part == "se":
            if not _is_identity(block.se):
                stages[-1].act = _then(stages[-1].act, se_gate(block.se, f"{name}.se", dtype))
            continue
        c, b = part
        st = conv_bn_stage(getattr(block, c), getattr(block, b), f"{name}.{b}", src, dtype, f"{name}.{c}",
                           f"{name}.{b}")
        if k == len(layout) - 1 and (not residual or st.act is None):
            st.target = name
            if residual:  # linear projection + skip: z = project(v) + input
                st.branches.append(Branch(source))
        stages.append(st)
        src = st.target
    if stages[-1].target != name:  # residual after an activation: a pure sum node
        stages.append(Stage(name, [Branch(src), Branch(source)], None))
    return stages


def _linear_of_conv1x1(conv: nn.Conv2d, name: str, dtype: torch.dtype) -> nn.Linear:
    """A 1×1 conv on a 1×1 pooled map as an ``nn.Linear`` (weights copied, cast to ``dtype``)."""
    conv = _check_conv(conv, name)
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise UnsupportedModuleError(f"{name}: only a 1×1 conv after global pooling has an SRD head rule")
    lin = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, dtype=dtype,
                    device=conv.weight.device)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.detach().flatten(1))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    lin.requires_grad_(False)
    return lin


def _no_inplace(m: nn.Module) -> nn.Module:
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


def build_timm_efficientnet_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """timm ``EfficientNet`` / ``MobileNetV3``: stem ``bn1`` node, ``blocks.i.j`` blocks, head.

    EfficientNet: last ``conv_head`` + ``bn2`` node, then global pool → ``classifier``. MobileNetV3: global pool →
    ``conv_head`` (1×1, as a Linear) → ``norm_head`` (identity) → ``act2`` → ``classifier``.
    """
    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    src = _stem(model, dtype, stages, nodes, "conv_stem", "bn1", None)
    nodes["bn1"] = src
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            name = f"blocks.{i}.{j}"
            stages += efficientnet_block_stages(name, block, src, dtype)
            nodes[name] = src = name
        nodes[f"blocks.{i}"] = src
    _pool_and_linear(model.global_pool, "global_pool")
    mlp: list[nn.Module] = []
    if type(model).__name__ == "MobileNetV3":
        if not _is_identity(model.norm_head):
            raise UnsupportedModuleError(f"norm_head: {type(model.norm_head).__name__} has no SRD head rule")
        mlp.append(_linear_of_conv1x1(model.conv_head, "conv_head", dtype))
        if not _is_identity(model.act2):
            if not isinstance(model.act2, ACTIVATIONS):
                raise UnsupportedModuleError(f"act2: {type(model.act2).__name__} has no SRD head rule")
            mlp.append(_no_inplace(model.act2))
    else:
        stages.append(conv_bn_stage(model.conv_head, model.bn2, "bn2", src, dtype, "conv_head", "bn2"))
        nodes["bn2"] = src = "bn2"
    if not isinstance(model.classifier, nn.Linear):
        raise UnsupportedModuleError(f"classifier: {type(model.classifier).__name__} has no SRD head rule")
    mlp.append(model.classifier)
    return SRDGraph(stages, Head(src, _global_avg, mlp), nodes)


__all__ = ["avg_down_spec", "bn_act", "build_timm_efficientnet_graph", "build_timm_resnet_graph", "conv_bn_stage",
           "efficientnet_block_stages", "resnet_block_stages", "se_gate"]
