"""SRD rule for a depthwise convolution followed by a fixed dense matrix: ``z = post · dwconv(v) + b``.

ConvNeXt's block opens with a 7×7 depthwise conv, a LayerNorm (σ frozen: a per-target scale, see
:func:`sae_cafe.srd.engine._frozen_mu`; centring: a fixed projection) and a Linear C → 4C. Folded into one
dense 7×7 conv C → 4C it would hold 4C·C·49 weights (460 MB for a stage-4 block of ConvNeXt-T in float32),
so the paths are kept as the depthwise conv's kernel offsets k, with contribution vectors

    c_k(q) = post · (w_k ⊙ v_{p(q,k)}) + frac_k(q) · b_q,

and μ needs, per path, ⟨post (w_k ⊙ v_p), z_q⟩ and ‖post (w_k ⊙ v_p)‖ (the bias share). Written by hand (no
library decomposes into per-path contribution vectors). Two exact ways to get them:

* **Triangular, source side** (stride 1, no autograd: every ConvNeXt call). With ``post = Q R`` (thin QR,
  Q (C', C) orthonormal columns, R (C, C) upper triangular, computed once per graph in float64),
  ‖post u‖ = ‖R u‖ and ⟨post u, z⟩ = ⟨R u, Qᵀz⟩. For every source position p and offset k,
  y_k(p) = R·diag(w_k)·v_p is one GEMM of the channel-last source map against the stacked R·diag(w_k) of all
  49 offsets (C → 49·C), done in blocks of R's rows [i0, i1) that only read channels ≥ i0 (R is triangular:
  ≈ (m+1)/(2m) of the dense multiply-adds for m blocks). ‖y_k(p)‖² and ⟨y_k(p), ζ(q)⟩ with ζ = Qᵀz read
  through a sliding-window view of ζ are accumulated over the blocks, then moved from source p to target
  q = p − k by a strided view. No per-offset copy of the source map and no C×C Gram form per path.
* **Sliced** (any stride; under autograd, ``differentiable=True``): the source vector u = w_k ⊙ v_p of each
  offset is materialised per chunk of offsets; dot = uᵀ(postᵀz_q), norm² = uᵀ(postᵀpost)u.

Both give the same numbers up to float rounding (tests compare them in float64 to 1e-12). μ and the bias
sharing are exactly those of :func:`sae_cafe.srd.rules.branch_mu` (norm-proportional bias, an equal split over
in-bounds paths when every contribution is zero, μ = 0 for a zero target), so
:func:`~sae_cafe.srd.rules.make_scatter` routes relevance by the depthwise conv's geometry unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import UnsupportedModuleError
from .graph import Branch, ConvSpec

_CHUNK_BYTES = 1 << 21  # bytes of source vectors (u) per chunk of kernel offsets (sliced form)
_BLOCK = 32  # rows of R per GEMM block (triangular form); 24-48 measured equal, 96+ slower on ConvNeXt-T
_BAND_BYTES = 1 << 22  # bytes of y = R·diag(w_k)·v per band of source rows and block (cache-sized)
# per post matrix: (depthwise weight it was built with, Q (C', C), [(i0, i1, R·diag(w_k) stacked (C−i0, K·b))])
_FACTORS: WeakIdKeyDictionary = WeakIdKeyDictionary()


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


def _factors(conv: ConvSpec) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """Q and the blocks of R·diag(w_k) for all offsets (cached per graph). Offsets are stacked in *reversed*
    order k' = (kh−1−a, kw−1−b), so that the sliding-window view of ζ has positive strides."""
    hit = _FACTORS.get(conv.post)
    if hit is not None and hit[0] is conv.weight:
        return hit[1], hit[2]
    q, r = torch.linalg.qr(conv.post.to(torch.float64), mode="reduced")  # post = Q R
    C = r.shape[0]
    w = conv.weight.to(torch.float64).reshape(C, conv.n_offsets).flip(1)  # (C, K), reversed offsets
    mats = []
    for i0 in range(0, C, _BLOCK):
        i1 = min(C, i0 + _BLOCK)
        m = r[i0:i1, i0:].T.unsqueeze(1) * w[i0:].unsqueeze(2)  # (C − i0, K, b): [c, k', j] = R[j, c]·w_k'[c]
        mats.append((i0, i1, m.reshape(C - i0, -1).to(conv.post.dtype)))
    q = q.to(conv.post.dtype)
    _FACTORS[conv.post] = (conv.weight, q, mats)
    return q, mats


def _triangular_paths(conv: ConvSpec, v: torch.Tensor, z: torch.Tensor, need_norm: bool,
                      band_bytes: int = _BAND_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stride-1 dots and norms per path, (N, K, h, w) each (norm None without a bias), by the triangular
    source-side form (module docstring). ``v`` (N, C, H, W), ``z`` (N, C', h, w)."""
    q, mats = _factors(conv)
    N, C, H, W = v.shape
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel, conv.padding, conv.dilation
    h, w = z.shape[-2:]
    zeta = z.permute(0, 2, 3, 1) @ q  # (N, h, w, C) = Qᵀz per target
    # ζ on a frame such that target q = p + (ph − a·dh, pw − b·dw) of source p reads zp[p + k'·d], k' reversed
    th, tw = (kh - 1) * dh - ph, (kw - 1) * dw - pw
    hz, wz = H + (kh - 1) * dh, W + (kw - 1) * dw
    # row-major layout (rows, N, W, C): a band of rows is one contiguous matrix for every batch size
    zp = zeta.new_zeros(hz, N, wz, C)
    r0, r1, c0, c1 = max(0, th), min(hz, th + h), max(0, tw), min(wz, tw + w)
    zp[r0:r1, :, c0:c1] = zeta[:, r0 - th:r1 - th, c0 - tw:c1 - tw].transpose(0, 1)
    sr, sn, sc, _ = zp.stride()
    windows = zp.as_strided((H, N, W, kh, kw, C), (sr, sn, sc, dh * sr, dw * sc, 1))  # no copy
    vc = v.permute(2, 0, 3, 1).contiguous()  # (H, N, W, C)
    K = kh * kw
    # cache-sized bands of source rows, but at least ~512 GEMM rows (batch 4 at 56×56: 1-row bands measured slow)
    band = min(H, max(band_bytes // max(1, N * W * K * _BLOCK * v.element_size()), -(-512 // (N * W))))
    dots, sqs = [], []
    for t0 in range(0, H, band):
        t1 = min(H, t0 + band)
        ub, dot, sq = vc[t0:t1], 0, 0
        for i0, i1, mat in mats:
            y = (ub[..., i0:] @ mat).view(t1 - t0, N, W, kh, kw, i1 - i0)  # rows i0:i1 of R·diag(w_k)·v_p
            dot = dot + torch.linalg.vecdot(y, windows[t0:t1, ..., i0:i1])
            if need_norm:  # one fused reduction pass (measured faster than vecdot(y, y))
                sq = sq + torch.linalg.vector_norm(y, dim=-1).square()
        dots.append(dot)
        sqs.append(sq)

    def to_targets(s: torch.Tensor) -> torch.Tensor:
        """(N, H, W, kh, kw) per source and reversed offset → (N, K, h, w) per target and offset."""
        sp = s.new_zeros(N, H + 2 * ph, W + 2 * pw, kh, kw)
        sp[:, ph:ph + H, pw:pw + W] = s.flip(3, 4)
        a, b, c, d, e = sp.stride()
        t = sp.as_strided((N, h, w, kh, kw), (a, b, c, dh * b + d, dw * c + e))  # sp[n, q + k·d, k]
        return t.reshape(N, h, w, K).permute(0, 3, 1, 2).contiguous()

    dot = to_targets(torch.cat(dots).transpose(0, 1))
    return dot, (_safe_sqrt(to_targets(torch.cat(sqs).transpose(0, 1))) if need_norm else None)


def _sliced_paths(conv: ConvSpec, v: torch.Tensor, z: torch.Tensor, need_norm: bool, max_bytes: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dots and norms per path (N, K, h', w') from materialised per-offset source vectors (any geometry,
    differentiable)."""
    C, K = v.shape[1], conv.n_offsets
    N, _, h, w = z.shape
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
    return dot, (torch.cat(norms).transpose(0, 1) if need_norm else None)


def post_branch_mu(branch: Branch, v: torch.Tensor, z: torch.Tensor, bias_map: torch.Tensor | None = None,
                   max_bytes: int = 1 << 28, form: str | None = None) -> torch.Tensor:
    """Sharing ratios (N, K, h', w') of a ``post · depthwise-conv`` branch's kernel offsets into node ``z``.

    ``v`` (N, C, H, W) is the depthwise conv's input, ``z`` (N, C_out, h', w') the node, ``bias_map``
    (N, C_out, h', w') a per-target bias replacing ``branch.bias``. ``form``: ``"triangular"`` or
    ``"sliced"`` (module docstring); ``None`` picks the triangular form for stride 1 outside autograd.
    Memory is bounded by ``max_bytes`` per chunk of kernel offsets (sliced form).
    """
    conv = branch.conv
    C = v.shape[1]
    if branch.pool is not None or conv.groups != C or tuple(conv.weight.shape[:2]) != (C, 1):
        raise UnsupportedModuleError(f"{conv.name}: a post matrix is only supported after a depthwise conv "
                                     "(groups = channels, one filter per channel) without a max-pool")
    if form is None:
        grad = torch.is_grad_enabled() and (v.requires_grad or z.requires_grad)
        form = "triangular" if conv.stride == (1, 1) and not grad else "sliced"
    if form == "triangular" and conv.stride != (1, 1):
        raise UnsupportedModuleError(f"{conv.name}: the triangular form needs stride 1, got {conv.stride}")
    zz = (z * z).sum(1)
    inv = torch.where(zz > 0, 1.0 / torch.where(zz > 0, zz, torch.ones_like(zz)), torch.zeros_like(zz))
    need_norm = branch.bias is not None or bias_map is not None
    dot, norm = (_triangular_paths(conv, v, z, need_norm) if form == "triangular" else
                 _sliced_paths(conv, v, z, need_norm, max_bytes))
    if not need_norm:
        return dot * inv.unsqueeze(1)
    bz = ((bias_map if bias_map is not None else branch.bias.view(1, -1, 1, 1)) * z).sum(1)
    total = norm.sum(1, keepdim=True)
    frac = norm / torch.where(total > 0, total, torch.ones_like(total))
    if not (total > 0).all():  # every contribution is zero: share the bias equally over in-bounds paths
        (ph, pw), (h, w) = conv.padding, z.shape[-2:]
        ones = F.pad(torch.ones_like(v[:1, :1]), (pw, pw, ph, ph)).permute(0, 2, 3, 1)
        valid = torch.stack([_offset_slices(ones, k, conv, (h, w))[..., 0] for k in range(conv.n_offsets)], 1)
        frac = torch.where(total > 0, frac, valid / valid.sum(1, keepdim=True).clamp_min(1))
    return (dot + frac * bz.unsqueeze(1)) * inv.unsqueeze(1)
