"""An explicit per-path float64 SRD reference for residual CNNs with SE gates, fused BN-activations, ReLU6
linear bottlenecks, group convs and average-pool downsampling (tests only; timm ResNet / EfficientNet /
MobileNetV3, torchvision MobileNetV2 / RegNet).

Independent of the engine and of the graph builders: a network is written here as a *recipe* of nodes read
off the model's own modules (each node = Σ branches, then the model's own post-activation modules); for every
target position the reference loops over every contribution path and builds its contribution *vector*
explicitly (max-pooled channels routed by PyTorch's stored indices, average pools as one path per window
cell with weight 1/k², grouped weights expanded to dense), shares each branch's bias by contribution norms,
checks Σ contributions = the model's own value of the node, forms μ = ⟨c, z⟩/‖z‖² and propagates relevance
with dense sums. The head is a global average pool + Linear.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RefBranch:
    """``bn(conv(pre(v_source)))``; ``conv=None``: the identity skip. ``pre``: None, nn.MaxPool2d or nn.AvgPool2d."""

    source: str
    conv: nn.Conv2d | None = None
    bn: nn.BatchNorm2d | None = None
    pre: nn.Module | None = None


@dataclass
class RefNode:
    name: str
    branches: list[RefBranch]
    post: Callable[[torch.Tensor], torch.Tensor] | None = None  # (1, C, h, w) -> (1, C, h, w); model's modules
    extra: dict = field(default_factory=dict)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach().double()
    if conv.groups == 1:
        return w
    g, cin = conv.groups, conv.in_channels
    dense = torch.zeros(w.shape[0], cin, *w.shape[2:], dtype=torch.float64)
    per_out, per_in = w.shape[0] // g, cin // g
    for o in range(w.shape[0]):
        gi = o // per_out
        dense[o, gi * per_in:(gi + 1) * per_in] = w[o]
    return dense


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = _dense_weight(conv)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * s.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * s + bn.bias.detach().double()
    return w, b


def _branch_paths(br: RefBranch, v: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """{q: [(source position, contribution vector)]} (bias shared by norm) and the model's branch output."""
    out_model = v[None]
    if br.pre is not None:
        out_model = br.pre(out_model)
    if br.conv is not None:
        out_model = br.conv(out_model)
        if br.bn is not None:
            out_model = F.batch_norm(out_model, br.bn.running_mean, br.bn.running_var, br.bn.weight, br.bn.bias,
                                     False, 0.0, br.bn.eps)  # the BN part only (timm BatchNormAct2d: no act)
    out_model = out_model[0]
    C, H, W = v.shape
    # the conv's input cells: pooled grid, each cell = list of (source position, vector) pieces
    if isinstance(br.pre, nn.MaxPool2d):
        pooled, idx = F.max_pool2d(v[None], br.pre.kernel_size, br.pre.stride, br.pre.padding, br.pre.dilation,
                                   return_indices=True)
        pooled, idx = pooled[0], idx[0]
        Hp, Wp = pooled.shape[1:]

        def pieces(pi, pj):
            out = []
            for src in sorted(set(idx[:, pi, pj].tolist())):
                mask = (idx[:, pi, pj] == src).double()
                out.append(((src // W, src % W), pooled[:, pi, pj] * mask))
            return out
    elif isinstance(br.pre, nn.AvgPool2d):
        k = _pair(br.pre.kernel_size)
        assert _pair(br.pre.stride) == k and _pair(br.pre.padding) == (0, 0) and H % k[0] == 0 and W % k[1] == 0
        Hp, Wp = H // k[0], W // k[1]

        def pieces(pi, pj):
            return [((pi * k[0] + a, pj * k[1] + b), v[:, pi * k[0] + a, pj * k[1] + b] / (k[0] * k[1]))
                    for a in range(k[0]) for b in range(k[1])]
    else:
        assert br.pre is None
        Hp, Wp = H, W

        def pieces(pi, pj):
            return [((pi, pj), v[:, pi, pj])]
    if br.conv is None:  # identity skip (after a max-pool: one path per selected source position), no bias
        return {(i, j): pieces(i, j) for i in range(Hp) for j in range(Wp)}, out_model
    weight, bias = _folded(br.conv, br.bn)
    kh, kw = weight.shape[2:]
    st, pad, dil = _pair(br.conv.stride), _pair(br.conv.padding), _pair(br.conv.dilation)
    oh = (Hp + 2 * pad[0] - dil[0] * (kh - 1) - 1) // st[0] + 1
    ow = (Wp + 2 * pad[1] - dil[1] * (kw - 1) - 1) // st[1] + 1
    contribs = {}
    for qi in range(oh):
        for qj in range(ow):
            paths = []
            for a in range(kh):
                for b in range(kw):
                    pi, pj = qi * st[0] - pad[0] + a * dil[0], qj * st[1] - pad[1] + b * dil[1]
                    if 0 <= pi < Hp and 0 <= pj < Wp:
                        paths += [(p, weight[:, :, a, b] @ u) for p, u in pieces(pi, pj)]
            norms = torch.stack([c.norm() for _, c in paths])
            total = norms.sum()
            share = norms / total if total > 0 else torch.full_like(norms, 1.0 / len(paths))
            contribs[qi, qj] = [(p, c + s * bias) for (p, c), s in zip(paths, share)]
    return contribs, out_model


def reference_saliency(model: nn.Module, recipe: Callable[[nn.Module], tuple[list[RefNode], nn.Linear]],
                       x: torch.Tensor, target: int, ierf: tuple[str, tuple[int, int]] | None = None
                       ) -> torch.Tensor:
    """SRD saliency (H, W) of one image (3, H, W) (contrast 'none'), or with ``ierf=(node, (row, col))`` the
    iERF of that node's position, float64, by explicit loops over positions and paths."""
    model = copy.deepcopy(model).double().eval()
    nodes, fc = recipe(model)
    with torch.no_grad():
        logits = model(x.double()[None])[0]
        post = {"input": x.double()}
        pre, records = {}, []
        for node in nodes:
            z, zm, per_branch = None, None, []
            for br in node.branches:
                contribs, out_model = _branch_paths(br, post[br.source])
                per_branch.append((br.source, contribs))
                zm = out_model if zm is None else zm + out_model
            z = torch.zeros_like(zm)
            for _, contribs in per_branch:
                for (qi, qj), paths in contribs.items():
                    z[:, qi, qj] += sum(c for _, c in paths)
            assert torch.allclose(z, zm, rtol=1e-10, atol=1e-10), node.name  # the decomposition is exact
            pre[node.name] = z
            post[node.name] = node.post(z[None])[0] if node.post is not None else z
            records.append((node.name, per_branch))
        v = post[nodes[-1].name]
        C, h, w = v.shape
        wy, by = fc.weight.detach().double()[target], fc.bias.detach().double()[target]
        r = (torch.einsum("c,chw->hw", wy, v) + by) / (h * w)
        assert torch.allclose(r.sum(), logits[target], rtol=1e-10, atol=1e-10)  # the recipe is the model
        if ierf is not None:
            name, (pi, pj) = ierf
            start = [n for n, _ in records].index(name)
            records = records[:start + 1]
            r = torch.zeros(pre[name].shape[1:], dtype=torch.float64)
            r[pi, pj] = 1.0
        rel = {records[-1][0]: r}
        for name, per_branch in reversed(records):
            r = rel.pop(name)
            z = pre[name]
            for source, contribs in per_branch:
                acc = rel.setdefault(source, torch.zeros(post[source].shape[1:], dtype=torch.float64))
                for (qi, qj), paths in contribs.items():
                    zq = z[:, qi, qj]
                    zz = zq @ zq
                    if zz == 0:
                        continue
                    for p, c in paths:
                        acc[p] += (c @ zq) / zz * r[qi, qj]
        return rel["input"]


# ----- recipes ----------------------------------------------------------------------------------------------------
def _seq_post(*mods):
    mods = [m for m in mods if m is not None and not isinstance(m, nn.Identity)]
    if not mods:
        return None

    def post(z):
        for m in mods:
            z = m(z.clone())
        return z
    return post


def timm_resnet_recipe(model: nn.Module) -> tuple[list[RefNode], nn.Linear]:
    nodes: list[RefNode] = []
    stem = list(model.conv1) if isinstance(model.conv1, nn.Sequential) else [model.conv1]
    src, i = "input", 0
    while i < len(stem):
        conv, bn, act = stem[i], stem[i + 1] if i + 1 < len(stem) else model.bn1, None
        act = stem[i + 2] if i + 2 < len(stem) else model.act1
        nodes.append(RefNode(f"stem{i}", [RefBranch(src, conv, bn)], _seq_post(act)))
        src, i = f"stem{i}", i + 3
    pool = model.maxpool if isinstance(model.maxpool, nn.MaxPool2d) else None
    for li in range(1, 5):
        for j, blk in enumerate(getattr(model, f"layer{li}")):
            name = f"layer{li}.{j}"
            bottleneck = hasattr(blk, "conv3")
            nodes.append(RefNode(f"{name}.1", [RefBranch(src, blk.conv1, blk.bn1, pool)], _seq_post(blk.act1)))
            last_src = f"{name}.1"
            if bottleneck:
                nodes.append(RefNode(f"{name}.2", [RefBranch(last_src, blk.conv2, blk.bn2)], _seq_post(blk.act2)))
                last_src, conv, bn, out_act = f"{name}.2", blk.conv3, blk.bn3, blk.act3
            else:
                conv, bn, out_act = blk.conv2, blk.bn2, blk.act2
            main = RefBranch(last_src, conv, bn)
            if blk.se is not None and not isinstance(blk.se, nn.Identity):
                nodes.append(RefNode(f"{name}.se", [main], _seq_post(blk.se)))
                main = RefBranch(f"{name}.se")
            ds = blk.downsample
            if ds is None:
                skip = RefBranch(src, pre=pool)
            else:
                parts = [m for m in ds if not isinstance(m, nn.Identity)]
                pre = parts[0] if isinstance(parts[0], nn.AvgPool2d) else pool
                skip = RefBranch(src, parts[-2], parts[-1], pre)
            nodes.append(RefNode(name, [main, skip], _seq_post(out_act)))
            src, pool = name, None
    return nodes, model.fc


def timm_efficientnet_recipe(model: nn.Module) -> tuple[list[RefNode], nn.Linear]:
    """timm EfficientNet (conv_head + bn2 before the pool; no MobileNetV3 head)."""
    nodes = [RefNode("stem", [RefBranch("input", model.conv_stem, model.bn1)], _seq_post(model.bn1.act))]
    src = "stem"
    layouts = {"DepthwiseSeparableConv": [("conv_dw", "bn1"), "se", ("conv_pw", "bn2")],
               "InvertedResidual": [("conv_pw", "bn1"), ("conv_dw", "bn2"), "se", ("conv_pwl", "bn3")]}
    for i, stage in enumerate(model.blocks):
        for j, blk in enumerate(stage):
            name, cur = f"blocks.{i}.{j}", src
            for part in layouts[type(blk).__name__]:
                if part == "se":
                    nodes[-1].post = _seq_post(getattr(blk, nodes[-1].extra["bn"]).act, blk.se)
                    continue
                c, b = part
                nodes.append(RefNode(f"{name}.{b}", [RefBranch(cur, getattr(blk, c), getattr(blk, b))],
                                     _seq_post(getattr(blk, b).act), {"bn": b}))
                cur = f"{name}.{b}"
            if blk.has_skip:  # linear projection (act Identity) + skip
                nodes[-1].branches.append(RefBranch(src))
            nodes[-1].name = src = name
    nodes.append(RefNode("head", [RefBranch(src, model.conv_head, model.bn2)], _seq_post(model.bn2.act)))
    return nodes, model.classifier


def torchvision_mbv2_recipe(model: nn.Module) -> tuple[list[RefNode], nn.Linear]:
    """torchvision MobileNetV2: Conv2dNormActivation nodes, linear bottleneck (Conv2d + BN) + skip."""
    from torchvision.ops.misc import Conv2dNormActivation

    nodes, src = [], "input"
    for i, m in enumerate(model.features):
        name = f"f{i}"
        if isinstance(m, Conv2dNormActivation):
            nodes.append(RefNode(name, [RefBranch(src, m[0], m[1])], _seq_post(m[2])))
            src = name
            continue
        cur = src
        parts = list(m.conv)
        for k, cna in enumerate(parts[:-2]):
            nodes.append(RefNode(f"{name}.{k}", [RefBranch(cur, cna[0], cna[1])], _seq_post(cna[2])))
            cur = f"{name}.{k}"
        branches = [RefBranch(cur, parts[-2], parts[-1])] + ([RefBranch(src)] if m.use_res_connect else [])
        nodes.append(RefNode(name, branches, None))
        src = name
    return nodes, model.classifier[-1]


def torchvision_regnet_recipe(model: nn.Module) -> tuple[list[RefNode], nn.Linear]:
    """torchvision RegNet: stem, ResBottleneckBlocks (a, b + SE gate, c; proj or identity), ReLU."""
    s = model.stem
    nodes, src = [RefNode("stem", [RefBranch("input", s[0], s[1])], _seq_post(s[2]))], "stem"
    for stage in model.trunk_output:
        for name, blk in stage.named_children():
            f = blk.f
            nodes.append(RefNode(f"{name}.a", [RefBranch(src, f.a[0], f.a[1])], _seq_post(f.a[2])))
            post_b = _seq_post(f.b[2], f.se) if f.se is not None else _seq_post(f.b[2])
            nodes.append(RefNode(f"{name}.b", [RefBranch(f"{name}.a", f.b[0], f.b[1])], post_b))
            skip = RefBranch(src, blk.proj[0], blk.proj[1]) if blk.proj is not None else RefBranch(src)
            nodes.append(RefNode(name, [RefBranch(f"{name}.b", f.c[0], f.c[1]), skip], _seq_post(blk.activation)))
            src = name
    return nodes, model.fc


# ----- shared test helpers ----------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int, size: int = 32) -> nn.Module:
    """Re-randomise what initialisation hides (timm zero-initialises the last BN of each block; BN statistics
    start at 0/1, biases at 0): conv/linear biases, BN affines, and BN statistics near the batch statistics
    of random inputs (so that reduced-depth nets keep images apart), perturbed."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for m in bns:
            m.train()
            m.momentum = 1.0
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
        model(torch.randn(8, 3, size, size, generator=g))
        for m in bns:
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.45 + 0.8)
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=g))
    return model.eval()


def relative_conservation_error(maps: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """|Σmap − logit| / (Σ|map| + |logit|) per image."""
    return (maps.sum((1, 2)) - logit).abs() / (maps.abs().sum((1, 2)) + logit.abs())


def check_family(model: nn.Module, x: torch.Tensor, layer: str) -> dict:
    """Float32 and float64: saliency sums to the logit (relative error ≤ 1e-5), the iERF of a middle layer's
    position sums to 1 (≤ 1e-5), batched maps = per-image maps. Returns the measured errors."""
    from sae_cafe.srd import srd_ierf, srd_saliency

    out = {}
    for dtype in (torch.float32, torch.float64):
        ref = copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            logits = ref(x.to(dtype))
        assert float((logits[0] - logits[1]).abs().max()) > 1e-3 * float(logits.abs().max())  # images told apart
        target = logits.argmax(1)
        maps = srd_saliency(model, x, target, contrast="none", dtype=dtype)
        assert maps.dtype == dtype and maps.shape == (x.shape[0], *x.shape[-2:])
        err = relative_conservation_error(maps, logits.gather(1, target[:, None])[:, 0])
        assert float(err.max()) <= 1e-5, (dtype, err)
        ierf = srd_ierf(model, x, layer, (1, 0), dtype=dtype)
        ierf_err = (ierf.sum((1, 2)) - 1).abs()
        assert float(ierf_err.max()) <= 1e-5, (dtype, ierf_err)
        one = torch.cat([srd_saliency(model, x[i:i + 1], target[i:i + 1], dtype=dtype) for i in range(len(x))])
        batched = srd_saliency(model, x, target, dtype=dtype)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(one, batched, atol=tol * float(batched.abs().max()), rtol=0)
        out[dtype] = (float(err.max()), float(ierf_err.max()))
    return out


def cafe_and_icat(model: nn.Module, layer_a: str, layer_b: str, out_dir) -> None:
    """A 2-latent CAFE build at ``layer_a`` (iERFs sum to 1) and one ICAT edge list ``layer_a`` → ``layer_b``
    on 32-px world images."""
    from tiny_models import random_sae

    from sae_cafe.cafe import build_cafe
    from sae_cafe.icat import attribute
    from sae_cafe.models import make_adapter
    from sae_cafe.world import generate

    ad = make_adapter(model, "tiny", input_size=(32, 32), resize=None)
    ch = {n: ad.layer(n).channels for n in (layer_a, layer_b)}
    world = generate(6, seed=3, size=32)
    sae_a, sae_b = random_sae(ch[layer_a], 2, 0, topk=1), random_sae(ch[layer_b], 3, 1)
    cafe = build_cafe(ad, sae_a, layer_a, list(world.images), out_dir=out_dir, k=2, n_anchor=2, progress=False)
    assert cafe.n_exemplars > 0
    maps = cafe.ierf(list(range(cafe.n_exemplars)))
    assert maps.shape[1:] == (32, 32) and torch.allclose(maps.sum((1, 2)), torch.ones(len(maps)), atol=2e-3)
    x = ad.preprocess(list(world.images)[:2])
    res = attribute(ad, {layer_a: sae_a, layer_b: sae_b}, x, layer_a, layer_b, steps=8, top_k_targets=2,
                    return_result=True)
    edges = res.scores_BSJ.abs().sum(0).nonzero()  # (source latent, target latent) pairs with a nonzero score
    assert len(edges) > 0 and torch.isfinite(res.scores_BSJ).all()
