"""SRD rules for one branch of a stage: sharing ratios μ per contribution path, and their scatter.

Written by hand: no library decomposes activations into per-source contribution *vectors* (zennit/Captum
propagate scalar relevances per neuron). A branch ``conv(pool(v)) + b`` into the node ``z`` has paths
j = (pool offset o, kernel offset k); path j carries the contribution vector
``c_j(q) = W_k u_o(p) + frac_j(q) b`` from source position p = p(q, o, k) to target q, where ``u_o`` keeps the
pooled channels whose stored arg-max index lies at window offset o, and
``frac_j = ‖W_k u_o‖ / Σ_j' ‖W_k' u_o'‖`` shares the bias by norm (equally over in-bounds paths if every
contribution is zero). The sharing ratio is ``μ_j(q) = ⟨c_j(q), z_q⟩ / ‖z_q‖²`` (0 where ‖z_q‖ = 0).
Backward, R_p = Σ_{q,j: p(q,j)=p} μ_j(q) R_q: a transposed convolution with one-hot kernels, so many
relevance seeds cost almost nothing once μ is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .graph import Branch, MaxPoolSpec

Scatter = Callable[[torch.Tensor], torch.Tensor]  # (B, J, h', w') -> (B, 1, h, w)


def _one_hot_kernel(groups: int, kernel: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    k = kernel[0] * kernel[1]
    eye = torch.eye(k, dtype=like.dtype, device=like.device).view(k, 1, *kernel)
    return eye.repeat(groups, 1, 1, 1)


def _transpose(m: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, out_hw, groups: int
               ) -> torch.Tensor:
    base = [(m.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1
            for i in range(2)]
    op = tuple(out_hw[i] - base[i] for i in range(2))
    return F.conv_transpose2d(m, weight, None, stride, padding, op, groups, dilation)


def make_scatter(branch: Branch, src_hw: tuple[int, int], pooled_hw: tuple[int, int] | None) -> Scatter:
    """The map from path-wise target relevance (B, J, h', w') to source relevance (B, 1, h, w)."""
    conv, pool = branch.conv, branch.pool
    kernel = conv.kernel if conv is not None else (1, 1)
    geo = (conv.stride, conv.padding, conv.dilation) if conv is not None else ((1, 1), (0, 0), (1, 1))
    if pool is None:
        def scatter(m: torch.Tensor) -> torch.Tensor:
            if kernel == (1, 1) and geo == ((1, 1), (0, 0), (1, 1)):
                return m
            return _transpose(m, _one_hot_kernel(1, kernel, m), *geo, src_hw, 1)
        return scatter
    P = pool.n_offsets

    def scatter_pool(m: torch.Tensor) -> torch.Tensor:
        t = _transpose(m, _one_hot_kernel(P, kernel, m), *geo, pooled_hw, P)  # (B, P, h'', w'')
        return _transpose(t, _one_hot_kernel(1, pool.kernel, m), pool.stride, pool.padding, pool.dilation,
                          src_hw, 1)
    return scatter_pool


def pool_offset_masks(pool: MaxPoolSpec, idx: torch.Tensor, src_w: int) -> torch.Tensor:
    """(N, C, h'', w'') window offset (row-major in the pool kernel) of each pooled value's stored index."""
    hh, ww = idx.shape[-2:]
    rows, cols = idx // src_w, idx % src_w
    r0 = (torch.arange(hh, device=idx.device) * pool.stride[0] - pool.padding[0]).view(-1, 1)
    c0 = (torch.arange(ww, device=idx.device) * pool.stride[1] - pool.padding[1]).view(1, -1)
    return ((rows - r0) // pool.dilation[0]) * pool.kernel[1] + (cols - c0) // pool.dilation[1]


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """√x with a finite gradient at 0 (the value stays exactly 0 there)."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _unfold(t: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """(N, C, H, W) → (N, C, K, L): the source vector of every kernel offset k at every output position."""
    u = F.unfold(t, kernel, dilation, padding, stride)
    return u.view(t.shape[0], t.shape[1], kernel[0] * kernel[1], -1)


def _geometry(branch: Branch) -> tuple:
    conv = branch.conv
    if conv is None:
        return (1, 1), (1, 1), (0, 0), (1, 1)
    return conv.kernel, conv.stride, conv.padding, conv.dilation


def _path_sources(branch: Branch, v: torch.Tensor, pooled: torch.Tensor | None, idx: torch.Tensor | None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per pool offset o: the source map (N, C, H, W) of that offset and its path validity (1, 1, K, L)."""
    geo = _geometry(branch)
    if branch.pool is None:
        yield v, _unfold(torch.ones_like(v[:1, :1]), *geo)
        return
    pool = branch.pool
    offsets = pool_offset_masks(pool, idx, v.shape[-1])
    ones = torch.ones_like(v[:1, :1])
    valid_pool = _unfold(ones, pool.kernel, pool.stride, pool.padding, pool.dilation)  # (1, 1, P, L'')
    for o in range(pool.n_offsets):
        valid_o = valid_pool[:, :, o].view(1, 1, *pooled.shape[-2:])
        yield pooled * (offsets == o), _unfold(valid_o, *geo)


def _dots_norms_shift(conv, src: torch.Tensor, z: torch.Tensor, need_norm: bool, chunk: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stride-1 dense conv: Y_k = W_k u for all k by one 1×1 convolution over the source map, then the
    contribution of offset k to target q is Y_k read at the shifted source position q + k·d − π."""
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel, conv.padding, conv.dilation
    N, cout, h, w = z.shape
    K = kh * kw
    w1 = conv.weight.permute(2, 3, 0, 1).reshape(K * cout, -1, 1, 1)  # offset-major stacked 1×1 kernels
    dots, norms = [], []
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        y = F.conv2d(src, w1[k0 * cout:k1 * cout])
        y = F.pad(y, (pw, pw, ph, ph)) if ph or pw else y
        for j, k in enumerate(range(k0, k1)):
            a, b = divmod(k, kw)
            yk = y[:, j * cout:(j + 1) * cout, a * dh:a * dh + h, b * dw:b * dw + w]
            dots.append(torch.linalg.vecdot(yk, z, dim=1))
            if need_norm:
                norms.append(_safe_sqrt(torch.linalg.vecdot(yk, yk, dim=1)))
    dot = torch.stack(dots, 1).flatten(2)
    return dot, (torch.stack(norms, 1).flatten(2) if need_norm else None)


def _path_outputs(branch: Branch, src: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Bias-free contribution vectors (N, k, C_out, L) for chunks of kernel offsets, from (N, C_in, K, L)."""
    conv = branch.conv
    if conv is None:
        yield src.transpose(1, 2)
        return
    g = conv.groups
    N, cin, K, L = src.shape
    cout = conv.weight.shape[0]
    w = conv.weight.reshape(g, cout // g, cin // g, K).permute(3, 0, 1, 2)  # (K, g, cout/g, cin/g)
    u = src.view(N, g, cin // g, K, L).permute(0, 3, 1, 2, 4)  # (N, K, g, cin/g, L)
    for k0 in range(0, K, chunk):
        out = torch.matmul(w[k0:k0 + chunk], u[:, k0:k0 + chunk])  # (N, k, g, cout/g, L)
        yield out.reshape(N, out.shape[1], cout, L)


def _gram_wz(conv, z: torch.Tensor) -> torch.Tensor:
    """W_kᵀ z for every offset k: (N, K, C_in, L); shared by all pool offsets of a branch."""
    w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1], -1).permute(2, 1, 0)  # (K, cin, cout)
    return torch.matmul(w, z.flatten(2).unsqueeze(1))


def _dots_norms_gram(branch: Branch, src: torch.Tensor, wz: torch.Tensor, need_norm: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dot (N, K, L) = ⟨W_k u, z⟩ = ⟨u, W_kᵀ z⟩ and ‖W_k u‖² = uᵀ (W_kᵀ W_k) u, cheap when C_in ≪ C_out."""
    conv = branch.conv
    N, cin, K, L = src.shape
    w = conv.weight.reshape(conv.weight.shape[0], cin, K).permute(2, 1, 0)  # (K, cin, cout)
    u = src.permute(0, 2, 1, 3)  # (N, K, cin, L)
    dot = (wz * u).sum(2)
    if not need_norm:
        return dot, None
    gram = torch.matmul(w, w.transpose(1, 2))  # (K, cin, cin)
    norm = _safe_sqrt((torch.matmul(gram, u) * u).sum(2).clamp_min(0))
    return dot, norm


def branch_mu(branch: Branch, v: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
              pooled: torch.Tensor | None, idx: torch.Tensor | None, max_bytes: int = 1 << 28) -> torch.Tensor:
    """Sharing ratios (N, J, h', w') of the branch's paths into node ``z`` (N, C, h', w').

    ``out`` is the branch's output (with bias), ``pooled``/``idx`` its max-pool output and stored indices.
    Path j = o·K + k. Memory is bounded by ``max_bytes`` per chunk of kernel offsets.
    """
    zz = (z * z).sum(1)
    inv = torch.where(zz > 0, 1.0 / torch.where(zz > 0, zz, torch.ones_like(zz)), torch.zeros_like(zz))
    conv, (h, w) = branch.conv, z.shape[-2:]
    if branch.pool is None and (conv is None or (conv.kernel == (1, 1) and conv.padding == (0, 0))):
        # one path per target: the whole branch output (bias included) comes from one source
        return ((out * z).sum(1) * inv).unsqueeze(1)
    zf = z.flatten(2).unsqueeze(1)  # (N, 1, C_out, L)
    per_offset = z.shape[0] * z.shape[1] * h * w * z.element_size()
    chunk = max(1, max_bytes // max(per_offset, 1))
    need_norm = branch.bias is not None
    gram = conv is not None and conv.groups == 1 and 2 * conv.weight.shape[1] <= conv.weight.shape[0]
    shift = conv is not None and conv.groups == 1 and conv.stride == (1, 1) and not gram
    wz = _gram_wz(conv, z) if gram else None
    dots, norms, valids = [], [], []
    for src_map, valid in _path_sources(branch, v, pooled, idx):
        valids.append(valid[:, 0])
        if shift or gram:
            dot, norm = (_dots_norms_shift(conv, src_map, z, need_norm, chunk) if shift else
                         _dots_norms_gram(branch, _unfold(src_map, *_geometry(branch)), wz, need_norm))
            dots.append(dot)
            norms.append(norm)
            continue
        for path in _path_outputs(branch, _unfold(src_map, *_geometry(branch)), chunk):
            dots.append(torch.linalg.vecdot(path, zf, dim=2))
            if need_norm:
                norms.append(_safe_sqrt(torch.linalg.vecdot(path, path, dim=2)))
    dot = torch.cat(dots, 1).view(z.shape[0], -1, h, w)
    if not need_norm:
        return dot * inv.unsqueeze(1)
    bz = (branch.bias.view(1, -1, 1, 1) * z).sum(1)
    norm = torch.cat(norms, 1).view_as(dot)
    total = norm.sum(1, keepdim=True)
    frac = norm / torch.where(total > 0, total, torch.ones_like(total))
    if not (total > 0).all():  # every contribution is zero: share the bias equally over in-bounds paths
        valid = torch.cat(valids, 1).view(1, -1, h, w).to(dot.dtype)
        frac = torch.where(total > 0, frac, valid / valid.sum(1, keepdim=True).clamp_min(1))
    return (dot + frac * bz.unsqueeze(1)) * inv.unsqueeze(1)
