"""Family surgery for SRD on torchvision Swin Transformer v1 (swin_t/s/b): the stage graph.

Token grids are graph nodes (N, C, h, w) (torchvision keeps them channels-last (N, h, w, C); the graph
permutes). Every LayerNorm's σ is frozen (as in the ViT and ConvNeXt rules). Nodes:

* ``features.0`` (patch embedding): ``LN(conv4×4/4(x))`` = ``s_q·(P W) ∗ x + (s_q·P b + β)``, P = diag(γ)(I −
  11ᵀ/C) folded into the conv, per-target scale s_q = 1/σ_q (as the ConvNeXt stem);
* block ``features.i.j``: the whole block as one branch (:class:`~sae_cafe.srd.window_attention.
  WindowBlockBranch`: shifted window attention with relative position bias as frozen attention, the MLP add
  token-wise); stochastic depth is the identity in eval;
* patch merging ``features.i`` (i even ≥ 2): the 2×2 neighbours concatenated (torchvision order (0,0), (1,0),
  (0,1), (1,1)) → LayerNorm over 4C (σ frozen per target) → Linear: one 2×2/2 convolution with kernel
  W·diag(γ)(I − 11ᵀ/4C) split by neighbour, per-target scale 1/σ_q, bias W β (+ b); paths = the 4 neighbours
  (concatenation, method_spec §2.2.9);
* ``norm``: the final LayerNorm (a 1×1 map P with per-target scale, bias β); head: global average pool →
  ``head`` Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..srd.graph import Branch, ConvSpec, FrozenAffine, Head, SRDGraph, Stage, layer_norm_params
from ..srd.window_attention import WindowBlockBranch, WindowBlockParams

#: torchvision PatchMerging concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]
MERGE_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))


def _ln(m: nn.Module, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    if type(m) is not nn.LayerNorm:
        raise UnsupportedModuleError(f"{name}: expected nn.LayerNorm, got {type(m).__name__}")
    return layer_norm_params(m, dtype)


def _centred(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """diag(γ)(I − 11ᵀ/C)·w over dim 0 (the LayerNorm's linear part with σ frozen, applied after w)."""
    return gamma.view(-1, *([1] * (w.ndim - 1))) * (w - w.mean(0, keepdim=True))


def _ln_stage(name: str, source: str, ln: tuple, conv: ConvSpec, bias_pre: torch.Tensor | None,
              forward) -> Stage:
    """``LN(conv(v) + b)`` with σ frozen per target: ``s_q·(P W) ∗ v + s_q·P b + β``."""
    gamma, beta, eps = ln
    pb = _centred(bias_pre, gamma) if bias_pre is not None else None

    def freeze(v: torch.Tensor) -> FrozenAffine:
        y = forward(v)  # (N, C, h, w) before the LayerNorm
        s = torch.rsqrt(y.var(1, correction=0, keepdim=True) + eps)
        out = F.layer_norm(y.permute(0, 2, 3, 1), gamma.shape, gamma, beta, eps).permute(0, 3, 1, 2)
        bias = beta.view(1, -1, 1, 1) + (s * pb.view(1, -1, 1, 1) if pb is not None else 0)
        return FrozenAffine(out, v, s, bias)

    return Stage(name, [Branch(source, conv, freeze=freeze)], None)


def _stem(m: nn.Module, dtype: torch.dtype) -> Stage:
    from torchvision.ops.misc import Permute

    parts = list(m.children())
    if not (len(parts) == 3 and isinstance(parts[0], nn.Conv2d) and isinstance(parts[1], Permute)
            and list(parts[1].dims) == [0, 2, 3, 1]):
        raise UnsupportedModuleError("features.0: expected the Swin patch embedding Conv2d, Permute, LayerNorm")
    conv = parts[0]
    if conv.padding not in (0, (0, 0)) or conv.groups != 1 or conv.dilation not in (1, (1, 1)):
        raise UnsupportedModuleError("features.0.0: only an unpadded dense patch-embedding conv is supported")
    ln = _ln(parts[2], "features.0.2", dtype)
    w = conv.weight.detach().to(dtype)
    b = conv.bias.detach().to(dtype) if conv.bias is not None else None
    spec = ConvSpec(_centred(w, ln[0]), tuple(conv.stride), (0, 0), (1, 1), 1, "features.0.0")
    return _ln_stage("features.0", "input", ln, spec, b, lambda x: F.conv2d(x, w, b, conv.stride))


def _merge(m: nn.Module, name: str, source: str, dtype: torch.dtype) -> Stage:
    from torchvision.models.swin_transformer import PatchMerging

    if type(m) is not PatchMerging:
        raise UnsupportedModuleError(f"{name}: {type(m).__name__} has no SRD rule (Swin v1 PatchMerging only; "
                                     "Swin v2's PatchMergingV2 is not supported)")
    gamma, beta, eps = _ln(m.norm, f"{name}.norm", dtype)
    W = m.reduction.weight.detach().to(dtype)  # (2C, 4C)
    rb = m.reduction.bias.detach().to(dtype) if m.reduction.bias is not None else None
    C = W.shape[1] // 4
    K = W * gamma  # W diag(γ)(I − 11ᵀ/4C), (2C, 4C): the LayerNorm's linear part, then W
    K = K - K.mean(1, keepdim=True)
    weight = torch.zeros(W.shape[0], C, 2, 2, dtype=dtype)
    for g, (dr, dc) in enumerate(MERGE_OFFSETS):
        weight[:, :, dr, dc] = K[:, g * C:(g + 1) * C]
    bias = W @ beta + (rb if rb is not None else 0)

    def freeze(v: torch.Tensor) -> FrozenAffine:
        if v.shape[-2] % 2 or v.shape[-1] % 2:
            raise UnsupportedModuleError(f"{name}: an odd {tuple(v.shape[-2:])} grid is padded by PatchMerging "
                                         "(no SRD rule): use an input size whose stage grids are even")
        x = v.permute(0, 2, 3, 1)
        cat = torch.cat([x[:, dr::2, dc::2] for dr, dc in MERGE_OFFSETS], -1)  # (N, h, w, 4C)
        s = torch.rsqrt(cat.var(-1, correction=0, keepdim=True) + eps).permute(0, 3, 1, 2)
        out = F.linear(F.layer_norm(cat, gamma.shape, gamma, beta, eps), W, rb).permute(0, 3, 1, 2)
        return FrozenAffine(out, v, s)

    return Stage(name, [Branch(source, ConvSpec(weight, (2, 2), (0, 0), (1, 1), 1, name), None, bias,
                               freeze=freeze)], None)


def _block(blk: nn.Module, name: str, source: str, dtype: torch.dtype) -> Stage:
    from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformerBlock
    from torchvision.ops.misc import MLP

    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    if type(blk) is not SwinTransformerBlock or type(attn) is not ShiftedWindowAttention or not isinstance(mlp, MLP):
        raise UnsupportedModuleError(f"{name}: {type(blk).__name__} has no SRD rule (Swin v1 SwinTransformerBlock "
                                     "with ShiftedWindowAttention and an MLP; Swin v2 blocks are not supported)")
    lins = [m for m in mlp if isinstance(m, nn.Linear)]
    acts = [m for m in mlp if not isinstance(m, (nn.Linear, nn.Dropout))]
    if len(lins) != 2 or len(acts) != 1 or not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[1], type(acts[0])):
        raise UnsupportedModuleError(f"{name}.mlp: expected Linear, activation, Dropout, Linear, Dropout")

    def t(p):
        return p.detach().to(dtype) if p is not None else None

    C = attn.qkv.in_features
    zeros = torch.zeros(C, dtype=dtype)
    p = WindowBlockParams(
        ln1=_ln(blk.norm1, f"{name}.norm1", dtype), ln2=_ln(blk.norm2, f"{name}.norm2", dtype),
        wqkv=t(attn.qkv.weight),
        bqkv=t(attn.qkv.bias) if attn.qkv.bias is not None else torch.zeros(3 * C, dtype=dtype),
        rel_bias=t(attn.get_relative_position_bias())[0], heads=attn.num_heads,
        window=tuple(attn.window_size), shift=tuple(attn.shift_size), wo=t(attn.proj.weight),
        bo=t(attn.proj.bias) if attn.proj.bias is not None else zeros,
        fc1=(t(lins[0].weight), t(lins[0].bias)), fc2=(t(lins[1].weight), t(lins[1].bias)), act=acts[0])
    return Stage(name, [WindowBlockBranch(source, p, name)], None)


def build_swin_graph(model: nn.Module, dtype: torch.dtype) -> SRDGraph:
    """torchvision SwinTransformer (v1) → stage graph; layer ids ``features.0``, ``features.i.j`` (blocks),
    ``features.i`` (a stage = its last block, or a patch merging)."""
    from torchvision.models.swin_transformer import PatchMerging

    stages: list[Stage] = []
    nodes: dict[str, str] = {}
    src = "input"
    for i, m in enumerate(model.features):
        name = f"features.{i}"
        if i == 0:
            stages.append(_stem(m, dtype))
            src = name
        elif isinstance(m, PatchMerging) or "Merging" in type(m).__name__:
            stages.append(_merge(m, name, src, dtype))
            src = name
        elif isinstance(m, nn.Sequential):
            for j, blk in enumerate(m):
                stages.append(_block(blk, f"{name}.{j}", src, dtype))
                nodes[f"{name}.{j}"] = src = f"{name}.{j}"
        else:
            raise UnsupportedModuleError(f"{name}: {type(m).__name__} has no Swin SRD rule")
        nodes[name] = src
    gamma, beta, eps = _ln(model.norm, "norm", dtype)
    P = _centred(torch.eye(gamma.shape[0], dtype=dtype), gamma)[:, :, None, None]
    stages.append(_ln_stage("norm", src, (gamma, beta, eps), ConvSpec(P, name="norm"), None, lambda v: v))
    if not isinstance(model.avgpool, nn.AdaptiveAvgPool2d) or not isinstance(model.head, nn.Linear):
        raise UnsupportedModuleError("swin: expected avgpool = AdaptiveAvgPool2d(1) and a Linear head")
    return SRDGraph(stages, Head("norm", lambda v: F.adaptive_avg_pool2d(v, 1), [model.head]), nodes)


__all__ = ["MERGE_OFFSETS", "build_swin_graph"]
