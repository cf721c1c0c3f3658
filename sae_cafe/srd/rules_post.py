"""SRD rule for a depthwise convolution followed by a fixed dense matrix: ``z = post · dwconv(v) + b``.

ConvNeXt's block opens with a 7×7 depthwise conv, a LayerNorm (σ frozen: a per-target scale, see
:func:`sae_cafe.srd.engine._frozen_mu`; centring: a fixed projection) and a Linear C → 4C. Folded into one
dense 7×7 conv C → 4C it would hold 4C·C·49 weights (460 MB for a stage-4 block of ConvNeXt-T in float32),
so the paths are kept as the depthwise conv's kernel offsets k, with contribution vectors

    c_k(q) = post · (w_k ⊙ v_{p(q,k)}) + frac_k(q) · b_q,

and μ needs, per path, ⟨post (w_k ⊙ v_p), z_q⟩ and ‖post (w_k ⊙ v_p)‖ (the bias share). Written by hand (no
library decomposes into per-path contribution vectors). Two exact ways to get them:

* **Triangular** (stride 1, no autograd: every ConvNeXt call). With ``post = Q R`` (thin QR, Q (C', C)
  orthonormal columns, R (C, C) upper triangular, computed once per graph in float64), ‖post u‖ = ‖R u‖. For
  every source position p and offset k, y_k(p) = R·diag(w_k)·v_p is one GEMM of the channel-last source map
  against the stacked R·diag(w_k) of all 49 offsets (C → 49·C), done in blocks of R's rows [i0, i1) that only
  read channels ≥ i0 (R is triangular: ≈ (m+1)/(2m) of the dense multiply-adds for m blocks); ‖y_k(p)‖² is
  accumulated over the blocks, then moved from source p to target q = p − k by a strided view. No per-offset
  copy of the source map and no C×C Gram form per path. The dots need no GEMM: ⟨post (w_k ⊙ v_p), z_q⟩ =
  Σ_c w_k[c]·v_p[c]·g_q[c] with g = postᵀz (per offset one product with a shifted view and one
  matrix-vector product). When the node is known as post·dwconv(v) + a + t·c (a CNBlock: ``parts``), g is
  G·dwconv(v) + postᵀa + t·postᵀc with G = postᵀpost (C² multiply-adds per target instead of C'·C).
* **Sliced** (any stride; under autograd, ``differentiable=True``): the source vector u = w_k ⊙ v_p of each
  offset is materialised per chunk of offsets; dot = uᵀ(postᵀz_q), norm² = uᵀ(postᵀpost)u.

Both give the same numbers up to float rounding (tests compare them in float64 to 1e-12). μ and the bias
sharing are exactly those of :func:`sae_cafe.srd.rules.branch_mu` (norm-proportional bias, an equal split over
in-bounds paths when every contribution is zero, μ = 0 for a zero target), so
:func:`~sae_cafe.srd.rules.make_scatter` routes relevance by the depthwise conv's geometry unchanged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import UnsupportedModuleError
from .graph import Branch, ConvSpec
from .rules import _transpose, make_scatter

_CHUNK_BYTES = 1 << 21  # bytes of source vectors (u) per chunk of kernel offsets (sliced form)
_BLOCK = 32  # rows of R per GEMM block (triangular form); 24-48 measured equal, 96+ slower on ConvNeXt-T
_BAND_BYTES = 1 << 22  # bytes of y = R·diag(w_k)·v per band of source rows and block (cache-sized)
_ROW_GROUP_MIN = (128, 400)  # source positions per batch from which the norms' GEMMs go per kernel row, on one
# intra-op thread / on more (measured on ConvNeXt-T: with one thread the narrower GEMMs lose less)
_PAIRS_MAX_VALID = 0.65  # share of in-bounds paths up to which the norms go over gathered paths (small maps)
_PAIRS_BLOCK = 64  # rows of R per GEMM block over gathered paths (32-64 measured equal)
_PAIRS_CHUNK = 4096  # gathered paths per GEMM
_PAIRS_MAX_BYTES = 1 << 26  # at most this many bytes of gathered path vectors (else another loop order)
#: force one loop order of :func:`_triangular_norms` ("pairs", "rows", "bands"; tests); None: by size
FORCE_NORM_ORDER: str | None = None
#: at most this many relevance maps per image go through :func:`post_branch_back` (else μ, then scatter)
DIRECT_MAX_MAPS = 2
# per post matrix: (depthwise weight it was built with, Q (C', C), [(i0, i1, R·diag(w_k) stacked (C−i0, K·b))])
_FACTORS: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: a node known as ``scale·post·d + c``: d (N, h, w, C) the depthwise output (its bias included), channel-last;
#: c (C',) a constant vector
BiasParts = tuple[torch.Tensor, torch.Tensor]


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
    order k' = (kh−1−a, kw−1−b) (the source → target strided view of :func:`_triangular_paths` reads them so)."""
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
    _FACTORS[conv.post] = (conv.weight, q, mats, r.to(conv.post.dtype))
    return q, mats


def _g_from_parts(conv: ConvSpec, parts: BiasParts, scale: torch.Tensor | None) -> torch.Tensor:
    """postᵀz (N, h, w, C) of a node known to be ``z = scale·post·d + c`` (``parts`` = (d, c): d (N, h, w, C)
    the depthwise output with its bias, channel-last; c (C',) a constant vector): postᵀz = scale·G·d + postᵀc
    with G = postᵀpost. C² multiply-adds per target instead of the C'·C of postᵀz; equal up to rounding."""
    d, c = parts
    C = d.shape[-1]
    g = (d.reshape(-1, C) @ conv.post_gram()).view_as(d)
    return g * scale.permute(0, 2, 3, 1) + c @ conv.post if scale is not None else g + c @ conv.post


def _target_dots(conv: ConvSpec, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Stride-1 dots ⟨post·(w_k ⊙ v_{q+k}), z_q⟩ = Σ_c w_k[c]·v_{q+k}[c]·g_q[c] (N, K, h, w), g = postᵀz
    channel-last (N, h, w, C): per offset one product with a shifted view and one matrix-vector product
    (K·C multiply-adds per target; measured 1.5-3× faster than reading them off the norms' GEMM output)."""
    N, C = v.shape[:2]
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel, conv.padding, conv.dilation
    h, w = g.shape[1:3]
    vp = F.pad(v, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # (N, Hp, Wp, C)
    wk = conv.weight.reshape(C, kh * kw).T.contiguous()  # (K, C)
    out = g.new_empty(kh * kw, N * h * w)
    for k in range(kh * kw):
        a, b = divmod(k, kw)
        torch.mv((vp[:, a * dh:a * dh + h, b * dw:b * dw + w] * g).view(-1, C), wk[k], out=out[k])
    return out.view(kh * kw, N, h, w).transpose(0, 1)


def _triangular_paths(conv: ConvSpec, v: torch.Tensor, z: torch.Tensor, need_norm: bool,
                      band_bytes: int = _BAND_BYTES, parts: BiasParts | None = None,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stride-1 dots ⟨post (w_k ⊙ v_p), z_q⟩ and norms ‖post (w_k ⊙ v_p)‖ per path, (N, K, h, w) each (norm None
    without a bias): norms by the triangular source-side form (:func:`_triangular_norms`), dots on the target
    side from g = postᵀz (:func:`_target_dots`). ``v`` (N, C, H, W), ``z`` (N, C', h, w); ``parts``: the node's
    structure, when known (:func:`_g_from_parts`, with ``scale``)."""
    dot = _target_dots(conv, v, _post_t_z(conv, z, parts, scale))
    return dot, (_triangular_norms(conv, v, z.shape[-2:], band_bytes) if need_norm else None)


def _post_t_z(conv: ConvSpec, z: torch.Tensor, parts: BiasParts | None, scale: torch.Tensor | None
              ) -> torch.Tensor:
    """g = postᵀz_q, channel-last and contiguous (N, h, w, C)."""
    g = z.permute(0, 2, 3, 1) @ conv.post if parts is None else _g_from_parts(conv, parts, scale)
    return g.contiguous()


def _valid_range(a: int, dil: int, pad: int, out: int, size: int) -> tuple[int, int]:
    """Source rows [lo, hi) whose target row ``y + pad − a·dil`` under kernel row ``a`` is in [0, out)."""
    return max(0, a * dil - pad), min(size, a * dil - pad + out)


def factors_ready(conv: ConvSpec) -> None:
    """Fill the per-graph factor cache of ``conv`` (before several threads use it)."""
    _factors(conv)


def _r_factor(conv: ConvSpec) -> torch.Tensor:
    """R (C, C) of post = Q R (upper triangular, cached with :func:`_factors`)."""
    _factors(conv)
    return _FACTORS[conv.post][3]


def _in_bounds(a: int, dil: int, pad: int, size: int, out: int) -> tuple[int, int]:
    """Targets [lo, hi) of kernel offset ``a`` (one axis) whose source ``i + a·dil − pad`` is in [0, size)."""
    return max(0, pad - a * dil), min(out, pad - a * dil + size)


def _norm_order(conv: ConvSpec, v: torch.Tensor, hw: tuple[int, int]) -> str:
    """Loop order of :func:`_triangular_norms` for this map (measured on ConvNeXt-T, 2 threads)."""
    if FORCE_NORM_ORDER is not None:
        return FORCE_NORM_ORDER
    N, C, H, W = v.shape
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel, conv.padding, conv.dilation
    rows = sum(max(0, hi - lo) for a in range(kh) for lo, hi in [_in_bounds(a, dh, ph, H, hw[0])])
    cols = sum(max(0, hi - lo) for b in range(kw) for lo, hi in [_in_bounds(b, dw, pw, W, hw[1])])
    if rows * cols <= _PAIRS_MAX_VALID * kh * kw * hw[0] * hw[1] and \
            N * rows * cols * C * v.element_size() <= _PAIRS_MAX_BYTES:
        return "pairs"
    positions, threshold = N * H * W, _ROW_GROUP_MIN[torch.get_num_threads() > 1]
    return "rows" if positions >= threshold else "bands"


def _pair_norms(conv: ConvSpec, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """‖R (w_k ⊙ v_p)‖² (N, K, h, w) over the in-bounds paths only: their vectors u = w_k ⊙ v_p gathered into
    one matrix (one product per offset), then one GEMM per block of R's rows (its triangle: (m+1)/(2m) of
    the dense multiply-adds) and chunk of paths. On small maps most of a 7×7 window lies in the padding (43 %
    of the paths on a 7×7 map), which the per-source forms compute and discard."""
    N, C, H, W = v.shape
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel, conv.padding, conv.dilation
    h, w = hw
    r = _r_factor(conv)
    vp = F.pad(v, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (N, Hp, Wp, C)
    wk = conv.weight.reshape(C, kh * kw).T  # (K, C)
    rects, total = [], 0
    for a in range(kh):
        i0, i1 = _in_bounds(a, dh, ph, H, h)
        for b in range(kw):
            j0, j1 = _in_bounds(b, dw, pw, W, w)
            if i1 > i0 and j1 > j0:
                rects.append((a * kw + b, i0, i1, j0, j1, total))
                total += N * (i1 - i0) * (j1 - j0)
    u = v.new_empty(total, C)
    for k, i0, i1, j0, j1, o in rects:
        a, b = divmod(k, kw)
        src = vp[:, i0 + a * dh:i1 + a * dh, j0 + b * dw:j1 + b * dw]
        torch.mul(src, wk[k], out=u[o:o + src[..., 0].numel()].view(src.shape))
    sq = v.new_empty(total)
    for c0 in range(0, total, _PAIRS_CHUNK):
        c1, acc = min(total, c0 + _PAIRS_CHUNK), 0
        for r0 in range(0, C, _PAIRS_BLOCK):
            y = u[c0:c1, r0:] @ r[r0:r0 + _PAIRS_BLOCK, r0:].T  # rows r0.. of R: channels ≥ r0 only
            acc = acc + torch.linalg.vector_norm(y, dim=-1).square()
        sq[c0:c1] = acc
    out = v.new_zeros(N, kh * kw, h, w)
    for k, i0, i1, j0, j1, o in rects:
        out[:, k, i0:i1, j0:j1] = sq[o:o + N * (i1 - i0) * (j1 - j0)].view(N, i1 - i0, j1 - j0)
    return out


def _triangular_norms(conv: ConvSpec, v: torch.Tensor, hw: tuple[int, int], band_bytes: int = _BAND_BYTES
                      ) -> torch.Tensor:
    """‖post (w_k ⊙ v_p)‖ per path (N, K, h, w), stride 1, by the triangular form (module docstring).

    Three loop orders, all exact (:func:`_norm_order` picks by size): ``pairs`` on small maps
    (:func:`_pair_norms`); ``rows`` on maps with at least ``_ROW_GROUP_MIN`` source positions per batch: one
    GEMM per (kernel row, block of R) over only the source rows whose target exists under that kernel row
    (6-23 % of the border paths skipped on ConvNeXt-T's 56-14 px maps, and the 7·b-column output stays in
    cache); ``bands`` otherwise: one GEMM per block over all offsets and cache-sized bands of rows (fewer,
    larger GEMMs)."""
    N, C, H, W = v.shape
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel, conv.padding, conv.dilation
    h, w = hw
    K = kh * kw
    order = _norm_order(conv, v, hw)
    if order == "pairs":
        return _safe_sqrt(_pair_norms(conv, v, hw))
    _, mats = _factors(conv)
    vc = v.permute(2, 0, 3, 1).contiguous()  # (H, N, W, C): a band of rows is one matrix for every batch size
    if order == "rows":
        sq = v.new_zeros(H, N, W, kh, kw)
        for a in range(kh):  # reversed kernel row a' = kh − 1 − a (the order of the stacked columns)
            y0, y1 = _valid_range(kh - 1 - a, dh, ph, h, H)
            if y1 <= y0:
                continue
            acc = 0
            for i0, i1, mat in mats:
                b = i1 - i0
                y = (vc[y0:y1, ..., i0:] @ mat[:, a * kw * b:(a + 1) * kw * b]).view(y1 - y0, N, W, kw, b)
                acc = acc + torch.linalg.vector_norm(y, dim=-1).square()
            sq[y0:y1, :, :, a] = acc
    else:
        # cache-sized bands of source rows, but at least ~512 GEMM rows (batch 4 at 56×56: 1-row bands slow)
        band = min(H, max(band_bytes // max(1, N * W * K * _BLOCK * v.element_size()), -(-512 // (N * W))))
        sqs = []
        for t0 in range(0, H, band):
            t1 = min(H, t0 + band)
            ub, acc = vc[t0:t1], 0
            for i0, i1, mat in mats:
                y = (ub[..., i0:] @ mat).view(t1 - t0, N, W, kh, kw, i1 - i0)  # rows i0:i1 of R·diag(w_k)·v_p
                acc = acc + torch.linalg.vector_norm(y, dim=-1).square()  # one fused pass (faster than vecdot)
            sqs.append(acc)
        sq = torch.cat(sqs)
    # per source and reversed offset (N, H, W, kh, kw) → per target and offset (N, K, h, w)
    sp = v.new_zeros(N, H + 2 * ph, W + 2 * pw, kh, kw)
    sp[:, ph:ph + H, pw:pw + W] = sq.transpose(0, 1).flip(3, 4)
    a, b, c, d, e = sp.stride()
    t = sp.as_strided((N, h, w, kh, kw), (a, b, c, dh * b + d, dw * c + e))  # sp[n, q + k·d, k]
    return _safe_sqrt(t.reshape(N, h, w, K).permute(0, 3, 1, 2).contiguous())


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


def _check_branch(branch: Branch, v: torch.Tensor) -> None:
    conv, C = branch.conv, v.shape[1]
    if branch.pool is not None or conv.groups != C or tuple(conv.weight.shape[:2]) != (C, 1):
        raise UnsupportedModuleError(f"{conv.name}: a post matrix is only supported after a depthwise conv "
                                     "(groups = channels, one filter per channel) without a max-pool")


def _inverse_norm2(z: torch.Tensor) -> torch.Tensor:
    """1/‖z_q‖² per target (N, h', w'), 0 where z_q = 0 (μ = 0 there); one pass over z, no temporary."""
    zz = torch.linalg.vector_norm(z, dim=1).square()
    return torch.where(zz > 0, 1.0 / torch.where(zz > 0, zz, torch.ones_like(zz)), torch.zeros_like(zz))


def _bias_terms(branch: Branch, v: torch.Tensor, z: torch.Tensor, norm: torch.Tensor,
                bias_map: torch.Tensor | None, bias_dot: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each path's share of the bias (N, K, h', w'): norm-proportional, an equal split over in-bounds paths where
    every contribution is zero; and ⟨b_q, z_q⟩ (N, h', w') (``bias_dot`` when given)."""
    conv = branch.conv
    bz = bias_dot if bias_dot is not None else torch.linalg.vecdot(
        bias_map if bias_map is not None else branch.bias.view(1, -1, 1, 1), z, dim=1)
    total = norm.sum(1, keepdim=True)
    frac = norm / torch.where(total > 0, total, torch.ones_like(total))
    if not (total > 0).all():  # every contribution is zero: share the bias equally over in-bounds paths
        (ph, pw), (h, w) = conv.padding, z.shape[-2:]
        ones = F.pad(torch.ones_like(v[:1, :1]), (pw, pw, ph, ph)).permute(0, 2, 3, 1)
        valid = torch.stack([_offset_slices(ones, k, conv, (h, w))[..., 0] for k in range(conv.n_offsets)], 1)
        frac = torch.where(total > 0, frac, valid / valid.sum(1, keepdim=True).clamp_min(1))
    return frac, bz


def post_branch_mu(branch: Branch, v: torch.Tensor, z: torch.Tensor, bias_map: torch.Tensor | None = None,
                   max_bytes: int = 1 << 28, form: str | None = None, parts: BiasParts | None = None,
                   scale: torch.Tensor | None = None, bias_dot: torch.Tensor | None = None) -> torch.Tensor:
    """Sharing ratios (N, K, h', w') of a ``post · depthwise-conv`` branch's kernel offsets into node ``z``.

    ``v`` (N, C, H, W) is the depthwise conv's input, ``z`` (N, C_out, h', w') the node, ``bias_map``
    (N, C_out, h', w') a per-target bias replacing ``branch.bias``. ``form``: ``"triangular"`` or
    ``"sliced"`` (module docstring); ``None`` picks the triangular form for stride 1 outside autograd.
    Memory is bounded by ``max_bytes`` per chunk of kernel offsets (sliced form).

    ``scale`` (N, 1, h', w'), when given, is a frozen per-target factor s_q > 0 of the branch (a LayerNorm after
    the conv): ``z_q = s_q·post·dwconv(v)_q + b_q``, path vectors s_q·post·(w_k ⊙ v_p); then
    μ = (s·⟨post u, z⟩ + frac·⟨b, z⟩)/‖z‖² (the bias shares, ratios of norms at one target, are scale-free), the
    ratios of :func:`sae_cafe.srd.engine._frozen_mu` without dividing the maps by s. ``parts`` (d, c), when
    given, says that ``z = scale·post·d + c`` with d the depthwise output (a CNBlock): the triangular form then
    gets postᵀz from d (:func:`_g_from_parts`, C² instead of C'·C multiply-adds per target). ``bias_dot``
    (N, h', w'), when given, is ⟨b_q, z_q⟩ of a per-target bias known without its map (it replaces
    ``bias_map``; :meth:`sae_cafe.srd.graph.FrozenAffine.bias_dot`).
    """
    conv = branch.conv
    _check_branch(branch, v)
    if form is None:
        grad = torch.is_grad_enabled() and (v.requires_grad or z.requires_grad)
        form = "triangular" if conv.stride == (1, 1) and not grad else "sliced"
    if form == "triangular" and conv.stride != (1, 1):
        raise UnsupportedModuleError(f"{conv.name}: the triangular form needs stride 1, got {conv.stride}")
    inv = _inverse_norm2(z)
    need_norm = branch.bias is not None or bias_map is not None or bias_dot is not None
    dot, norm = (_triangular_paths(conv, v, z, need_norm, parts=parts, scale=scale) if form == "triangular" else
                 _sliced_paths(conv, v, z, need_norm, max_bytes))
    if scale is not None:
        dot = dot * scale
    if not need_norm:
        return dot * inv.unsqueeze(1)
    frac, bz = _bias_terms(branch, v, z, norm, bias_map, bias_dot)
    return (dot + frac * bz.unsqueeze(1)) * inv.unsqueeze(1)


def direct_terms(branch: Branch, v: torch.Tensor, z: torch.Tensor, bias_map: torch.Tensor | None = None,
                 parts: BiasParts | None = None, scale: torch.Tensor | None = None,
                 bias_dot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input-only factors of :func:`post_branch_back`: a·g (N, C, h', w') with g = postᵀz and
    a = s/‖z‖² per target, and frac_k·⟨b_q, z_q⟩/‖z_q‖² (N, K, h', w') (None without a bias). They depend on
    the forward only, so they can be computed ahead of the relevance (:func:`run_concurrently`)."""
    conv = branch.conv
    inv = _inverse_norm2(z)
    a = inv.unsqueeze(1) if scale is None else inv.unsqueeze(1) * scale  # (N, 1, h', w')
    ag = _post_t_z(conv, z, parts, scale).permute(0, 3, 1, 2) * a  # (N, C, h', w'), channel-last storage
    if branch.bias is None and bias_map is None and bias_dot is None:
        return ag, None
    frac, bz = _bias_terms(branch, v, z, _triangular_norms(conv, v, z.shape[-2:]), bias_map, bias_dot)
    return ag, frac * (bz * inv).unsqueeze(1)


def post_branch_back(branch: Branch, v: torch.Tensor, z: torch.Tensor, r: torch.Tensor,
                     bias_map: torch.Tensor | None = None, parts: BiasParts | None = None,
                     scale: torch.Tensor | None = None, bias_dot: torch.Tensor | None = None,
                     terms: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """Source relevance (N, S, H, W) of target relevance ``r`` (N, S, h', w') routed by the μ of
    :func:`post_branch_mu` — Σ_{q,k: p = q+k} r_q·μ_k(q) — without forming the per-path dots; None where the
    triangular form does not apply (stride ≠ 1, autograd).

    Same algebra, another order of sums: with ρ_q = r_q·s_q/‖z_q‖² and g = postᵀz, the dot part is
    Σ_c v_p[c]·Σ_k w_k[c]·(ρ g)_{p−k}[c], one transposed depthwise conv of the C-channel map ρ·g per relevance
    map (K·C multiply-adds per position in one library kernel instead of K per-offset products and
    matrix-vector products); the bias part r_q·frac_k(q)·⟨b_q, z_q⟩/‖z_q‖² is scattered by the conv's
    geometry as in the μ route. Equal to the μ route up to float rounding (tests: float64, 1e-12); pays off for a
    few relevance maps per image (saliency), while many seeds (iERFs) share one μ. ``terms``: the result of
    :func:`direct_terms` for these arguments, when computed ahead.
    """
    conv = branch.conv
    _check_branch(branch, v)
    grad = torch.is_grad_enabled() and (v.requires_grad or z.requires_grad or r.requires_grad)
    if conv.stride != (1, 1) or grad:
        return None
    ag, fb = terms if terms is not None else direct_terms(branch, v, z, bias_map, parts, scale, bias_dot)
    N, S = r.shape[:2]
    C, (H, W) = v.shape[1], v.shape[-2:]
    y = (r.unsqueeze(2) * ag.unsqueeze(1)).flatten(0, 1)  # ρ·g (N·S, C, h', w')
    t = _transpose(y, conv.weight, conv.stride, conv.padding, conv.dilation, (H, W), C)  # (N·S, C, H, W)
    back = torch.linalg.vecdot(t.view(N, S, C, H, W), v.unsqueeze(1), dim=2)  # (N, S, H, W)
    if fb is None:
        return back
    m = fb.unsqueeze(1) * r.unsqueeze(2)  # (N, S, K, h', w')
    return back + make_scatter(branch, (H, W), None)(m.flatten(0, 1)).view(N, S, H, W)


def run_concurrently(jobs: list, costs: list[float] | None = None) -> list:
    """``[job() for job in jobs]`` (outside autograd), as many at a time as torch has intra-op threads, each on
    one thread, largest ``costs`` first; the results in job order.

    The depthwise-path work (many small GEMMs and reductions) keeps two threads busy less well than two
    independent jobs on one thread each (ConvNeXt-T, 2 threads: 5-10 % less time, the same numbers bitwise).
    torch's intra-op thread count is process-wide: it is 1 while the jobs run and restored afterwards, so
    other torch work running at that moment in another Python thread runs single-threaded too.
    """
    threads = torch.get_num_threads()
    if threads < 2 or len(jobs) < 2:
        return [job() for job in jobs]
    order = sorted(range(len(jobs)), key=lambda j: -(costs[j] if costs is not None else 0.0))

    def run(j: int):
        with torch.no_grad():
            return jobs[j]()

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
            done = dict(zip(order, pool.map(run, order)))
    finally:
        torch.set_num_threads(threads)
    return [done[j] for j in range(len(jobs))]

