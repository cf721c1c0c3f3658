"""Sharing ratios of a pre-LN ViT (method_spec §2.4), batched over images, computed once per image.

Written by hand: no library implements SRD for transformers. Notation: block l maps the residual stream
x (B,T,D) to y = x + Σ_s c_{s→t} (attention add) and out = y + m (MLP add). ``M_l[b, t, s]`` is the sharing
ratio μ_{s→t} of source token s in target y_t, the skip's ratio on the diagonal; relevance moves from a
block's output to its input as ``R_in = R_out @ M_l`` (R of shape (B, S, T)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import _safe_sqrt  # finite gradient at 0 (differentiable=True)
from .vit_model import Block, BlockRec, Spec, Trace, pool_weights


def _div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0 (the only guard: no ε); overwrites ``num`` when autograd is off."""
    zero = den == 0
    if not bool(zero.any()):
        return num.div_(den) if not torch.is_grad_enabled() else num / den
    return torch.where(zero, torch.zeros_like(num), num / den.masked_fill(zero, 1.0))


def _share(norms: Tensor) -> Tensor:
    """Norm-proportional bias shares over the last dim; an equal split where all norms are zero.

    Overwrites ``norms`` when autograd is off."""
    tot = norms.sum(-1, keepdim=True)
    zero = tot == 0
    if not bool(zero.any()):
        return norms.div_(tot) if not torch.is_grad_enabled() else norms / tot
    return torch.where(zero, torch.full_like(norms, 1.0 / norms.shape[-1]), norms / tot.masked_fill(zero, 1.0))


@dataclass
class BlockShare:
    M: Tensor  # (B, T, S) μ_{s→t} incl. the skip on the diagonal
    share: Tensor | None = None  # (B, T, S) bias share of source token s in target t
    w: Tensor | None = None  # (B, S, H, D) W_O^h W_V^h L(x_s) (tests: explicit contributions)


def block_share(blk: Block, rec: BlockRec, keep: bool = False, keep_w: bool = False) -> BlockShare:
    """Sharing ratios of the attention add of one block.

    Multi-head attention is W_O applied to the concatenated heads, so as for a concatenation
    (method_spec §2.2.9) every (source token s, head h) pair is a path with bias-free contribution
    a_{(s,h)→t} = A^h_{ts} W_O^h W_V^h L₁(x_s) (L₁: LN₁ without shift, σ frozen). The attention bias
    b_attn = W_O(W_V β₁ + b_V) + b_O (value bias, LN₁ shift, output bias) is shared over the paths in
    proportion to ‖a_{(s,h)→t}‖ = A^h_ts ‖W_O^h W_V^h L₁(x_s)‖. Token s's contribution c_{s→t} sums its
    paths; μ = ⟨c, y_t⟩/‖y_t‖², the skip's μ = ⟨x_t, y_t⟩/‖y_t‖², so Σ_s μ_{s→t} = 1 exactly.
    Cost: one D×A projection of y, one T×T×A product (as Q·Kᵀ) and three passes over (B,H,T,S).
    """
    A, v0, y, x = rec.attn, rec.v0, rec.y, rec.x  # A (B,H,T,S); v0 (B,S,H,e)
    B, H, T, S = A.shape
    inplace = not torch.is_grad_enabled()
    woh = blk.wo.view(blk.wo.shape[0], H, -1)  # (D, H, e)
    vh = v0.transpose(1, 2)  # (B,H,S,e)
    gram = woh.permute(1, 2, 0) @ woh.permute(1, 0, 2)  # (H,e,e) W_O^hᵀ W_O^h
    nw = _safe_sqrt(torch.linalg.vecdot(vh @ gram, vh).clamp_min(0))  # (B,H,S) ‖W_O^h W_V^h L₁(x_s)‖
    tot = (A @ nw[..., None])[..., 0].sum(1)  # (B,T) Σ_{s,h} ‖a_{(s,h)→t}‖
    yy = torch.linalg.vecdot(y, y)  # (B,T)
    by = y @ rec.b_attn  # (B,T) ⟨b_attn, y_t⟩
    zero = tot == 0
    coef = _div(by, tot)
    g = (y @ blk.wo).view(B, T, H, -1).transpose(1, 2)  # (B,H,T,e) W_O^hᵀ y_t
    P = g @ v0.permute(0, 2, 3, 1)  # (B,H,T,S) ⟨W_O^h W_V^h L₁(x_s), y_t⟩
    if inplace:
        M = P.addcmul_(coef[:, None, :, None], nw[:, :, None, :]).mul_(A).sum(1)
    else:
        M = ((P + coef[:, None, :, None] * nw[:, :, None, :]) * A).sum(1)
    if bool(zero.any()):  # no path carries any norm: equal bias split over the source tokens
        M = M + (by * zero / S)[..., None]
    M = _div(M, yy[..., None])
    skip = _div(torch.linalg.vecdot(x, y), yy)
    if inplace:
        M.diagonal(dim1=1, dim2=2).add_(skip)
    else:
        M = M + torch.diag_embed(skip)
    share = w = None
    if keep or keep_w:
        n_ts = (A * nw[:, :, None, :]).sum(1)  # (B,T,S)
        share = torch.where(zero[..., None], torch.full_like(n_ts, 1.0 / S),
                            n_ts / tot.masked_fill(zero, 1)[..., None])
    if keep_w:
        w = torch.einsum("bshe,dhe->bshd", v0, woh)
    return BlockShare(M, share, w)


def block_contributions(bs: BlockShare, rec: BlockRec) -> Tensor:
    """Explicit attention contributions c (B, T, S, D) (memory T²·D: for tests and small models)."""
    c = torch.einsum("bhts,bshd->btsd", rec.attn, bs.w)
    return c + bs.share[..., None] * rec.b_attn


def pixel_share(spec: Spec, x: Tensor, tokens0: Tensor) -> Tensor:
    """μ of every pixel in its patch token, (B, H, W) over the h·P × w·P grid.

    Pixel k of patch t contributes c_k = W_k x_k + β_k with W_k the conv kernel at k's offset and
    β_k = (b + pos_t)·‖W_k x_k‖/Σ_{k'∈t}‖W_{k'} x_{k'}‖ (conv bias and position embedding shared as bias).
    """
    P, (h, w), E = spec.patch, spec.grid, spec.n_prefix
    B, D = x.shape[0], tokens0.shape[-1]
    e = tokens0[:, E:]  # (B, h·w, D)
    eg = e.transpose(1, 2).reshape(B, D, h, w)
    num = (x * F.conv_transpose2d(eg, spec.patch_w, stride=P)).sum(1)  # Σ_c x_c (W_kᵀ e_t)_c
    Wk = spec.patch_w.flatten(2)  # (D, C, P²)
    gram = (Wk.permute(2, 1, 0) @ Wk.permute(2, 0, 1)).view(P, P, -1).permute(2, 0, 1).repeat(1, h, w)
    C = x.shape[1]  # gram (C·C, H, W): ⟨W_k[:, c], W_k[:, c']⟩ at each pixel's kernel offset k
    n2 = sum(x[:, c] * x[:, c2] * gram[c * C + c2] for c in range(C) for c2 in range(C))  # ‖W_k x_k‖²
    nrm = _safe_sqrt(n2.clamp_min(0))  # (B,H,W) ‖W_k x_k‖
    blocks = nrm.view(B, h, P, w, P).permute(0, 1, 3, 2, 4).reshape(B, h * w, P * P)
    share = _share(blocks)  # (B, h·w, P²)
    be = (e * (spec.patch_b + spec.pos_patch)).sum(-1)  # ⟨b + pos_t, e_t⟩
    ee = (e * e).sum(-1)
    numb = num.view(B, h, P, w, P).permute(0, 1, 3, 2, 4).reshape(B, h * w, P * P)
    mu = _div(numb + be[..., None] * share, ee[..., None])
    return mu.view(B, h, w, P, P).permute(0, 1, 3, 2, 4).reshape(B, h * P, w * P)


def pixel_contributions(spec: Spec, x: Tensor, tokens0: Tensor) -> Tensor:
    """Explicit per-pixel contributions (B, h·w, P², D) to each patch token (for tests)."""
    P = spec.patch
    cols = F.unfold(x, P, stride=P)  # (B, C·P², h·w)
    B, L = x.shape[0], cols.shape[-1]
    C = x.shape[1]
    cols = cols.view(B, C, P * P, L).permute(0, 3, 2, 1)  # (B, L, P², C)
    Wk = spec.patch_w.flatten(2).permute(2, 0, 1)  # (P², D, C)
    c = torch.einsum("blpc,pdc->blpd", cols, Wk)
    share = _share(c.norm(dim=-1))
    return c + share[..., None] * (spec.patch_b + spec.pos_patch)[None, :, None, :]


def head_affine(spec: Spec, tr: Trace, c: Tensor, token: Tensor | int, pw: Tensor) -> tuple[Tensor, Tensor]:
    """Logit-space image of source vectors landing in final-stream tokens: (F(c) (B,S,K), bias b̃ (B,K)).

    c (B,S,D) are contributions to the final residual token ``token`` (int, or (S,) index per source) with
    pool weight ``pw`` (S,); with frozen LayerNorm σ and head gates the head is affine, logits = Σ F(c) + b̃.
    """
    D = c.shape[-1]
    sf = tr.sig_f[:, token]
    sf = sf[:, None].expand(c.shape[:2]) if sf.ndim == 1 else sf
    v = spec.norm.linear(c, sf) * pw[:, None]
    v = spec.fc_norm.linear(v, tr.sig_fc[:, None].expand(c.shape[:2]))
    b = spec.norm.shift(D, c)[None].expand(c.shape[0], D)
    b = spec.fc_norm.linear(b, tr.sig_fc) + spec.fc_norm.shift(D, c)
    gi = 0
    for kind, a_, b_ in spec.head:
        if kind == "lin":
            v, b = F.linear(v, a_), F.linear(b, a_, b_)
        else:
            v, b = v * tr.head_gates[gi][:, None], b * tr.head_gates[gi]
            gi += 1
    return v, b


def class_relevance(spec: Spec, tr: Trace, target: Tensor, last: tuple[BlockShare, BlockRec] | None
                    ) -> tuple[Tensor, int]:
    """Per-token share of logit ``target`` (B,) at the class-initialisation node: (R (B,T), node index).

    Pooled head: node L (final stream), sources x^L_t. Class-token head: node L−1 (input of the last block),
    sources = the last block's attention sources s (c_{s→cls}), the class token's skip and its MLP term,
    which is sent on through the class token's own sharing ratios (weak point 1). The head bias and final
    LayerNorm shift are shared norm-proportionally by ‖F(c)‖ (logit space), so Σ R = logit exactly.
    """
    L = len(spec.blocks)
    idx = target.view(-1, 1)
    if spec.pool != "token":
        z = tr.last
        T = z.shape[1]
        Fc, b = head_affine(spec, tr, z, torch.arange(T, device=z.device), pool_weights(spec, T, z))
        sh = _share(Fc.norm(dim=-1))
        r = Fc.gather(2, idx[:, None].expand(-1, T, 1))[..., 0] + sh * b.gather(1, idx)
        return r, L
    bs, rec = last
    B, T, D = rec.x.shape
    a0 = (rec.attn[:, :, 0].transpose(1, 2)[..., None] * rec.v0).reshape(B, T, -1)  # (B,S,A)
    c_att = F.linear(a0, spec.blocks[-1].wo) + bs.share[:, 0, :, None] * rec.b_attn  # c_{s→cls}
    src = torch.cat([c_att, rec.x[:, :1], rec.m[:, :1]], 1)  # (B, T+2, D)
    Fc, b = head_affine(spec, tr, src, 0, src.new_ones(T + 2))
    sh = _share(Fc.norm(dim=-1))
    r = Fc.gather(2, idx[:, None].expand(-1, T + 2, 1))[..., 0] + sh * b.gather(1, idx)
    R = r[:, :T].clone()
    R[:, 0] += r[:, T]
    R = R + r[:, T + 1, None] * bs.M[:, 0]  # the MLP term follows y_cls's sharing ratios
    return R, L - 1
