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


def _offset_slices(t: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int]
                   ) -> Iterator[torch.Tensor]:
    """For each kernel offset (row-major), the strided source slice aligned with the output grid."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = kernel, stride, padding, dilation, out_hw
    tp = F.pad(t, (pw, pw, ph, ph)) if ph or pw else t
    for a in range(kh):
        for b in range(kw):
            yield tp[:, :, a * dh: a * dh + sh * (oh - 1) + 1: sh, b * dw: b * dw + sw * (ow - 1) + 1: sw]


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


def _path_sources(branch: Branch, v: torch.Tensor, pooled: torch.Tensor | None, idx: torch.Tensor | None,
                  out_hw: tuple[int, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(source slice aligned with the output grid, validity slice) for every path j = (o, k)."""
    conv = branch.conv
    geo = (conv.kernel, conv.stride, conv.padding, conv.dilation) if conv is not None else (
        (1, 1), (1, 1), (0, 0), (1, 1))
    if branch.pool is None:
        ones = torch.ones_like(v[:1, :1])
        yield from zip(_offset_slices(v, *geo, out_hw), _offset_slices(ones, *geo, out_hw))
        return
    pool = branch.pool
    offsets = pool_offset_masks(pool, idx, v.shape[-1])
    ones = torch.ones_like(v[:1, :1])
    pooled_hw = pooled.shape[-2:]
    for o, valid_o in enumerate(_offset_slices(ones, pool.kernel, pool.stride, pool.padding, pool.dilation,
                                               pooled_hw)):
        u_o = pooled * (offsets == o)
        yield from zip(_offset_slices(u_o, *geo, out_hw), _offset_slices(valid_o, *geo, out_hw))


def branch_mu(branch: Branch, v: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
              pooled: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor:
    """Sharing ratios (N, J, h', w') of the branch's paths into node ``z`` (N, C, h', w').

    ``out`` is the branch's output (with bias), ``pooled``/``idx`` its max-pool output and stored indices.
    """
    zz = (z * z).sum(1)
    inv = torch.where(zz > 0, 1.0 / torch.where(zz > 0, zz, torch.ones_like(zz)), torch.zeros_like(zz))
    bz = (branch.bias.view(1, -1, 1, 1) * z).sum(1) if branch.bias is not None else None
    conv, out_hw = branch.conv, z.shape[-2:]
    simple = branch.pool is None and (conv is None or (conv.kernel == (1, 1) and conv.padding == (0, 0)))
    if simple:  # one path per target: the whole branch output (bias included) comes from one source
        return ((out * z).sum(1) * inv).unsqueeze(1)
    dots, norms, valids = [], [], []
    for src, valid in _path_sources(branch, v, pooled, idx, out_hw):
        if conv is None:
            path = src
        else:
            a = len(dots) % conv.n_offsets
            w_k = conv.weight[:, :, a // conv.kernel[1]: a // conv.kernel[1] + 1,
                              a % conv.kernel[1]: a % conv.kernel[1] + 1]
            path = F.conv2d(src, w_k, None, 1, 0, 1, conv.groups)
        dots.append((path * z).sum(1))
        if bz is not None:
            norms.append(torch.linalg.vector_norm(path, dim=1))
            valids.append(valid[:, 0].expand_as(dots[-1]))
    dot = torch.stack(dots, 1)
    if bz is None:
        return dot * inv.unsqueeze(1)
    norm, valid = torch.stack(norms, 1), torch.stack(valids, 1).to(dot.dtype)
    total = norm.sum(1, keepdim=True)
    frac = torch.where(total > 0, norm / torch.where(total > 0, total, torch.ones_like(total)),
                       valid / valid.sum(1, keepdim=True).clamp_min(1))
    return (dot + frac * bz.unsqueeze(1)) * inv.unsqueeze(1)
