"""SRD rule for a depthwise convolution followed by a fixed dense matrix: ``z = post · dwconv(v) + b``.

ConvNeXt's block opens with a 7×7 depthwise conv, a LayerNorm (σ frozen: a per-target scale, see
:func:`sae_cafe.srd.engine._frozen_mu`; centring: a fixed projection) and a Linear C → 4C. Folded into one
dense 7×7 conv C → 4C it would hold 4C·C·49 weights (460 MB for a stage-4 block of ConvNeXt-T in float32),
so the paths are kept as the depthwise conv's kernel offsets k, with contribution vectors

    c_k(q) = post · (w_k ⊙ v_{p(q,k)}) + frac_k(q) · b_q,

and the two quantities μ needs are computed without forming them:

    ⟨post (w_k ⊙ v_p), z_q⟩ = Σ_c w_k[c] v_p[c] (postᵀ z_q)[c]          one GEMM for postᵀz, then elementwise
    ‖post (w_k ⊙ v_p)‖²     = (w_k ⊙ v_p)ᵀ (postᵀ post) (w_k ⊙ v_p)      one GEMM with the Gram per offset chunk

The Gram postᵀpost (C×C) is computed once per graph. μ and the bias sharing are exactly those of
:func:`sae_cafe.srd.rules.branch_mu` (norm-proportional bias, an equal split over in-bounds paths when
every contribution is zero, μ = 0 for a zero target), so :func:`~sae_cafe.srd.rules.make_scatter` routes
relevance by the depthwise conv's geometry unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModuleError
from .graph import Branch

_CHUNK_BYTES = 1 << 21  # bytes of source vectors (u) per chunk of kernel offsets

def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """√x with a finite gradient at 0 (the value stays exactly 0 there)."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _offset_slices(t: torch.Tensor, k: int, conv, hw: tuple[int, int]) -> torch.Tensor:
    """Channel-last padded map (N, Hp, Wp, C) read at the source of kernel offset k for every target."""
    (_, kw), (sh, sw), (dh, dw) = conv.kernel, conv.stride, conv.dilation
    a, b = divmod(k, kw)
    h, w = hw
    return t[:, a * dh:a * dh + sh * (h - 1) + 1:sh, b * dw:b * dw + sw * (w - 1) + 1:sw]


def post_branch_mu(branch: Branch, v: torch.Tensor, z: torch.Tensor, bias_map: torch.Tensor | None = None,
                   max_bytes: int = 1 << 28) -> torch.Tensor:
    """Sharing ratios (N, K, h', w') of a ``post · depthwise-conv`` branch's kernel offsets into node ``z``.

    ``v`` (N, C, H, W) is the depthwise conv's input, ``z`` (N, C_out, h', w') the node, ``bias_map``
    (N, C_out, h', w') a per-target bias replacing ``branch.bias``. Memory is bounded by ``max_bytes`` per
    chunk of kernel offsets.
    """
    conv = branch.conv
    C = v.shape[1]
    if branch.pool is not None or conv.groups != C or tuple(conv.weight.shape[:2]) != (C, 1):
        raise UnsupportedModuleError(f"{conv.name}: a post matrix is only supported after a depthwise conv "
                                     "(groups = channels, one filter per channel) without a max-pool")
    N, _, h, w = z.shape
    K = conv.n_offsets
    zz = (z * z).sum(1)
    inv = torch.where(zz > 0, 1.0 / torch.where(zz > 0, zz, torch.ones_like(zz)), torch.zeros_like(zz))
    need_norm = branch.bias is not None or bias_map is not None
    g = z.permute(0, 2, 3, 1) @ conv.post  # postᵀ z_q, channel-last (N, h', w', C)
    gram = conv.post_gram() if need_norm else None
    (ph, pw) = conv.padding
    vp = F.pad(v, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (N, Hp, Wp, C)
    wk = conv.weight.reshape(C, K).T  # (K, C)
    # small chunks of offsets keep u and gram·u in cache (memory-bound elementwise work; measured 1.5-3×
    # faster than one large chunk on early ConvNeXt stages), large enough for an efficient GEMM
    per_offset = N * h * w * C * v.element_size()
    chunk = max(1, min(max_bytes, _CHUNK_BYTES) // max(per_offset, 1))
    dots, norms = [], []
    for k0 in range(0, K, chunk):
        ks = range(k0, min(K, k0 + chunk))
        u = torch.stack([_offset_slices(vp, k, conv, (h, w)) for k in ks]) * wk[k0:k0 + len(ks)].view(-1, 1, 1, 1, C)
        dots.append(torch.linalg.vecdot(u, g, dim=-1))  # (k, N, h', w')
        if need_norm:
            norms.append(_safe_sqrt(torch.linalg.vecdot(u @ gram, u, dim=-1).clamp_min(0)))
    dot = torch.cat(dots).transpose(0, 1)  # (N, K, h', w')
    if not need_norm:
        return dot * inv.unsqueeze(1)
    bz = ((bias_map if bias_map is not None else branch.bias.view(1, -1, 1, 1)) * z).sum(1)
    norm = torch.cat(norms).transpose(0, 1)
    total = norm.sum(1, keepdim=True)
    frac = norm / torch.where(total > 0, total, torch.ones_like(total))
    if not (total > 0).all():  # every contribution is zero: share the bias equally over in-bounds paths
        ones = F.pad(torch.ones_like(v[:1, :1]), (pw, pw, ph, ph)).permute(0, 2, 3, 1)
        valid = torch.stack([_offset_slices(ones, k, conv, (h, w))[..., 0] for k in range(K)], 1)  # (1, K, h', w')
        frac = torch.where(total > 0, frac, valid / valid.sum(1, keepdim=True).clamp_min(1))
    return (dot + frac * bz.unsqueeze(1)) * inv.unsqueeze(1)
