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

from ..errors import MismatchError
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
    if not vh.is_contiguous():  # batched matmuls below are several times faster on contiguous operands
        vh = vh.contiguous()
    gram = woh.permute(1, 2, 0) @ woh.permute(1, 0, 2)  # (H,e,e) W_O^hᵀ W_O^h
    nw = _safe_sqrt(torch.linalg.vecdot(vh @ gram, vh).clamp_min(0))  # (B,H,S) ‖W_O^h W_V^h L₁(x_s)‖
    tot = (A @ nw[..., None])[..., 0].sum(1)  # (B,T) Σ_{s,h} ‖a_{(s,h)→t}‖
    yy = torch.linalg.vecdot(y, y)  # (B,T)
    by = y @ rec.b_attn  # (B,T) ⟨b_attn, y_t⟩
    zero = tot == 0
    coef = _div(by, tot)
    g = (y @ blk.wo).view(B, T, H, -1).transpose(1, 2).contiguous()  # (B,H,T,e) W_O^hᵀ y_t
    P = g @ vh.transpose(-2, -1)  # (B,H,T,S) ⟨W_O^h W_V^h L₁(x_s), y_t⟩
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


def _pre_kernel(spec: Spec) -> Tensor:
    """Patch kernel in the target space of the pixel stage, for the norms only: γ ⊙ P W_k with ``norm_pre``
    (P the centring over D; σ_t cancels in the shares of one token), W_k without."""
    W, ln = spec.patch_w, spec.norm_pre
    if ln.identity:
        return W
    W = W - W.mean(0, keepdim=True)
    return W * ln.weight[:, None, None, None] if ln.weight is not None else W


def pixel_share(spec: Spec, x: Tensor, tokens0: Tensor, sig_pre: Tensor | None = None) -> Tensor:
    """μ of every pixel in its patch token, (B, H, W) over the h·P × w·P grid.

    Pixel k of patch t contributes c_k = G_t W_k x_k + β_k with W_k the conv kernel at k's offset, G_t the
    frozen ``norm_pre`` (γ ⊙ P(·)/σ_t; identity without one) and β_k = (G_t(b + pos_t) + β_pre)·‖c⁰_k‖ /
    Σ_{k'∈t}‖c⁰_{k'}‖, c⁰_k = G_t W_k x_k (conv bias, position embedding and norm_pre shift shared as bias).
    The target is the token z_t = tokens0[t]; ⟨G_t v, z_t⟩ = ⟨v, G_tᵀ z_t⟩ keeps it one transposed conv.
    ``sig_pre`` (B, T): σ of norm_pre (needed when the spec has one).
    """
    P, (h, w), E = spec.patch, spec.grid, spec.n_prefix
    B, D = x.shape[0], tokens0.shape[-1]
    z = tokens0[:, E:]  # (B, h·w, D) targets
    if spec.norm_pre.identity:
        u = z
    else:
        if sig_pre is None:
            raise MismatchError(f"{spec.name}: pixel_share needs norm_pre's σ (sig_pre)")
        u = spec.norm_pre.adjoint(z, sig_pre[:, E:])  # G_tᵀ z_t
    C = x.shape[1]
    # W_kᵀ u_t for every pixel: the transposed patch conv as one matmul (stride = kernel: no overlap)
    back = (u @ spec.patch_w.reshape(D, -1)).view(B, h, w, C, P, P).permute(0, 3, 1, 4, 2, 5)
    num = (x * back.reshape(B, C, h * P, w * P)).sum(1)  # Σ_c x_c (W_kᵀ G_tᵀ z_t)_c
    Wk = _pre_kernel(spec).flatten(2).permute(2, 0, 1).contiguous()  # (P², D, C) (strided bmm is very slow)
    G = Wk.transpose(1, 2) @ Wk  # (P², C, C) Grams ⟨W_k[:, c], W_k[:, c']⟩ per kernel offset k
    cols = x.reshape(B, C, h, P, w, P).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, P * P, C)  # pixel vectors
    n2 = (torch.einsum("blpc,pcd->blpd", cols, G) * cols).sum(-1)  # (B, h·w, P²) ‖W_k x_k‖²
    blocks = _safe_sqrt(n2.clamp_min(0))  # ‖W_k x_k‖ (up to the token's 1/σ_t, which cancels)
    share = _share(blocks)  # (B, h·w, P²)
    be = (u * (spec.patch_b + spec.pos_patch)).sum(-1)  # ⟨G_t(b + pos_t), z_t⟩
    if not spec.norm_pre.identity:
        be = be + z @ spec.norm_pre.shift(D, z)
    ee = (z * z).sum(-1)
    numb = num.view(B, h, P, w, P).permute(0, 1, 3, 2, 4).reshape(B, h * w, P * P)
    mu = _div(numb + be[..., None] * share, ee[..., None])
    return mu.view(B, h, w, P, P).permute(0, 1, 3, 2, 4).reshape(B, h * P, w * P)


def pixel_contributions(spec: Spec, x: Tensor, tokens0: Tensor, sig_pre: Tensor | None = None) -> Tensor:
    """Explicit per-pixel contributions (B, h·w, P², D) to each patch token (for tests)."""
    P, E = spec.patch, spec.n_prefix
    cols = F.unfold(x, P, stride=P)  # (B, C·P², h·w)
    B, L = x.shape[0], cols.shape[-1]
    C = x.shape[1]
    cols = cols.view(B, C, P * P, L).permute(0, 3, 2, 1)  # (B, L, P², C)
    Wk = spec.patch_w.flatten(2).permute(2, 0, 1)  # (P², D, C)
    c = torch.einsum("blpc,pdc->blpd", cols, Wk)
    bias = (spec.patch_b + spec.pos_patch)[None].expand(B, -1, -1)  # (B, L, D)
    if not spec.norm_pre.identity:
        s = sig_pre[:, E:]
        c = spec.norm_pre.linear(c, s[..., None].expand(c.shape[:-1]))
        bias = spec.norm_pre.linear(bias, s) + spec.norm_pre.shift(c.shape[-1], c)
    share = _share(c.norm(dim=-1))
    return c + share[..., None] * bias[:, :, None, :]


def _pool_affine(spec: Spec, tr: Trace, v: Tensor, token: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention-pool head as an affine map (probabilities, LayerNorm σ and MLP gates frozen).

    v (B,S,D) bias-free normed contributions at final tokens ``token`` (S,), b (B,D) their bias; returns the
    pooled (B,S,Do) and bias (B,Do). Each source reaches latent q through Σ_h A^h_{q,s} W_O^h W_V^h (the
    value and output biases pass since Σ_s A^h_{q,s} = 1); the MLP residual p + W₂(g ⊙ W₁ LN(p)) is affine
    in p with σ and the gates g frozen."""
    ap, st = spec.attn_pool, tr.pool
    B, S, D = v.shape
    H = ap.heads
    E = 0 if ap.include_prefix else spec.n_prefix
    A = st.attn  # (B,H,Lq,S')
    Lq = A.shape[2]
    tok = token - E
    ok = (tok >= 0) & (tok < A.shape[-1])  # tokens outside the pool contribute nothing
    a = A[..., tok.clamp(0, A.shape[-1] - 1)] * ok  # (B,H,Lq,S)
    vh = F.linear(v, ap.wv).view(B, S, H, -1)  # (B,S,H,e)
    o = torch.einsum("bhqs,bshe->bsqhe", a, vh).reshape(B, S, Lq, -1)
    pv = F.linear(o, ap.wo)  # (B,S,Lq,Do)
    pb = F.linear(F.linear(b, ap.wv, ap.bv), ap.wo, ap.bo)[:, None].expand(B, Lq, -1)  # (B,Lq,Do)
    if ap.fc1 is not None:
        Do, g = pv.shape[-1], st.gate  # g (B,Lq,F)
        hv = F.linear(ap.norm.linear(pv, st.sig[:, None].expand(B, S, Lq)), ap.fc1.weight) * g[:, None]
        pv = pv + F.linear(hv, ap.fc2.weight)
        hb = F.linear(ap.norm.linear(pb, st.sig) + ap.norm.shift(Do, pb), ap.fc1.weight, ap.fc1.bias)
        pb = pb + F.linear(hb * g, ap.fc2.weight, ap.fc2.bias)
    if ap.pool == "token":
        return pv[:, :, 0], pb[:, 0]
    return pv.mean(2), pb.mean(1)


def head_affine(spec: Spec, tr: Trace, c: Tensor, token: Tensor | int, pw: Tensor | None = None,
                readout: int = 0) -> tuple[Tensor, Tensor]:
    """Output-space image of source vectors landing in final-stream tokens: (F(c) (B,S,K), bias b̃ (B,K)).

    c (B,S,D) are contributions to the final residual token ``token`` (int, or (S,) index per source) with
    pool weight ``pw`` (S,) ("token"/"avg" pools; unused for "map"). ``readout`` picks the head of a token
    readout (distilled DeiT: 0 the class head, 1 the distillation head, each weighted ½). With frozen
    LayerNorm σ, attention-pool probabilities and head gates the head is affine: output = Σ F(c) + b̃.
    """
    B, S, D = c.shape
    tok = torch.as_tensor(token, device=c.device).expand(S) if not isinstance(token, Tensor) or token.ndim == 0 \
        else token
    sf = tr.sig_f[:, tok]  # (B,S)
    v = spec.norm.linear(c, sf)
    b = spec.norm.shift(D, c)[None].expand(B, D)
    if spec.pool == "map":
        v, b = _pool_affine(spec, tr, v, tok, b)
    elif spec.pool == "cls_avg":  # [class token, mean patch token]: token t lands in one half of the (2D,) vector
        E, n = spec.n_prefix, tr.last.shape[1] - spec.n_prefix
        v = torch.cat([v * (tok == 0).to(v.dtype)[:, None], v * (tok >= E).to(v.dtype)[:, None] / n], -1)
        b = torch.cat([b, b], -1)
    else:
        v = v * pw[:, None]
    Do = v.shape[-1]
    v = spec.fc_norm.linear(v, tr.sig_fc[:, None].expand(B, S))
    b = spec.fc_norm.linear(b, tr.sig_fc) + spec.fc_norm.shift(Do, c)
    chain, gates, weight = spec.head, tr.head_gates, 1.0
    if spec.dist_head is not None:
        _, chain, weight = spec.readouts()[readout]
        gates = tr.head_gates if readout == 0 else tr.dist_gates
    gi = 0
    for kind, a_, b_ in chain:
        if kind == "lin":
            v, b = F.linear(v, a_), F.linear(b, a_, b_)
        else:
            v, b = v * gates[gi][:, None], b * gates[gi]
            gi += 1
    return v * weight, b * weight


def _shares(Fc: Tensor, b: Tensor, d: Tensor) -> Tensor:
    """⟨F(c_s), d⟩ + s's norm-proportional share (by ‖F(c_s)‖) of ⟨b̃, d⟩: (B, S)."""
    sh = _share(Fc.norm(dim=-1))
    return (Fc @ d[:, :, None])[..., 0] + sh * (b * d).sum(-1, keepdim=True)


def class_relevance(spec: Spec, tr: Trace, d: Tensor, last: tuple[BlockShare, BlockRec] | None
                    ) -> tuple[Tensor, int]:
    """Per-token share of ⟨output, d⟩ (d (B,K): a one-hot class or a direction) at the class-initialisation
    node: (R (B,T), node index).

    Pooled heads ("avg", "map"): node L (final stream), sources x^L_t. Token readouts (class token; distilled
    DeiT: class and distillation tokens, ½ each): node L−1 (input of the last block); per readout token r the
    sources are the last block's attention sources s (c_{s→r}), r's skip and its MLP term, which is sent on
    through r's own sharing ratios (weak point 1). The head bias and final LayerNorm shift are shared
    norm-proportionally by ‖F(c)‖ (output space), so Σ R = ⟨output, d⟩ exactly.
    """
    L = len(spec.blocks)
    if spec.pool != "token":
        z = tr.last
        T = z.shape[1]
        tok = torch.arange(T, device=z.device)
        pw = None if spec.pool in ("map", "cls_avg") else pool_weights(spec, T, z)
        Fc, b = head_affine(spec, tr, z, tok, pw)
        return _shares(Fc, b, d), L
    bs, rec = last
    B, T, D = rec.x.shape
    R = rec.x.new_zeros(B, T)
    for i, (r, _, _) in enumerate(spec.readouts()):
        a0 = (rec.attn[:, :, r].transpose(1, 2)[..., None] * rec.v0).reshape(B, T, -1)  # (B,S,A)
        c_att = F.linear(a0, spec.blocks[-1].wo) + bs.share[:, r, :, None] * rec.b_attn  # c_{s→r}
        src = torch.cat([c_att, rec.x[:, r:r + 1], rec.m[:, r:r + 1]], 1)  # (B, T+2, D)
        Fc, b = head_affine(spec, tr, src, r, src.new_ones(T + 2), readout=i)
        rr = _shares(Fc, b, d)
        R = R + rr[:, :T] + rr[:, T + 1, None] * bs.M[:, r]  # the MLP term follows y_r's sharing ratios
        R[:, r] += rr[:, T]
    return R, L - 1


def readout_values(spec: Spec, tr: Trace, d: Tensor) -> Tensor:
    """(B, T) ⟨output, d⟩ held by each final-stream token of a token readout (zero elsewhere)."""
    z = tr.last
    R = z.new_zeros(z.shape[:2])
    for i, (r, _, _) in enumerate(spec.readouts()):
        Fc, b = head_affine(spec, tr, z[:, r:r + 1], r, z.new_ones(1), readout=i)
        R[:, r] = ((Fc[:, 0] + b) * d).sum(-1)
    return R
