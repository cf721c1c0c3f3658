"""Family surgery for SRD on mobile CNNs: torchvision EfficientNet (MBConv, FusedMBConv), MobileNetV3 and
MobileNetV2 (InvertedResidual with ReLU6; its linear bottleneck, a bare Conv2d + BatchNorm2d, is a node
without activation, summed with the skip when the block has one).

Every ``Conv2dNormActivation`` is one node (conv + BatchNorm folded, ``act`` its activation, called without
in-place writes; no activation: ``act=None``). A block's output is its last node; with a residual
connection it is a node with two branches, the projection conv + BN and the identity skip from the block
input (StochasticDepth is the identity in eval mode).

Squeeze-excitation is frozen as part of the activation pattern: the SE module that follows a node is
folded into that node's activation, ``act(z) = se(σ(z)) = g(σ(z)) · σ(z)``, where the channel gate ``g``
(global pool → fc → act → fc → sigmoid) is computed from this image's own map. Like a ReLU mask, the gate
is treated as a fixed per-element factor: relevance passes through it unchanged (SRD shares relevance by
the pre-activation ``z``), it is not attributed to the pixels that produced the gate, and
``apop_forward`` reuses it (as ``act(z)/z``) for another input.

ConvNeXt (LayerNorm2d) has its own builder, :mod:`.srd_convnext`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import Branch, Head, SRDGraph, Stage, conv_bn_forward, conv_spec
from .base import ACTIVATIONS
from .srd_cnn import activation_fn

Act = Callable[[torch.Tensor], torch.Tensor]


def _no_inplace(m: nn.Module) -> nn.Module:
    """The same element-wise activation, never writing into its input (a shallow copy, parameters shared)."""
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


def _cna_parts(m: nn.Module, name: str) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Module | None]:
    """Conv2d, optional BatchNorm2d and optional activation of a ``Conv2dNormActivation``."""
    parts = list(m.named_children())
    if not parts or not isinstance(parts[0][1], nn.Conv2d):
        raise UnsupportedModuleError(f"{name}: expected Conv2d first in {type(m).__name__}")
    conv, bn, act = parts[0][1], None, None
    for sub, mod in parts[1:]:
        where = f"{name}.{sub}"
        if isinstance(mod, nn.BatchNorm2d) and bn is None and act is None:
            bn = mod
        elif isinstance(mod, ACTIVATIONS) and act is None:
            act = mod
        elif type(mod).__name__ == "LayerNorm2d":
            raise UnsupportedModuleError(
                f"{where}: LayerNorm2d has no SRD rule in {type(m).__name__} (LayerNorm2d is supported in "
                "torchvision ConvNeXt only); supported norms here: BatchNorm2d (folded into the conv)")
        else:
            raise UnsupportedModuleError(f"{where}: module {type(mod).__name__} has no SRD rule inside "
                                         "Conv2dNormActivation (supported: Conv2d, BatchNorm2d, element-wise "
                                         "activations)")
    return conv, bn, act


def _se_fn(se: nn.Module, name: str, dtype: torch.dtype) -> Act:
    """``se(v) = g(v) · v`` with the module's own ops (parameters cast to ``dtype``); g is frozen by SRD."""
    if not (isinstance(se.avgpool, nn.AdaptiveAvgPool2d) and se.avgpool.output_size in (1, (1, 1))
            and isinstance(se.fc1, nn.Conv2d) and isinstance(se.fc2, nn.Conv2d)):
        raise UnsupportedModuleError(f"{name}: SqueezeExcitation with a non-standard layout has no SRD rule")
    w1, w2 = se.fc1.weight.detach().to(dtype), se.fc2.weight.detach().to(dtype)
    b1 = se.fc1.bias.detach().to(dtype) if se.fc1.bias is not None else None
    b2 = se.fc2.bias.detach().to(dtype) if se.fc2.bias is not None else None
    act, scale_act = _no_inplace(se.activation), _no_inplace(se.scale_activation)
    fc1, fc2 = se.fc1, se.fc2

    def forward(v: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(v, 1)
        s = act(F.conv2d(s, w1, b1, fc1.stride, fc1.padding, fc1.dilation, fc1.groups))
        s = scale_act(F.conv2d(s, w2, b2, fc2.stride, fc2.padding, fc2.dilation, fc2.groups))
        return s * v
    return forward


def _then(first: Act, second: Act) -> Act:
    return lambda z: second(first(z))


def _depthwise_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> Act:
    """``bn(conv(u))`` for a depthwise conv by unfold + weighted sum: PyTorch's float64 depthwise conv on CPU
    is 10-40× slower than this (written by hand for speed; float32 keeps the model's own conv op)."""
    w = conv.weight.detach().to(dtype).flatten(1)  # (C, K)
    b = conv.bias.detach().to(dtype) if conv.bias is not None else None
    stats = None
    if bn is not None:
        stats = [t.detach().to(dtype) if t is not None else None
                 for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    k, st, pad, dil = conv.kernel_size, conv.stride, conv.padding, conv.dilation

    def forward(u: torch.Tensor) -> torch.Tensor:
        N, C, H, W = u.shape
        cols = F.unfold(u, k, dil, pad, st).view(N, C, w.shape[1], -1)
        h = (H + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // st[0] + 1
        out = torch.einsum("nckl,ck->ncl", cols, w).view(N, C, h, -1)
        if b is not None:
            out = out + b.view(1, -1, 1, 1)
        return F.batch_norm(out, *stats, False, 0.0, bn.eps) if stats is not None else out
    return forward


def _cna_stage(m: nn.Module, name: str, target: str, source: str, dtype: torch.dtype) -> Stage:
    conv, bn, act = _cna_parts(m, name)
    spec, bias = conv_spec(conv, bn, f"{name}.0", dtype)
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    exact = (_depthwise_forward if depthwise and dtype == torch.float64 else conv_bn_forward)(conv, bn, dtype)
    branch = Branch(source, spec, None, bias, exact)
    return Stage(target, [branch], activation_fn(act) if act is not None else None)


def _block_stages(name: str, block: nn.Module, source: str, dtype: torch.dtype) -> list[Stage]:
    """Stages of an MBConv / FusedMBConv / InvertedResidual; the output node is ``name``."""
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

    body_name = "block" if hasattr(block, "block") else "conv"  # MobileNetV2's InvertedResidual: .conv
    body = getattr(block, body_name, None)
    if not isinstance(body, nn.Sequential) or not hasattr(block, "use_res_connect"):
        raise UnsupportedModuleError(f"{name}: block type {type(block).__name__} has no SRD rule")
    residual = bool(block.use_res_connect)
    parts = _group_conv_bn(list(body.named_children()))
    stages: list[Stage] = []
    src = source
    for k, (sub, m) in enumerate(parts):
        where = f"{name}.{body_name}.{sub}"
        last = k == len(parts) - 1
        if isinstance(m, Conv2dNormActivation | _ConvBN):
            stage = _cna_stage(m, where, where, src, dtype)
            if last and not residual:
                stage.target = name
            elif last and stage.act is None:  # z = project(v) + skip(input)
                stage.target = name
                stage.branches.append(Branch(source))
            stages.append(stage)
            src = stage.target
        elif isinstance(m, SqueezeExcitation):
            if not stages or stages[-1].target != src or stages[-1].act is None:
                raise UnsupportedModuleError(f"{where}: SqueezeExcitation must follow a Conv2dNormActivation "
                                             "with an activation")
            stages[-1].act = _then(stages[-1].act, _se_fn(m, where, dtype))
        else:
            raise UnsupportedModuleError(f"{where}: module {type(m).__name__} has no SRD rule (supported in "
                                         "blocks: Conv2dNormActivation, Conv2d + BatchNorm2d, "
                                         "SqueezeExcitation)")
    if not stages:
        raise UnsupportedModuleError(f"{name}: empty block")
    if stages[-1].target != name:  # residual after an activation: a pure sum node
        stages.append(Stage(name, [Branch(src), Branch(source)], None))
    return stages


class _ConvBN(nn.Sequential):
    """A bare ``Conv2d`` (+ ``BatchNorm2d``) pair of a block body, read like a Conv2dNormActivation without an
    activation (MobileNetV2's linear bottleneck: conv → BN, no ReLU6, then the residual add)."""


def _group_conv_bn(parts: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for sub, m in parts:
        if isinstance(m, nn.BatchNorm2d) and out and isinstance(out[-1][1], _ConvBN) and len(out[-1][1]) == 1:
            out[-1][1].append(m)  # the pair keeps the conv's name; the BN is its module "1"
        elif type(m) is nn.Conv2d:
            out.append((sub, _ConvBN(m)))
        else:
            out.append((sub, m))
    return out


def _is_block(m: nn.Module) -> bool:
    from torchvision.models.efficientnet import FusedMBConv, MBConv
    from torchvision.models.mobilenetv2 import InvertedResidual as InvertedResidualV2
    from torchvision.models.mobilenetv3 import InvertedResidual

    return isinstance(m, (MBConv, FusedMBConv, InvertedResidual, InvertedResidualV2))


def _head(model: nn.Module, source: str, family: str) -> Head:
    avgpool = getattr(model, "avgpool", None)
    if avgpool is None and family == "mobilenetv2":  # MobileNetV2 pools with F.adaptive_avg_pool2d(x, 1)
        avgpool = nn.AdaptiveAvgPool2d(1)
    if not isinstance(avgpool, nn.AdaptiveAvgPool2d) or avgpool.output_size not in (1, (1, 1)):
        raise UnsupportedModuleError(f"avgpool: {type(avgpool).__name__} has no SRD head rule for "
                                     f"{family} (expected AdaptiveAvgPool2d(1))")
    mlp = []
    for i, m in enumerate(model.classifier):
        if isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten)):
            mlp.append(m)
        elif isinstance(m, ACTIVATIONS):
            mlp.append(_no_inplace(m))
        else:
            raise UnsupportedModuleError(f"classifier.{i}: module {type(m).__name__} has no SRD head rule "
                                         "(supported: Linear, Dropout, Identity, Flatten, element-wise activations)")
    if not any(isinstance(m, nn.Linear) for m in mlp):
        raise UnsupportedModuleError(f"{family}: no Linear classifier found after the last conv stage")
    return Head(source, lambda v: F.adaptive_avg_pool2d(v, 1), mlp)


def build_mobile_graph(model: nn.Module, dtype: torch.dtype, family: str = "efficientnet") -> SRDGraph:
    """torchvision EfficientNet (v1/v2), MobileNetV3 or MobileNetV2: ``features`` → stages, (avg)pool +
    classifier → head.

    Layer ids: ``features.i`` for stem/last conv and flat blocks (MobileNetV3), ``features.i.j`` for the
    blocks of an EfficientNet stage and ``features.i`` for the stage (its last block's output).
    """
    from torchvision.ops.misc import Conv2dNormActivation

    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    src = "input"
    for i, m in enumerate(model.features):
        name = f"features.{i}"
        if isinstance(m, Conv2dNormActivation):
            stages.append(_cna_stage(m, name, name, src, dtype))
            src = name
        elif _is_block(m):
            stages += _block_stages(name, m, src, dtype)
            src = name
        elif isinstance(m, nn.Sequential):
            for j, block in enumerate(m):
                bname = f"{name}.{j}"
                if not _is_block(block):
                    raise UnsupportedModuleError(f"{bname}: module {type(block).__name__} has no SRD rule")
                stages += _block_stages(bname, block, src, dtype)
                nodes[bname] = bname
                src = bname
        else:
            raise UnsupportedModuleError(f"{name}: module {type(m).__name__} has no SRD rule")
        nodes[name] = src
    return SRDGraph(stages, _head(model, src, family), nodes)


__all__ = ["build_mobile_graph"]
