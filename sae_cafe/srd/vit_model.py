"""Pre-LN ViT as plain tensors: weights of torchvision / timm ViTs and a functional forward.

Written by hand because no library exposes a ViT forward with its attention probabilities, LayerNorm
statistics and GELU gates frozen (torchvision and timm use fused attention kernels). The forward reads the
model's parameters and never calls a module with hooks, registers anything or writes to the model.
``run(spec, x, frozen=...)`` replays the attention probabilities, LayerNorm σ and activation gates recorded
for another input (APOP, method_spec §2.6); the LayerNorm mean-centring stays a (linear) projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MismatchError, UnsupportedModuleError


@dataclass
class LN:
    """A LayerNorm (or Identity when ``identity``): y = γ ⊙ (x − mean x)/σ + β, σ = √(var + eps)."""

    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 0.0
    identity: bool = True

    def sigma(self, x: Tensor) -> Tensor:
        """σ per vector, (...) from (..., D); ones for Identity."""
        if self.identity:
            return x.new_ones(x.shape[:-1])
        var = x.var(-1, correction=0)
        return (var + self.eps).sqrt()

    def linear(self, v: Tensor, sigma: Tensor) -> Tensor:
        """Bias-free part with frozen σ (broadcast to v[..., 0]): γ ⊙ (v − mean v)/σ."""
        if self.identity:
            return v
        out = (v - v.mean(-1, keepdim=True)) / sigma[..., None]
        return out * self.weight if self.weight is not None else out

    def shift(self, d: int, like: Tensor) -> Tensor:
        return self.bias if (self.bias is not None and not self.identity) else like.new_zeros(d)


@dataclass
class Block:
    name: str
    ln1: LN
    ln2: LN
    wqkv: Tensor  # (3A, D) fused q, k, v projections
    bqkv: Tensor  # (3A,)
    heads: int
    scale: float
    q_norm: Callable | None
    k_norm: Callable | None
    wo: Tensor  # (D, A), layer scale folded in
    bo: Tensor  # (D,), layer scale folded in
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    ls2: Tensor | None  # (D,) layer scale of the MLP branch

    @property
    def wv(self) -> Tensor:
        return self.wqkv[2 * self.wqkv.shape[0] // 3:]

    @property
    def bv(self) -> Tensor:
        return self.bqkv[2 * self.bqkv.shape[0] // 3:]

    def ln_fwd(self, ln: LN, z: Tensor) -> Tensor:
        return z if ln.identity else F.layer_norm(z, z.shape[-1:], ln.weight, ln.bias, ln.eps)


@dataclass
class Spec:
    name: str
    patch_w: Tensor  # (D, C, P, P)
    patch_b: Tensor  # (D,)
    pos_patch: Tensor  # (h·w, D)
    prefix: Tensor  # (E, D) class/register tokens at the input incl. their position embedding
    grid: tuple[int, int]
    patch: int
    blocks: list[Block]
    norm: LN
    pool: str  # "token" or "avg"
    pool_prefix: bool  # avg pooling includes the prefix tokens
    fc_norm: LN
    head: list[tuple[str, object, object]]  # ("lin", W, b) or ("act", module, None)
    has_cls: bool = True

    @property
    def n_prefix(self) -> int:
        return self.prefix.shape[0]


def _ln(m: nn.Module, where: str) -> LN:
    if isinstance(m, nn.Identity):
        return LN()
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return LN(m.weight, m.bias, float(m.eps), False)
    raise UnsupportedModuleError(f"SRD for ViTs: {where} is a {type(m).__name__}; only nn.LayerNorm (or "
                                 "Identity) is supported there")


def _zeros_if_none(b: Tensor | None, n: int, like: Tensor) -> Tensor:
    return b if b is not None else like.new_zeros(n)


def _mlp(m: nn.Module, where: str) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """fc1, activation, fc2 of a torchvision MLPBlock or a timm Mlp (dropouts are identities at eval)."""
    if isinstance(m, nn.Sequential):
        kids = [k for k in m if not isinstance(k, nn.Dropout | nn.Identity)]
        if len(kids) == 3 and isinstance(kids[0], nn.Linear) and isinstance(kids[2], nn.Linear):
            return kids[0], kids[1], kids[2]
    elif type(m).__name__ == "Mlp" and isinstance(getattr(m, "norm", None), nn.Identity) \
            and all(isinstance(getattr(m, a, None), nn.Linear) for a in ("fc1", "fc2")):
        return m.fc1, m.act, m.fc2
    raise UnsupportedModuleError(f"SRD for ViTs: MLP {where} ({type(m).__name__}) is not supported; expected "
                                 "Linear → activation → Linear (torchvision MLPBlock, timm Mlp)")


def _head_chain(mods: list[tuple[str, nn.Module]]) -> list[tuple[str, object, object]]:
    chain: list[tuple[str, object, object]] = []
    for name, m in mods:
        if isinstance(m, nn.Dropout | nn.Identity):
            continue
        if isinstance(m, nn.Linear):
            chain.append(("lin", m.weight, _zeros_if_none(m.bias, m.out_features, m.weight)))
        elif isinstance(m, nn.Tanh | nn.GELU | nn.ReLU | nn.SiLU):
            chain.append(("act", m, None))
        else:
            raise UnsupportedModuleError(f"SRD for ViTs: head module {name} ({type(m).__name__}) is not "
                                         "supported")
    if not chain or chain[-1][0] != "lin":
        raise UnsupportedModuleError("SRD for ViTs needs a classifier head ending in nn.Linear "
                                     "(num_classes > 0)")
    return chain


def spec_torchvision(model: nn.Module) -> Spec:
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise UnsupportedModuleError("SRD for ViTs: torchvision conv stems (conv_stem_configs) are not "
                                     "supported")
    conv = model.conv_proj
    D = conv.out_channels
    pos = model.encoder.pos_embedding[0]
    blocks = []
    for name, blk in model.encoder.layers.named_children():
        mha = blk.self_attention
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim \
                or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModuleError(f"SRD for ViTs: attention encoder.layers.{name}.self_attention "
                                         "must be a plain nn.MultiheadAttention")
        W, b = mha.in_proj_weight, _zeros_if_none(mha.in_proj_bias, 3 * D, mha.in_proj_weight)
        fc1, act, fc2 = _mlp(blk.mlp, f"encoder.layers.{name}.mlp")
        where = f"encoder.layers.{name}"
        blocks.append(Block(where, _ln(blk.ln_1, f"{where}.ln_1"), _ln(blk.ln_2, f"{where}.ln_2"),
                            W, b, mha.num_heads,
                            (D // mha.num_heads) ** -0.5, None, None, mha.out_proj.weight,
                            _zeros_if_none(mha.out_proj.bias, D, W), fc1, act, fc2, None))
    n = model.image_size // model.patch_size
    return Spec(type(model).__name__, conv.weight, _zeros_if_none(conv.bias, D, conv.weight), pos[1:],
                model.class_token[0] + pos[:1], (n, n), model.patch_size, blocks,
                _ln(model.encoder.ln, "encoder.ln"), "token", False, LN(),
                _head_chain(list(model.heads.named_children())))


def spec_timm(model: nn.Module) -> Spec:
    from timm.models.vision_transformer import Block as TimmBlock

    pe = model.patch_embed
    if not isinstance(pe.proj, nn.Conv2d) or not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModuleError("SRD for ViTs: patch_embed must be a Conv2d without a norm")
    if not isinstance(model.norm_pre, nn.Identity):
        raise UnsupportedModuleError("SRD for ViTs: norm_pre (pre_norm=True) is not supported")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise UnsupportedModuleError(f"SRD for ViTs: global_pool={model.global_pool!r} is not supported "
                                     "(use 'token' or 'avg')")
    conv = pe.proj
    D = conv.out_channels
    E = model.num_prefix_tokens
    gh, gw = pe.grid_size
    pos = model.pos_embed[0] if model.pos_embed is not None else conv.weight.new_zeros(gh * gw + E, D)
    pre = [t[0] for t in (model.cls_token, model.reg_token) if t is not None]
    prefix = torch.cat(pre, 0) if pre else conv.weight.new_zeros(0, D)
    if model.no_embed_class or model.pos_embed is None:
        pos_patch = pos if model.pos_embed is not None else pos[E:]
    else:
        prefix, pos_patch = prefix + pos[:E], pos[E:]
    blocks = []
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        at = blk.attn
        if type(blk) is not TimmBlock or not hasattr(at, "qkv") or getattr(at, "gate", None) is not None \
                or not isinstance(getattr(at, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModuleError(f"SRD for ViTs: {where} ({type(blk).__name__}/{type(at).__name__}) "
                                         "is not a pre-LN timm Block with plain qkv attention")
        A = at.qkv.out_features // 3
        Wqkv, bqkv = at.qkv.weight, _zeros_if_none(at.qkv.bias, 3 * A, at.qkv.weight)
        g1 = _ls(blk.ls1, where)
        wo, bo = at.proj.weight, _zeros_if_none(at.proj.bias, D, at.proj.weight)
        if g1 is not None:
            wo, bo = wo * g1[:, None], bo * g1
        fc1, act, fc2 = _mlp(blk.mlp, f"{where}.mlp")
        qn = None if isinstance(at.q_norm, nn.Identity) else at.q_norm.forward
        kn = None if isinstance(at.k_norm, nn.Identity) else at.k_norm.forward
        blocks.append(Block(where, _ln(blk.norm1, f"{where}.norm1"), _ln(blk.norm2, f"{where}.norm2"),
                            Wqkv, bqkv, at.num_heads, float(at.scale), qn, kn, wo, bo, fc1, act, fc2,
                            _ls(blk.ls2, where)))
    head = model.head
    return Spec(type(model).__name__, conv.weight, _zeros_if_none(conv.bias, D, conv.weight), pos_patch,
                prefix, (gh, gw), pe.patch_size[0], blocks, _ln(model.norm, "norm"), model.global_pool,
                bool(getattr(model, "pool_include_prefix", False)), _ln(model.fc_norm, "fc_norm"),
                _head_chain([("head", head)]), has_cls=model.cls_token is not None)


def _ls(m: nn.Module, where: str) -> Tensor | None:
    if isinstance(m, nn.Identity):
        return None
    if hasattr(m, "gamma") and type(m).__name__ == "LayerScale":
        return m.gamma
    raise UnsupportedModuleError(f"SRD for ViTs: layer scale in {where} ({type(m).__name__}) is not "
                                 "supported")


def make_spec(m: nn.Module) -> Spec:
    """Weights of a torchvision or timm ViT as a :class:`Spec` (tensors shared with the model, not copied)."""
    import torchvision

    if isinstance(m, torchvision.models.VisionTransformer):
        return spec_torchvision(m)
    return spec_timm(m)


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
    """Pixels (B,C,H,W) → residual stream tokens (B, E + h·w, D)."""
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
            q, k, v = F.linear(blk.ln_fwd(blk.ln1, z), blk.wqkv, blk.bqkv).view(B, T, 3, H, -1).unbind(2)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if blk.q_norm is not None:
                q, k = blk.q_norm(q), blk.k_norm(k)
            A = ((q * blk.scale) @ k.transpose(-2, -1)).softmax(-1)
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
    tr = Trace(tokens0, z, frozen=rec)
    if upto is not None and upto < len(spec.blocks) - 1:
        return tr
    sf = frozen.sig_f if frozen else spec.norm.sigma(z)
    hf = spec.norm.linear(z, sf) + spec.norm.shift(D, z)
    pooled = pool(spec, hf)
    sfc = frozen.sig_fc if frozen else spec.fc_norm.sigma(pooled)
    v = spec.fc_norm.linear(pooled, sfc) + spec.fc_norm.shift(D, pooled)
    gates = []
    for kind, a_, b_ in spec.head:
        if kind == "lin":
            v = F.linear(v, a_, b_)
        else:
            g = frozen.head_gates[len(gates)] if frozen else _gate(v, a_.forward(v), a_)
            v = v * g if frozen else a_.forward(v)
            gates.append(g)
    tr.logits, tr.sig_f, tr.sig_fc, tr.head_gates = v, sf, sfc, gates
    if rec is not None:
        rec.sig_f, rec.sig_fc, rec.head_gates = sf, sfc, gates
    return tr


def pool_weights(spec: Spec, T: int, like: Tensor) -> Tensor:
    """(T,) weight of each token in the pooled vector."""
    w = like.new_zeros(T)
    E = spec.n_prefix
    if spec.pool == "token":
        w[0] = 1.0
    elif spec.pool_prefix:
        w[:] = 1.0 / T
    else:
        w[E:] = 1.0 / (T - E)
    return w


def pool(spec: Spec, h: Tensor) -> Tensor:
    if spec.pool == "token":
        return h[:, 0]
    return (h if spec.pool_prefix else h[:, spec.n_prefix:]).mean(1)
