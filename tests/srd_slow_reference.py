"""A slow, explicit float64 SRD reference for plain Sequential conv nets (tests only).

Independent of the engine: loops over every target position and contribution path, builds each
contribution *vector* c_{p→q} explicitly (pooled channels routed by PyTorch's stored indices), shares the
bias by contribution norms, forms μ = ⟨c, z⟩/‖z‖² and propagates relevance with dense sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pairs(m, attr):
    v = getattr(m, attr)
    return (v, v) if isinstance(v, int) else tuple(v)


def _stage_contribs(v, conv: nn.Conv2d | None, pool: nn.MaxPool2d | None, avg: nn.AvgPool2d | None,
                    bn: nn.BatchNorm2d | None = None):
    """{q: [(source position, contribution vector)]}, bias vector, z (C, h', w')."""
    C, H, W = v.shape
    if pool is not None:
        pooled, idx = F.max_pool2d(v[None], pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                   return_indices=True)
        pooled, idx = pooled[0], idx[0]
    else:
        pooled, idx = v, None
    if avg is not None:
        k = _pairs(avg, "kernel_size")
        s = _pairs(avg, "stride")
        weight = torch.zeros(C, C, *k, dtype=v.dtype)
        for c in range(C):
            weight[c, c] = 1.0 / (k[0] * k[1])
        stride, padding, dilation, bias = s, (0, 0), (1, 1), torch.zeros(C, dtype=v.dtype)
    else:
        weight = conv.weight.detach().double()
        if conv.groups > 1:  # expand grouped weights to dense for the reference
            g, cin = conv.groups, pooled.shape[0]
            dense = torch.zeros(weight.shape[0], cin, *weight.shape[2:], dtype=v.dtype)
            per_out, per_in = weight.shape[0] // g, cin // g
            for o in range(weight.shape[0]):
                gi = o // per_out
                dense[o, gi * per_in:(gi + 1) * per_in] = weight[o]
            weight = dense
        stride, padding, dilation = _pairs(conv, "stride"), _pairs(conv, "padding"), _pairs(conv, "dilation")
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=v.dtype)
        if bn is not None:
            scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
    Hp, Wp = pooled.shape[1:]
    kh, kw = weight.shape[2:]
    oh = (Hp + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (Wp + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    contribs = {}
    z = torch.zeros(weight.shape[0], oh, ow, dtype=v.dtype)
    for qi in range(oh):
        for qj in range(ow):
            paths = []
            for a in range(kh):
                for b in range(kw):
                    pi = qi * stride[0] - padding[0] + a * dilation[0]
                    pj = qj * stride[1] - padding[1] + b * dilation[1]
                    if not (0 <= pi < Hp and 0 <= pj < Wp):
                        continue
                    if idx is None:
                        paths.append(((pi, pj), weight[:, :, a, b] @ pooled[:, pi, pj]))
                        continue
                    for c_src in set(idx[:, pi, pj].tolist()):
                        mask = (idx[:, pi, pj] == c_src).double()
                        paths.append(((c_src // W, c_src % W), weight[:, :, a, b] @ (pooled[:, pi, pj] * mask)))
            norms = torch.stack([c.norm() for _, c in paths])
            total = norms.sum()
            share = norms / total if total > 0 else torch.full_like(norms, 1.0 / len(paths))
            contribs[qi, qj] = [(p, c + s * bias) for (p, c), s in zip(paths, share)]
            z[:, qi, qj] = sum(c for _, c in contribs[qi, qj])
    return contribs, z


def reference_saliency(model: nn.Sequential, x: torch.Tensor, target: int, contrast: str = "none"):
    """SRD saliency (H, W) of one image (3, H, W) for a Sequential conv net, float64, by explicit loops."""
    mods = list(model)
    v = x.double()
    records = []  # (contribs, src shape)
    i = 0
    pool = avg = None
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.MaxPool2d):
            pool = m
        elif isinstance(m, nn.AvgPool2d):
            avg = m
            contribs, z = _stage_contribs(v, None, pool, avg)
            records.append((contribs, v.shape, z))
            v, pool, avg = z, None, None
        elif isinstance(m, nn.Conv2d):
            bn = mods[i + 1] if isinstance(mods[i + 1], nn.BatchNorm2d) else None
            contribs, z = _stage_contribs(v, m, pool, None, bn)
            i += 1 + (bn is not None)
            records.append((contribs, v.shape, z))
            v, pool = mods[i](z), None
        elif isinstance(m, nn.Flatten):
            break
        i += 1
    head = [mm for mm in mods[i:] if isinstance(mm, nn.Linear)]
    assert len(head) == 1 and pool is None
    lin = head[0]
    C, h, w = v.shape
    wy = lin.weight.detach().double()[target].view(C, h, w)
    r = (wy * v).sum(0) + lin.bias.detach().double()[target] / (h * w)
    if contrast == "mean":
        r = r - r.mean()
    rel = r
    for contribs, src_shape, z in reversed(records):
        new = torch.zeros(src_shape[1:], dtype=torch.float64)
        for (qi, qj), paths in contribs.items():
            zq = z[:, qi, qj]
            zz = zq @ zq
            if zz == 0:
                continue
            for p, c in paths:
                new[p] += (c @ zq) / zz * rel[qi, qj]
        rel = new
    return rel
