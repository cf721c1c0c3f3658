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


# ----- ConvNeXt (LayerNorm with frozen σ) -------------------------------------------------------------------
def _ln_params(ln: nn.Module):
    C = ln.normalized_shape[-1]
    gamma = ln.weight.detach().double() if ln.weight is not None else torch.ones(C, dtype=torch.float64)
    beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros(C, dtype=torch.float64)
    return gamma, beta, ln.eps


def _inv_sigma(y: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 / torch.sqrt(((y - y.mean()) ** 2).mean() + eps)


def _share(paths, bias):
    """Norm-proportional bias share over the (in-bounds) paths: [(source, p, c + frac·bias)]."""
    norms = torch.stack([c.norm() for _, _, c in paths])
    total = norms.sum()
    share = norms / total if total > 0 else torch.full_like(norms, 1.0 / len(paths))
    return [(src, p, c + s * bias) for (src, p, c), s in zip(paths, share)]


def _convnext_records(model: nn.Module, x: torch.Tensor):
    """Forward records [(node, {q: [(source node, p, c)]}, z (C, h, w))] of one image (3, H, W), every
    contribution vector built explicitly from the model's own parameters (LayerNorm σ frozen per position)."""
    from torchvision.models.convnext import CNBlock

    records = []
    v = x.double()
    src = "input"
    for i, m in enumerate(model.features):
        name = f"features.{i}"
        if i == 0:  # stem: LN(conv4x4/4(x) + b)
            conv, (gamma, beta, eps) = m[0], _ln_params(m[1])
            W, b = conv.weight.detach().double(), conv.bias.detach().double()
            k, st = conv.kernel_size[0], conv.stride[0]
            z = m(v[None])[0]
            contribs = {}
            for qi in range(z.shape[1]):
                for qj in range(z.shape[2]):
                    raw = [((qi * st + a, qj * st + c), W[:, :, a, c] @ v[:, qi * st + a, qj * st + c])
                           for a in range(k) for c in range(k)]
                    s = _inv_sigma(sum(r for _, r in raw) + b, eps)
                    paths = [(src, p, s * gamma * (r - r.mean())) for p, r in raw]
                    contribs[qi, qj] = _share(paths, s * gamma * (b - b.mean()) + beta)
            records.append((name, contribs, z))
            v, src = z, name
            continue
        if all(isinstance(blk, CNBlock) for blk in m):
            for j, blk in enumerate(m):
                bname = f"{name}.{j}"
                dw, ln, lin1, act, lin2 = blk.block[0], blk.block[2], blk.block[3], blk.block[4], blk.block[5]
                gamma, beta, eps = _ln_params(ln)
                wd, bd = dw.weight.detach().double()[:, 0], dw.bias.detach().double()
                W1, b1 = lin1.weight.detach().double(), lin1.bias.detach().double()
                W2, b2 = lin2.weight.detach().double(), lin2.bias.detach().double()
                ls = blk.layer_scale.detach().double().reshape(-1)
                h = blk.block[:4](v[None])[0].permute(2, 0, 1)  # pre-activation (4C, h, w)
                kk, pad = dw.kernel_size[0], dw.padding[0]
                C, H, Wd = v.shape
                contribs = {}
                for qi in range(H):
                    for qj in range(Wd):
                        raw = []
                        for a in range(kk):
                            for c in range(kk):
                                pi, pj = qi - pad + a, qj - pad + c
                                if 0 <= pi < H and 0 <= pj < Wd:
                                    raw.append(((pi, pj), wd[:, a, c] * v[:, pi, pj]))
                        s = _inv_sigma(sum(r for _, r in raw) + bd, eps)
                        paths = [(src, p, W1 @ (s * gamma * (r - r.mean()))) for p, r in raw]
                        bias = W1 @ (s * gamma * (bd - bd.mean()) + beta) + b1
                        contribs[qi, qj] = _share(paths, bias)
                records.append((f"{bname}.h", contribs, h))
                a_post = act(h)
                z = blk(v[None])[0]
                contribs = {(qi, qj): [(f"{bname}.h", (qi, qj), ls * (W2 @ a_post[:, qi, qj] + b2)),
                                       (src, (qi, qj), v[:, qi, qj])]
                            for qi in range(H) for qj in range(Wd)}
                records.append((bname, contribs, z))
                v, src = z, bname
            continue
        # downsampling: conv2x2/2(LN(v)) + b
        (gamma, beta, eps), conv = _ln_params(m[0]), m[1]
        W, b = conv.weight.detach().double(), conv.bias.detach().double()
        k, st = conv.kernel_size[0], conv.stride[0]
        z = m(v[None])[0]
        bias = b + sum(W[:, :, a, c] @ beta for a in range(k) for c in range(k))
        contribs = {}
        for qi in range(z.shape[1]):
            for qj in range(z.shape[2]):
                paths = []
                for a in range(k):
                    for c in range(k):
                        p = (qi * st + a, qj * st + c)
                        vp = v[:, p[0], p[1]]
                        paths.append((src, p, W[:, :, a, c] @ (_inv_sigma(vp, eps) * gamma * (vp - vp.mean()))))
                contribs[qi, qj] = _share(paths, bias)
        records.append((name, contribs, z))
        v, src = z, name
    return records, v, src


def reference_convnext_saliency(model: nn.Module, x: torch.Tensor, target: int,
                                contrasts: tuple[str, ...] = ("none", "mean")) -> dict:
    """SRD saliency of one image (3, H, W) for a torchvision ConvNeXt, float64, by explicit loops.

    Returns {contrast: (saliency (H, W), {node: relevance (h, w)})}. Asserts Σ contributions = the model's own
    node value at every target (the decomposition is exact)."""
    out = {}
    with torch.no_grad():
        records, v, top = _convnext_records(model, x)
        for name, contribs, z in records:
            for (qi, qj), paths in contribs.items():
                total = sum(c for _, _, c in paths)
                assert torch.allclose(total, z[:, qi, qj], atol=1e-10, rtol=1e-10), (name, qi, qj)
        ln, fc = model.classifier[0], model.classifier[2]
        gamma, beta, eps = _ln_params(ln)
        C, h, w = v.shape
        n = h * w
        s = _inv_sigma(v.mean((1, 2)), eps)
        wy, by = fc.weight.detach().double()[target], fc.bias.detach().double()[target]
        r0 = torch.einsum("c,chw->hw", wy, s * gamma.view(-1, 1, 1) * (v - v.mean(0, keepdim=True))) / n
        r0 = r0 + (wy @ beta + by) / n
        shapes = {"input": x.shape[1:], **{name: z.shape[1:] for name, _, z in records}}
        for contrast in contrasts:
            rel = {top: r0 - r0.mean() if contrast == "mean" else r0}
            seen = {}
            for name, contribs, z in reversed(records):
                r = rel.pop(name)
                seen[name] = r
                for (qi, qj), paths in contribs.items():
                    zq = z[:, qi, qj]
                    zz = zq @ zq
                    if zz == 0:
                        continue
                    for src, p, c in paths:
                        if src not in rel:
                            rel[src] = torch.zeros(tuple(shapes[src]), dtype=torch.float64)
                        rel[src][p] += (c @ zq) / zz * r[qi, qj]
            out[contrast] = (rel["input"], seen)
    return out
