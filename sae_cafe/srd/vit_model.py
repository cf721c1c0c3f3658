"""Pre-LN ViT as plain tensors: the functional forward of a :class:`~sae_cafe.srd.vit_types.Spec`.

Written by hand because no library exposes a ViT forward with its attention probabilities, LayerNorm
statistics and GELU gates frozen (torchvision and timm use fused attention kernels). The forward reads the
model's parameters and never calls a module with hooks, registers anything or writes to the model.
``run(spec, x, frozen=...)`` replays the attention probabilities, LayerNorm σ and activation gates recorded
for another input (APOP, method_spec §2.6); the LayerNorm mean-centring stays a (linear) projection.
The Spec types and builders are re-exported here (``make_spec``, ``Spec``, ``Block``, ``LN``, ``AttnPool``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MismatchError, UnsupportedModuleError
from .vit_spec import make_spec, spec_timm, spec_torchvision
from .vit_types import LN, AttnPool, Block, Spec

__all__ = ["LN", "AttnPool", "Block", "BlockRec", "Frozen", "PoolState", "Spec", "Trace", "apply_head",
           "attn_pool_forward", "check_input", "embed", "make_spec", "pool", "pool_weights", "run",
           "spec_timm", "spec_torchvision"]


@dataclass
class PoolState:
    """Nonlinear state of an attention-pool head: probabilities (B,H,Lq,S), σ of its LayerNorm (B,Lq), MLP
    gates act(z)/z (B,Lq,F) (None without an MLP)."""

    attn: Tensor
    sig: Tensor | None = None
    gate: Tensor | None = None


@dataclass
class Frozen:
    """Recorded nonlinear state of one forward (APOP): σ of every LayerNorm, attention, gates."""

    sig1: list[Tensor] = field(default_factory=list)  # (B, T)
    attn: list[Tensor] = field(default_factory=list)  # (B, H, T, T)
    sig2: list[Tensor] = field(default_factory=list)
    gate: list[Tensor] = field(default_factory=list)  # (B, T, F) act(z)/z
    sig_f: Tensor | None = None  # (B, T)
    sig_fc: Tensor | None = None  # (B,)
    head_gates: list[Tensor] = field(default_factory=list)
    sig_pre: Tensor | None = None  # (B, T) σ of norm_pre
    pool: PoolState | None = None
    dist_gates: list[Tensor] = field(default_factory=list)


@dataclass
class BlockRec:
    """One block of a forward: input x, attention A (B,H,T,S), bias-free values v0 (B,S,H,dh), attention add
    output y, MLP term m, block output out (all (B,T,D)), attention bias b_attn (D,)."""

    x: Tensor
    attn: Tensor
    v0: Tensor
    y: Tensor
    m: Tensor
    out: Tensor
    b_attn: Tensor


@dataclass
class Trace:
    tokens0: Tensor  # (B, T, D) residual stream at the input of block 0
    last: Tensor  # (B, T, D) residual stream after the last block run
    logits: Tensor | None = None
    sig_f: Tensor | None = None  # (B, T) σ of the final norm per token
    sig_fc: Tensor | None = None  # (B,)
    head_gates: list[Tensor] = field(default_factory=list)
    frozen: Frozen | None = None
    sig_pre: Tensor | None = None  # (B, T) σ of norm_pre per token (ones without one)
    pool: PoolState | None = None  # attention-pool head state
    dist_gates: list[Tensor] = field(default_factory=list)


def _gate(z: Tensor, act_out: Tensor, act: nn.Module) -> Tensor:
    """act(z)/z, with the limit act'(0) where z == 0 (a central difference)."""
    e = torch.tensor([-1e-4, 1e-4], dtype=z.dtype, device=z.device)
    slope0 = (act.forward(e).diff() / 2e-4)[0]
    safe = torch.where(z == 0, torch.ones_like(z), z)
    return torch.where(z == 0, slope0, act_out / safe)


def check_input(spec: Spec, x: Tensor) -> None:
    """Images must fill the model's patch grid exactly."""
    P = spec.patch
    if x.ndim != 4 or x.shape[2] != spec.grid[0] * P or x.shape[3] != spec.grid[1] * P:
        raise MismatchError(f"{spec.name}: expected images (N,{spec.patch_w.shape[1]},{spec.grid[0] * P},"
                            f"{spec.grid[1] * P}), got {tuple(x.shape)}; resize or use adapter.preprocess")


def embed(spec: Spec, x: Tensor) -> Tensor:
    """Pixels (B,C,H,W) → tokens (B, E + h·w, D) before ``norm_pre``."""
    check_input(spec, x)
    P = spec.patch
    e = F.conv2d(x, spec.patch_w, spec.patch_b, stride=P).flatten(2).transpose(1, 2) + spec.pos_patch
    return torch.cat([spec.prefix.expand(x.shape[0], -1, -1), e], 1)


def run(spec: Spec, x: Tensor, *, upto: int | None = None, frozen: Frozen | None = None, record: bool = False,
        on_block: Callable[[int, BlockRec], None] | None = None) -> Trace:
    """Forward through blocks 0..``upto`` (all and the head when None), optionally replaying ``frozen``.

    ``record`` keeps the nonlinear state (:class:`Frozen`) for a later APOP run; ``on_block(l, rec)`` sees
    every block's :class:`BlockRec`.
    """
    rec = Frozen() if record else None
    z = embed(spec, x)
    s_pre = frozen.sig_pre if frozen else spec.norm_pre.sigma(z)
    if not spec.norm_pre.identity:
        z = spec.norm_pre.forward(z, s_pre if frozen else None)
    tokens0 = z
    B, T, D = z.shape
    for li, blk in enumerate(spec.blocks):
        if upto is not None and li > upto:
            break
        H = blk.heads
        sh1 = blk.ln1.shift(D, z)
        vb = F.linear(sh1, blk.wv, blk.bv)  # (A,) value bias incl. the LN shift; Σ_s A_ts = 1 passes it on
        if frozen:  # APOP: replay σ and attention; the LayerNorm centring is recomputed (a projection)
            s1 = frozen.sig1[li]
            A = frozen.attn[li]
            v0 = F.linear(blk.ln1.linear(z, s1), blk.wv).view(B, T, H, -1)
            v = v0 + vb.view(H, -1)
        else:
            s1 = blk.ln1.sigma(z) if record else None
            qkv = F.linear(blk.ln_fwd(blk.ln1, z), blk.wqkv, blk.bqkv).view(B, T, 3, H, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (B,H,T,e) each: fast batched matmuls
            if blk.q_norm is not None:
                q, k = blk.q_norm(q), blk.k_norm(k)
            A = ((q * blk.scale) @ k.transpose(-2, -1)).softmax(-1)
            v = v.transpose(1, 2)  # (B,T,H,e) view of the contiguous (B,H,T,e) values
            v0 = v - vb.view(H, -1)  # bias-free values W_V^h L₁(x_s)
        o = (A @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)
        y = z + F.linear(o, blk.wo, blk.bo)
        if frozen:
            s2 = frozen.sig2[li]
            hpre = F.linear(blk.ln2.linear(y, s2) + blk.ln2.shift(D, y), blk.fc1.weight, blk.fc1.bias)
            a = hpre * frozen.gate[li]
        else:
            s2 = blk.ln2.sigma(y) if record else None
            hpre = F.linear(blk.ln_fwd(blk.ln2, y), blk.fc1.weight, blk.fc1.bias)
            a = blk.act.forward(hpre)
        m = F.linear(a, blk.fc2.weight, blk.fc2.bias)
        if blk.ls2 is not None:
            m = m * blk.ls2
        out = y + m
        if rec is not None:
            rec.sig1.append(s1)
            rec.attn.append(A)
            rec.sig2.append(s2)
            rec.gate.append(_gate(hpre, a, blk.act))
        if on_block is not None:
            on_block(li, BlockRec(z, A, v0, y, m, out, F.linear(vb, blk.wo, blk.bo)))
        z = out
    tr = Trace(tokens0, z, frozen=rec, sig_pre=s_pre)
    if rec is not None:
        rec.sig_pre = s_pre
    if upto is not None and upto < len(spec.blocks) - 1:
        return tr
    sf = frozen.sig_f if frozen else spec.norm.sigma(z)
    hf = spec.norm.linear(z, sf) + spec.norm.shift(D, z)
    ps = None
    if spec.attn_pool is not None:
        pooled, ps = attn_pool_forward(spec, hf, frozen.pool if frozen else None)
    else:
        pooled = pool(spec, hf)
    sfc = frozen.sig_fc if frozen else spec.fc_norm.sigma(pooled)
    v = spec.fc_norm.linear(pooled, sfc) + spec.fc_norm.shift(pooled.shape[-1], pooled)
    v, gates = apply_head(spec.head, v, frozen.head_gates if frozen else None)
    dg: list[Tensor] = []
    if spec.dist_head is not None:  # distilled DeiT: (head(x_cls) + head_dist(x_dist)) / 2
        vd, dg = apply_head(spec.dist_head, hf[:, 1], frozen.dist_gates if frozen else None)
        v = (v + vd) / 2
    tr.logits, tr.sig_f, tr.sig_fc, tr.head_gates, tr.pool, tr.dist_gates = v, sf, sfc, gates, ps, dg
    if rec is not None:
        rec.sig_f, rec.sig_fc, rec.head_gates, rec.pool, rec.dist_gates = sf, sfc, gates, ps, dg
    return tr


def apply_head(chain: list, v: Tensor, gates: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """A head chain on v (B, D); ``gates`` replays frozen activation gates. Returns (output, gates)."""
    out: list[Tensor] = []
    for kind, a_, b_ in chain:
        if kind == "lin":
            v = F.linear(v, a_, b_)
        else:
            g = gates[len(out)] if gates is not None else _gate(v, a_.forward(v), a_)
            v = v * g if gates is not None else a_.forward(v)
            out.append(g)
    return v, out


def attn_pool_forward(spec: Spec, hf: Tensor, frozen: PoolState | None = None) -> tuple[Tensor, PoolState]:
    """Attention-pool head on the normed final tokens hf (B,T,D) → pooled (B, Do) and its state."""
    ap = spec.attn_pool
    src = hf if ap.include_prefix else hf[:, spec.n_prefix:]
    B, S, _ = src.shape
    H = ap.heads
    kv = F.linear(src, ap.wkv, ap.bkv).view(B, S, 2, H, -1)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B,H,S,e)
    if frozen is not None:
        A = frozen.attn
    else:
        if ap.k_norm is not None:
            k = ap.k_norm(k)
        A = ((ap.q * ap.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B,H,Lq,S)
    Lq = A.shape[2]
    p = F.linear((A @ v).transpose(1, 2).reshape(B, Lq, -1), ap.wo, ap.bo)  # (B,Lq,Do)
    sig = gate = None
    if ap.fc1 is not None:
        sig = frozen.sig if frozen is not None else ap.norm.sigma(p)
        hpre = F.linear(ap.norm.linear(p, sig) + ap.norm.shift(p.shape[-1], p), ap.fc1.weight, ap.fc1.bias)
        a = hpre * frozen.gate if frozen is not None else ap.act.forward(hpre)
        gate = frozen.gate if frozen is not None else _gate(hpre, a, ap.act)
        p = p + F.linear(a, ap.fc2.weight, ap.fc2.bias)
    out = p[:, 0] if ap.pool == "token" else p.mean(1)
    return out, PoolState(A, sig, gate)


def pool_weights(spec: Spec, T: int, like: Tensor) -> Tensor:
    """(T,) weight of each token in the pooled vector."""
    if spec.pool in ("map", "cls_avg"):
        raise UnsupportedModuleError(f"{spec.name}: the {spec.pool!r} readout has no single token weights")
    w = like.new_zeros(T)
    E = spec.n_prefix
    if spec.pool == "token":
        w[0] = 1.0
        if spec.dist_head is not None:
            w[0] = w[1] = 0.5
    elif spec.pool_prefix:
        w[:] = 1.0 / T
    else:
        w[E:] = 1.0 / (T - E)
    return w


def pool(spec: Spec, h: Tensor) -> Tensor:
    if spec.pool == "token":
        return h[:, 0]
    if spec.pool == "cls_avg":  # [class token, mean of the patch tokens] (B, 2D): HF Dinov2ForImageClassification
        return torch.cat([h[:, 0], h[:, spec.n_prefix:].mean(1)], -1)
    return (h if spec.pool_prefix else h[:, spec.n_prefix:]).mean(1)
