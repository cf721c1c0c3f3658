"""Family surgery for SRD on torchvision ConvNeXt (convnext_tiny/small/base/large).

Every LayerNorm normalises the channel vector at one position: ``LN(y)_q = s_q·P·y_q + β`` with
``P = diag(γ)(I − 11ᵀ/C)`` fixed and ``s_q = 1/σ_q``. SRD freezes σ_q as part of the activation pattern (as
the ViT rules and the SE gates of EfficientNet do): the centring stays a linear projection inside every
contribution, only β is a bias, and relevance never flows into σ. With σ frozen the network is a chain of
affine stages separated by the GELUs:

* stem ``features.0`` (node): ``s_q·(P W) ∗ x + (s_q·P b + β)`` — P folded into the 4×4/4 conv, per-target
  scale s_q and bias map (see :func:`sae_cafe.srd.engine._frozen_mu`);
* CNBlock ``features.i.j``: node ``features.i.j.block.4`` (pre-GELU) ``s_q·(W1 P)·dwconv7×7(v) +
  (s_q·W1 P b_dw + W1 β + b1)`` — a depthwise conv with a fixed post matrix (rule in
  :mod:`sae_cafe.srd.rules_post`), paths = the 49 depthwise offsets; block output (node) ``v + (ls ⊙ W2)·
  GELU(h) + ls ⊙ b2`` — the layer scale folded into the second Linear, an identity skip, stochastic depth off
  (eval);
* downsample ``features.i`` (node): ``(W P) ∗ (s ⊙ v) + (b + Σ_k W_k β)`` — the source map scaled per
  *source* position (each contribution still belongs to its source PFV), P folded into the 2×2/2 conv;
* head: global average pool → LayerNorm (σ frozen, :class:`~sae_cafe.srd.graph.FrozenLayerNorm`) → Linear.

Layer ids: ``features.0`` (stem), ``features.i.j`` (CNBlock outputs), ``features.i`` (a stage = its last
block, or a downsampling layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import (
    Branch,
    ConvSpec,
    FrozenAffine,
    FrozenLayerNorm,
    Head,
    SRDGraph,
    Stage,
    _pair,
    layer_norm_params,
)
from .base import ACTIVATIONS
from .srd_cnn import activation_fn
from .srd_mobile import _depthwise_forward

Freeze = Callable[[torch.Tensor], FrozenAffine]


@dataclass
class PartsAffine(FrozenAffine):
    """A CNBlock's :class:`FrozenAffine`, with the node also known as ``out = scale·post·d + c``
    (``node_parts = (d, c)``: d (N, h, w, C) the depthwise output with its bias, channel-last; c (C_out,)
    = W1 β + b1). The depthwise-path rule then gets postᵀz from d instead of multiplying the 4C-channel node
    (:func:`sae_cafe.srd.rules_post.post_branch_mu`)."""

    node_parts: tuple[torch.Tensor, torch.Tensor] | None = None
    #: (p, c), both (C_out,): the bias map is scale·p + c, built only when read (:meth:`bias_map`); ⟨b_q, z_q⟩
    #: comes from two dot products per target instead (:meth:`bias_dot`)
    bias_vectors: tuple[torch.Tensor, torch.Tensor] | None = None

    def bias_map(self) -> torch.Tensor | None:
        if self.bias is None and self.bias_vectors is not None:
            p, c = self.bias_vectors
            self.bias = self.scale * p.view(1, -1, 1, 1) + c.view(1, -1, 1, 1)
        return self.bias

    def bias_dot(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.bias is not None or self.bias_vectors is None:
            return super().bias_dot(z)
        pc = z.permute(0, 2, 3, 1) @ torch.stack(self.bias_vectors, 1)  # (N, h', w', 2): ⟨p, z_q⟩, ⟨c, z_q⟩
        return self.scale[:, 0] * pc[..., 0] + pc[..., 1]


def _inv_sigma(t: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """1/σ over dimension ``dim`` (kept, size 1), two-pass: E[(t − E t)²]. Same values as ``Tensor.var`` up to
    float rounding; measured 2-50× faster than it on CPU (``var`` was ≈ 4 % of a ConvNeXt SRD call)."""
    c = t - t.mean(dim, keepdim=True)
    return torch.rsqrt((c * c).mean(dim, keepdim=True) + eps)


def _is_ln2d(m: nn.Module) -> bool:
    from torchvision.models.convnext import LayerNorm2d

    return isinstance(m, LayerNorm2d) and type(m).forward is LayerNorm2d.forward


def _check_conv(conv: nn.Module, name: str, depthwise: bool = False) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModuleError(f"{name}: expected a Conv2d with numeric zero padding, got {conv!r}")
    if depthwise and not (conv.groups == conv.in_channels == conv.out_channels):
        raise UnsupportedModuleError(f"{name}: expected a depthwise Conv2d (groups = channels)")
    if not depthwise and conv.groups != 1:
        raise UnsupportedModuleError(f"{name}: grouped Conv2d has no ConvNeXt SRD rule")
    return conv


def _ln2d(t: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """torchvision's LayerNorm2d: layer_norm over the channels of (N, C, h, w)."""
    return F.layer_norm(t.permute(0, 2, 3, 1), gamma.shape, gamma, beta, eps).permute(0, 3, 1, 2)


def _conv_params(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().to(dtype)
    b = conv.bias.detach().to(dtype) if conv.bias is not None else torch.zeros(w.shape[0], dtype=dtype)
    return w, b


def _spec(conv: nn.Conv2d, weight: torch.Tensor, name: str, post: torch.Tensor | None = None) -> ConvSpec:
    return ConvSpec(weight, _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation), conv.groups, name, post)


def _stem_stage(m: nn.Module, name: str, dtype: torch.dtype) -> Stage:
    """``LN2d(conv(x) + b)``: node ``features.0``, no activation."""
    parts = list(m.children())
    if len(parts) != 2 or not _is_ln2d(parts[1]):
        raise UnsupportedModuleError(f"{name}: expected the ConvNeXt stem Conv2d + LayerNorm2d, got "
                                     f"{[type(p).__name__ for p in parts]}")
    conv = _check_conv(parts[0], f"{name}.0")
    w, b = _conv_params(conv, dtype)
    gamma, beta, eps = layer_norm_params(parts[1], dtype)
    pw = gamma.view(-1, 1, 1, 1) * (w - w.mean(0, keepdim=True))  # P·W_k for every offset k
    pb = gamma * (b - b.mean())
    st, pad, dil = conv.stride, conv.padding, conv.dilation

    def freeze(x: torch.Tensor) -> FrozenAffine:
        y = F.conv2d(x, w, b, st, pad, dil)
        s = _inv_sigma(y, 1, eps)
        return FrozenAffine(_ln2d(y, gamma, beta, eps), x, s, s * pb.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1))

    return Stage(name, [Branch("input", _spec(conv, pw, f"{name}.0"), freeze=freeze)], None)


def _block_stages(name: str, block: nn.Module, source: str, dtype: torch.dtype) -> list[Stage]:
    """CNBlock: node ``{name}.block.4`` (pre-GELU, 4C channels) and the block output node ``name``."""
    body = getattr(block, "block", None)
    kinds = [type(p).__name__ for p in body] if isinstance(body, nn.Sequential) else []
    if (kinds[:1] != ["Conv2d"] or kinds[1:3] != ["Permute", "LayerNorm"] or len(kinds) != 7
            or kinds[3] != "Linear" or kinds[5:] != ["Linear", "Permute"] or not isinstance(body[4], ACTIVATIONS)
            or list(body[1].dims) != [0, 2, 3, 1] or list(body[6].dims) != [0, 3, 1, 2]
            or type(body[2]) is not nn.LayerNorm):
        raise UnsupportedModuleError(f"{name}: CNBlock layout {kinds} has no SRD rule (expected Conv2d, Permute, "
                                     "LayerNorm, Linear, element-wise activation, Linear, Permute)")
    dw = _check_conv(body[0], f"{name}.block.0", depthwise=True)
    lin1, lin2 = body[3], body[5]
    w_dw, b_dw = _conv_params(dw, dtype)
    gamma, beta, eps = layer_norm_params(body[2], dtype)
    w1 = lin1.weight.detach().to(dtype)
    b1 = lin1.bias.detach().to(dtype) if lin1.bias is not None else torch.zeros(w1.shape[0], dtype=dtype)
    m = w1 * gamma.view(1, -1)
    post = m - m.mean(1, keepdim=True)  # W1·P, (4C, C)
    post_b = post @ b_dw  # scaled by s_q
    const_b = w1 @ beta + b1
    dwconv = (_depthwise_forward(dw, None, dtype) if dtype == torch.float64 else
              (lambda u: F.conv2d(u, w_dw, b_dw, dw.stride, dw.padding, dw.dilation, dw.groups)))

    def freeze(v: torch.Tensor) -> FrozenAffine:
        d = dwconv(v).permute(0, 2, 3, 1).contiguous()  # channel-last, as the model's Permute + LayerNorm
        # σ over the contiguous channels (a strided channel reduction on (N, C, h, w) measured ~4% of SRD)
        s = _inv_sigma(d, -1, eps).permute(0, 3, 1, 2)  # (N, 1, h, w)
        ln = F.layer_norm(d, gamma.shape, gamma, beta, eps)
        h = F.linear(ln, w1, b1).permute(0, 3, 1, 2)
        return PartsAffine(h, v, s, node_parts=(d, const_b), bias_vectors=(post_b, const_b))

    inner = f"{name}.block.4"
    first = Stage(inner, [Branch(source, _spec(dw, w_dw, f"{name}.block.0", post), freeze=freeze)],
                  activation_fn(body[4]))
    ls = block.layer_scale.detach().to(dtype).reshape(-1)
    w2 = lin2.weight.detach().to(dtype)
    b2 = lin2.bias.detach().to(dtype) if lin2.bias is not None else torch.zeros(w2.shape[0], dtype=dtype)
    if ls.numel() != w2.shape[0]:
        raise UnsupportedModuleError(f"{name}.layer_scale: shape {tuple(block.layer_scale.shape)} has no SRD rule")

    def second(u: torch.Tensor) -> torch.Tensor:  # the model's ops: layer_scale · Linear2(GELU(h))
        return (F.linear(u.permute(0, 2, 3, 1), w2, b2) * ls).permute(0, 3, 1, 2)  # scaled channel-last

    proj = Branch(inner, ConvSpec((ls.view(-1, 1) * w2)[:, :, None, None], name=f"{name}.block.5"), None,
                  ls * b2, second)
    return [first, Stage(name, [proj, Branch(source)], None)]


def _downsample_stage(m: nn.Sequential, name: str, source: str, dtype: torch.dtype) -> Stage:
    """``conv(LN2d(v))``: the LayerNorm's σ scales the source PFVs; node ``name``, no activation."""
    conv = _check_conv(m[1], f"{name}.1")
    if _pair(conv.padding) != (0, 0):
        raise UnsupportedModuleError(f"{name}.1: a padded conv after LayerNorm2d has no SRD rule")
    w, b = _conv_params(conv, dtype)
    gamma, beta, eps = layer_norm_params(m[0], dtype)
    g = w * gamma.view(1, -1, 1, 1)
    wp = g - g.mean(1, keepdim=True)  # W_k·P
    bias = b + w.sum((2, 3)) @ beta
    st, dil = conv.stride, conv.dilation

    def freeze(v: torch.Tensor) -> FrozenAffine:
        s = _inv_sigma(v, 1, eps)
        out = F.conv2d(_ln2d(v, gamma, beta, eps), w, b, st, 0, dil)
        return FrozenAffine(out, v * s, transform=lambda u: u * s)

    return Stage(name, [Branch(source, _spec(conv, wp, f"{name}.1"), None, bias, freeze=freeze)], None)


def _head(model: nn.Module, source: str, dtype: torch.dtype) -> Head:
    if not isinstance(model.avgpool, nn.AdaptiveAvgPool2d) or model.avgpool.output_size not in (1, (1, 1)):
        raise UnsupportedModuleError(f"avgpool: {type(model.avgpool).__name__} has no SRD head rule for ConvNeXt "
                                     "(expected AdaptiveAvgPool2d(1))")
    mlp: list[nn.Module] = []
    for i, m in enumerate(model.classifier):
        if _is_ln2d(m) or type(m) is nn.LayerNorm:
            if mlp:
                raise UnsupportedModuleError(f"classifier.{i}: LayerNorm only first in the ConvNeXt head")
            gamma, beta, eps = layer_norm_params(m, dtype)
            mlp.append(FrozenLayerNorm(gamma, beta, eps))
        elif isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten)):
            mlp.append(m)
        else:
            raise UnsupportedModuleError(f"classifier.{i}: module {type(m).__name__} has no SRD head rule "
                                         "(supported: LayerNorm2d, Flatten, Linear, Dropout, Identity)")
    if not any(isinstance(m, nn.Linear) for m in mlp):
        raise UnsupportedModuleError("convnext: no Linear classifier found after the last stage")
    return Head(source, lambda v: F.adaptive_avg_pool2d(v, 1), mlp)


def build_convnext_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """torchvision ConvNeXt: ``features`` → stages, avgpool + classifier (LayerNorm2d, Linear) → head."""
    from torchvision.models.convnext import CNBlock
    from torchvision.ops.misc import Conv2dNormActivation

    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    src = "input"
    for i, m in enumerate(model.features):
        name = f"features.{i}"
        if i == 0 and isinstance(m, Conv2dNormActivation):
            stages.append(_stem_stage(m, name, dtype))
            src = name
        elif isinstance(m, nn.Sequential) and len(m) and all(type(b) is CNBlock for b in m):
            for j, block in enumerate(m):
                bname = f"{name}.{j}"
                stages += _block_stages(bname, block, src, dtype)
                nodes[bname] = src = bname
        elif isinstance(m, nn.Sequential) and len(m) == 2 and _is_ln2d(m[0]) and isinstance(m[1], nn.Conv2d):
            stages.append(_downsample_stage(m, name, src, dtype))
            src = name
        else:
            kind = type(m).__name__
            inner = [type(c).__name__ for c in m.children()]
            raise UnsupportedModuleError(f"{name}: module {kind} {inner} has no ConvNeXt SRD rule (supported: "
                                         "stem Conv2d + LayerNorm2d, stages of CNBlocks, LayerNorm2d + Conv2d "
                                         "downsampling)")
        nodes[name] = src
    return SRDGraph(stages, _head(model, src, dtype), nodes)


__all__ = ["build_convnext_graph"]
