"""SRD on torchvision ConvNeXt: LayerNorm2d/LayerNorm with frozen σ, depthwise 7×7 conv + Linear (a fixed post
matrix), layer scale, LayerNorm + 2×2 downsampling, LayerNorm head — against an explicit float64 reference and
the conservation identities."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from srd_slow_reference import reference_convnext_saliency
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from sae_cafe.errors import UnsupportedModuleError
from sae_cafe.models import get_adapter, load_model
from sae_cafe.models.mobile import ConvNeXtAdapter
from sae_cafe.srd import (
    apop_forward,
    rules_post,
    srd_diagnostics,
    srd_ierf,
    srd_ierf_from_relevance,
    srd_relevance,
    srd_saliency,
)
from sae_cafe.srd.api import get_graph
from sae_cafe.srd.engine import SRDRun
from sae_cafe.srd.graph import Branch, ConvSpec

F64 = torch.float64


def randomize(model: nn.Module, seed: int, fan_in_weights: bool) -> nn.Module:
    """Random LayerNorm affine parameters, biases and layer scales (torchvision initialises the biases to 0
    and the layer scale to 1e-6, which would leave most of the rules untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # LayerNorm2d too
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.6 - 0.3)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                if fan_in_weights:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
            if hasattr(m, "layer_scale"):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 2 - 1)
    return model.eval()


def tiny_convnext(seed: int = 0) -> nn.Module:
    """Stem 4×4/4, two CNBlocks (C = 8), LayerNorm2d + 2×2/2 downsampling, one CNBlock (C = 16), LN head."""
    torch.manual_seed(seed)
    return randomize(ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], num_classes=5), seed, True)


@pytest.fixture(scope="module")
def tiny64() -> nn.Module:
    return tiny_convnext().double()


@pytest.fixture(scope="module")
def convnext_tiny() -> ConvNeXtAdapter:
    torch.manual_seed(3)
    adapter = load_model("convnext_tiny", num_classes=10)
    randomize(adapter.model, 3, False)
    return adapter


def test_matches_explicit_float64_reference(tiny64):
    x = torch.randn(2, 3, 24, 24, dtype=F64, generator=torch.Generator().manual_seed(1))
    target = 3
    refs = [reference_convnext_saliency(tiny64, x[n], target) for n in range(2)]  # also checks Σc = z exactly
    for contrast in ("none", "mean"):
        ours = srd_saliency(tiny64, x, target, contrast=contrast, dtype=F64)
        hidden = srd_relevance(tiny64, x, target, ["features.0", "features.1.0", "features.2"], contrast=contrast,
                               dtype=F64)
        for n in range(2):
            ref, seen = refs[n][contrast]
            scale = float(ref.abs().max())
            assert torch.allclose(ours[n], ref, rtol=0, atol=1e-10 * scale), (contrast, n)
            for layer in hidden:
                assert torch.allclose(hidden[layer][n], seen[layer], rtol=0, atol=1e-10 * scale), (contrast, layer)
    assert torch.allclose(ours.sum((1, 2)), torch.zeros(2, dtype=F64), atol=1e-12)


def test_conservation_float64(tiny64):
    x = torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(2))
    adapter = get_adapter(tiny64)
    with torch.no_grad():
        ref = tiny64(x)
        logits = SRDRun(get_graph(adapter, x, F64), x).logits()
    assert torch.allclose(logits, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))  # graph forward == model(x)
    assert float((ref[0] - ref[1]).abs().max()) > 1e-3 * float(ref.abs().max())  # images are told apart
    target = ref.argmax(1)
    picked = ref.gather(1, target[:, None])[:, 0]
    maps = srd_saliency(tiny64, x, target, contrast="none", dtype=F64)
    assert torch.allclose(maps.sum((1, 2)), picked, rtol=1e-10, atol=1e-12)
    diag = srd_diagnostics(tiny64, x, target)
    assert max(diag["mu_sum_error"].values()) < 1e-12
    assert "features.1.0.block.4" in diag["mu_sum_error"] and "features.2" in diag["mu_sum_error"]
    assert max(diag["conservation_delta"].values()) < 1e-12 * float(ref.abs().max())
    layers = adapter._pfv_layer_names()
    assert layers == ["features.0", "features.1", "features.1.0", "features.1.1", "features.2", "features.3",
                      "features.3.0"]
    rel = srd_relevance(tiny64, x, target, layers, contrast="none", dtype=F64)
    for layer in layers:
        assert torch.allclose(rel[layer].sum((1, 2)), picked, rtol=1e-10, atol=1e-12), layer
        ierf = srd_ierf(tiny64, x, layer, (1, 0), dtype=F64)
        assert torch.allclose(ierf.sum((1, 2)), torch.ones(2, dtype=F64), atol=1e-12), layer


def test_apop_differentiable_and_untouched():
    model = tiny_convnext(1)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-5, rtol=1e-5)
    # frozen σ, GELU gates: the logits are affine in the second input
    x1, x2 = torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(5))
    mix = apop_forward(model, x, 0.3 * x1 + 0.7 * x2)
    assert torch.allclose(mix, 0.3 * apop_forward(model, x, x1) + 0.7 * apop_forward(model, x, x2), atol=1e-4)
    xg = x.clone().requires_grad_(True)
    maps = srd_saliency(model, xg, 2, differentiable=True)
    assert torch.allclose(maps.detach(), srd_saliency(model, x, 2), atol=1e-6)
    (maps * torch.randn_like(maps)).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_convnext_tiny_float32(convnext_tiny):
    model = convnext_tiny.model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(x)
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3 * float(logits.abs().max())
    target = torch.tensor([1, 7])
    picked = logits.gather(1, target[:, None])[:, 0]
    scale = float(logits.abs().max())
    maps = srd_saliency(model, x, target, contrast="none")
    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    assert float((maps.sum((1, 2)) - picked).abs().max()) <= 1e-5 * scale
    contrast = srd_saliency(model, x, target)
    assert float(contrast.sum((1, 2)).abs().max()) <= 1e-5 * scale
    one = srd_saliency(model, x[1:], 7)  # batched == per image
    assert torch.allclose(contrast[1], one[0], atol=1e-5 * float(one.abs().max()))
    # iERFs at a hidden block: one-hot seeds, many seeds at once == single calls
    h, w = convnext_tiny.capture(x, ["features.3.1"])["features.3.1"].shape[-2:]
    assert (h, w) == (8, 8)
    seeds = torch.zeros(2, 2, h, w)
    seeds[:, 0, 2, 3] = 1.0
    seeds[:, 1, h - 1, 0] = 1.0
    many = srd_ierf_from_relevance(model, x, "features.3.1", seeds)
    assert torch.allclose(many.sum((-2, -1)), torch.ones(2, 2), atol=1e-5)
    assert torch.allclose(many[:, 0], srd_ierf(model, x, "features.3.1", (2, 3)), atol=1e-7)


def test_adapter_layers(convnext_tiny):
    from sae_cafe.models.registry import make_adapter

    assert isinstance(make_adapter(tiny_convnext()), ConvNeXtAdapter)
    adapter = get_adapter(convnext_tiny.model)
    assert adapter is convnext_tiny and adapter.family == "convnext"
    info = adapter.layers()
    assert info["features.0"].grid == (56, 56) and info["features.0"].channels == 96
    assert info["features.1.2"].channels == 96 and info["features.5.8"].grid == (14, 14)
    assert info["features.7.2"].channels == 768 and info["features.7"].grid == (7, 7)


def test_unsupported_variants_are_named():
    model = tiny_convnext(2)
    model.features[1][1].block[4] = nn.Softplus()
    with pytest.raises(UnsupportedModuleError, match=r"features\.1\.1: CNBlock layout"):
        srd_saliency(model, torch.randn(1, 3, 32, 32), 0)
    model = tiny_convnext(2)
    model.features[2][1].padding = (1, 1)
    with pytest.raises(UnsupportedModuleError, match=r"features\.2\.1: a padded conv"):
        srd_saliency(model, torch.randn(1, 3, 32, 32), 0)


def _explicit_post_mu(post, weight, padding, dilation, v, bias_map):
    """μ (N, K, h, w) of ``z = post·dwconv(v) + bias_map`` from explicit contribution vectors
    c_k(q) = post·(w_k ⊙ v_{q+k}) (zero outside the map), independent of both forms in rules_post; also
    returns z and the targets with an in-bounds path, and checks Σ_k c_k + b = z against torch's own
    depthwise conv."""
    N, C, H, W = v.shape
    kh, kw = weight.shape[-2:]
    (ph, pw), (dh, dw) = padding, dilation
    z = F.conv2d(F.conv2d(v, weight, None, 1, padding, dilation, C), post[:, :, None, None]) + bias_map
    vp = F.pad(v, (pw, pw, ph, ph))
    h, w = z.shape[-2:]
    contribs, valid = [], []
    for a in range(kh):
        for b in range(kw):
            src = vp[:, :, a * dh:a * dh + h, b * dw:b * dw + w]
            contribs.append(torch.einsum("oc,nchw->nohw", post, weight[:, 0, a, b].view(1, C, 1, 1) * src))
            valid.append(F.pad(torch.ones(H, W, dtype=v.dtype), (pw, pw, ph, ph))[a * dh:a * dh + h, b * dw:b * dw + w])
    c = torch.stack(contribs, 1)  # (N, K, C', h, w)
    assert torch.allclose(c.sum(1) + bias_map, z, rtol=0, atol=1e-12 * float(z.abs().max()))
    norm = c.norm(dim=2)
    total = norm.sum(1, keepdim=True)
    valid = torch.stack(valid).unsqueeze(0)
    frac = torch.where(total > 0, norm / total.clamp_min(1e-300), valid / valid.sum(1, keepdim=True).clamp_min(1))
    zz = (z * z).sum(1, keepdim=True)
    num = (c * z.unsqueeze(1)).sum(2) + frac * (bias_map * z).sum(1, keepdim=True)
    return torch.where(zz > 0, num / zz.clamp_min(1e-300), torch.zeros_like(num)), z, valid.sum(1)[0] > 0


def _explicit_back(mu, r, kernel, padding, dilation, size):
    """Source relevance (N, S, H, W) = Σ_{q,k: p = q + k·d − pad} r_q·μ_k(q), one offset at a time."""
    (kh, kw), (ph, pw), (dh, dw) = kernel, padding, dilation
    N, S, h, w = r.shape
    acc = torch.zeros(N, S, size[0] + 2 * ph, size[1] + 2 * pw, dtype=r.dtype)
    for a in range(kh):
        for b in range(kw):
            acc[:, :, a * dh:a * dh + h, b * dw:b * dw + w] += r * mu[:, a * kw + b].unsqueeze(1)
    return acc[:, :, ph:ph + size[0], pw:pw + size[1]]


@pytest.mark.parametrize("C, kernel, padding, dilation, size", [
    (70, (7, 7), (3, 3), (1, 1), (9, 8)),  # ConvNeXt geometry, 3 blocks of R (32 + 32 + 6 rows)
    (40, (3, 3), (2, 2), (2, 2), (7, 7)),  # dilation
    (33, (3, 5), (1, 2), (1, 1), (6, 9)),  # rectangular kernel
    (36, (5, 5), (0, 0), (1, 1), (8, 8)),  # no padding
    (12, (3, 3), (3, 3), (1, 1), (5, 5)),  # padding beyond the kernel: border targets see only zeros
])
def test_post_rule_triangular_equals_sliced_and_explicit(C, kernel, padding, dilation, size):
    """Both forms of the depthwise + post-matrix rule against explicit contribution vectors, float64, with
    zero regions (all-zero contributions: equal bias split) and a zero target."""
    g = torch.Generator().manual_seed(C)
    N, cout = 2, 2 * C + 3
    v = torch.randn(N, C, *size, dtype=F64, generator=g)
    v[0, :, :3, :3] = 0
    post = torch.randn(cout, C, dtype=F64, generator=g)
    post = post - post.mean(1, keepdim=True)  # rank C − 1, as W1·P of a LayerNorm's centring
    weight = torch.randn(C, 1, *kernel, dtype=F64, generator=g)
    z_hw = [size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) for i in range(2)]
    bias_map = torch.randn(N, cout, *z_hw, dtype=F64, generator=g)
    bias_map[0, :, 0, 0] = 0
    branch = Branch("v", ConvSpec(weight, (1, 1), padding, dilation, C, "dw", post), bias=torch.zeros(cout, dtype=F64))
    ref, z, reached = _explicit_post_mu(post, weight, padding, dilation, v, bias_map)
    scale = float(ref.abs().max())
    sliced = rules_post.post_branch_mu(branch, v, z, bias_map, form="sliced")
    assert torch.isfinite(ref).all() and scale > 0
    assert float((sliced - ref).abs().max()) <= 1e-12 * scale
    r = torch.randn(N, 3, *z_hw, dtype=F64, generator=g)
    back_ref = _explicit_back(ref, r, kernel, padding, dilation, size)
    for order in ("pairs", "rows", "bands"):  # the norms' three loop orders
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rules_post, "FORCE_NORM_ORDER", order)
            tri = rules_post.post_branch_mu(branch, v, z, bias_map, form="triangular")
            back = rules_post.post_branch_back(branch, v, z, r, bias_map)
        assert float((tri - ref).abs().max()) <= 1e-12 * scale, order
        # the direct route (no per-path dots): Σ_{q,k: p = q+k} r_q·μ_k(q), per relevance map
        assert float((back - back_ref).abs().max()) <= 1e-12 * float(back_ref.abs().max())
    active = ((z * z).sum(1) > 0) & reached  # targets with no in-bounds source keep their bias unexplained
    assert torch.allclose(tri.sum(1)[active], torch.ones((), dtype=F64), atol=1e-12)
    # the comparison can fail: offsets read in the wrong orientation give other ratios
    flipped = Branch("v", ConvSpec(weight.flip(-1, -2), (1, 1), padding, dilation, C, "dw", post),
                     bias=branch.bias)
    broken = rules_post.post_branch_mu(flipped, v, z, bias_map, form="triangular")
    assert float((broken - ref).abs().max()) > 1e-3 * scale
    broken_back = rules_post.post_branch_back(flipped, v, z, r, bias_map)
    assert float((broken_back - back_ref).abs().max()) > 1e-3 * float(back_ref.abs().max())


@pytest.mark.parametrize("C, kernel, padding, dilation, size", [
    (70, (7, 7), (3, 3), (1, 1), (9, 8)),  # ConvNeXt geometry, 3 blocks of R
    (33, (3, 5), (1, 2), (2, 1), (6, 9)),  # rectangular, dilated
])
def test_post_rule_scale_and_parts_give_the_same_ratios(C, kernel, padding, dilation, size):
    """A node with a frozen per-target scale, z = s·post·dwconv(v) + b (a CNBlock's first node), gets the ratios
    of the divided node z/s (scale-free bias shares), with or without its parts (postᵀz computed from the
    depthwise output d: z = s·post·d + c), float64, 1e-12; wrong parts change them."""
    g = torch.Generator().manual_seed(C + 1)
    N, cout = 2, 3 * C
    v = torch.randn(N, C, *size, dtype=F64, generator=g)
    post = torch.randn(cout, C, dtype=F64, generator=g)
    post = post - post.mean(1, keepdim=True)
    weight = torch.randn(C, 1, *kernel, dtype=F64, generator=g)
    z_hw = [size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) for i in range(2)]
    b_dw, c = torch.randn(C, dtype=F64, generator=g), torch.randn(cout, dtype=F64, generator=g)
    s = torch.rand(N, 1, *z_hw, dtype=F64, generator=g) + 0.5
    bias_div = (post @ b_dw).view(1, -1, 1, 1) + c.view(1, -1, 1, 1) / s  # the bias of z/s
    branch = Branch("v", ConvSpec(weight, (1, 1), padding, dilation, C, "dw", post), bias=torch.zeros(cout, dtype=F64))
    ref, z_div, _ = _explicit_post_mu(post, weight, padding, dilation, v, bias_div)
    scale = float(ref.abs().max())
    d = F.conv2d(v, weight, b_dw, 1, padding, dilation, C).permute(0, 2, 3, 1)
    z, bias = s * z_div, s * bias_div
    assert torch.allclose(z, s * torch.einsum("oc,nhwc->nohw", post, d) + c.view(1, -1, 1, 1), atol=1e-12)
    for form, parts in (("triangular", (d, c)), ("triangular", None), ("sliced", None)):
        ours = rules_post.post_branch_mu(branch, v, z, bias, form=form, parts=parts, scale=s)
        assert scale > 0 and float((ours - ref).abs().max()) <= 1e-12 * scale, (form, parts is None)
    broken = rules_post.post_branch_mu(branch, v, z, bias, form="triangular", parts=(d, 2 * c), scale=s)
    assert float((broken - ref).abs().max()) > 1e-3 * scale
    r = torch.randn(N, 2, *z_hw, dtype=F64, generator=g)
    back_ref = _explicit_back(ref, r, kernel, padding, dilation, size)
    for parts in ((d, c), None):
        back = rules_post.post_branch_back(branch, v, z, r, bias, parts, s)
        assert float((back - back_ref).abs().max()) <= 1e-12 * float(back_ref.abs().max()), parts is None
    broken = rules_post.post_branch_back(branch, v, z, r, bias, (d, 2 * c), s)
    assert float((broken - back_ref).abs().max()) > 1e-3 * float(back_ref.abs().max())


def test_triangular_rule_matches_sliced_end_to_end():
    """Wider CNBlocks (C = 40, 72: several blocks of R) in float64: saliency and hidden relevance by the direct
    route (triangular norms) and iERFs by μ in the triangular form equal those of μ in the sliced form (the
    rule used before) to 1e-12."""
    torch.manual_seed(7)
    model = randomize(ConvNeXt([CNBlockConfig(40, 72, 1), CNBlockConfig(72, None, 1)], num_classes=4), 7,
                      True).double()
    x = torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(8))
    layers = ["features.0", "features.1.0", "features.2", "features.3.0"]

    def run():
        sal = srd_saliency(model, x, 1, contrast="none", dtype=F64)
        rel = srd_relevance(model, x, 1, layers, contrast="none", dtype=F64)
        ierf = srd_ierf(model, x, "features.3.0", (2, 3), dtype=F64)
        return [sal, ierf, *rel.values()]

    ours = run()  # saliency by the direct route (post_branch_back), iERFs by μ
    orig, direct = rules_post.post_branch_mu, rules_post.DIRECT_MAX_MAPS
    rules_post.post_branch_mu, rules_post.DIRECT_MAX_MAPS = functools.partial(orig, form="sliced"), 0
    try:
        before = run()  # every map by μ in the sliced form
    finally:
        rules_post.post_branch_mu, rules_post.DIRECT_MAX_MAPS = orig, direct
    for a, b in zip(ours, before):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    assert float(ours[0].abs().max()) > 0 and float(ours[1].sum()) == pytest.approx(2.0, abs=1e-12)


def test_norms_run_concurrently_equal_serial_and_restore_threads():
    """Norms of several depthwise + post branches computed concurrently (rules_post.run_concurrently, one
    intra-op thread each) equal the serial ones bitwise, come back in job order, and torch's intra-op thread
    count is restored."""
    g = torch.Generator().manual_seed(11)
    jobs = []
    for C, size in ((24, (9, 9)), (40, (5, 6)), (16, (12, 7))):
        post = torch.randn(3 * C, C, generator=g)
        weight = torch.randn(C, 1, 7, 7, generator=g)
        conv = ConvSpec(weight, (1, 1), (3, 3), (1, 1), C, "dw", post)
        jobs.append((conv, torch.randn(2, C, *size, generator=g), size))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for conv, _, _ in jobs:
            rules_post.factors_ready(conv)
        together = rules_post.run_concurrently([lambda job=job: rules_post._triangular_norms(*job) for job in jobs],
                                               [float(v.numel() * v.shape[1]) for _, v, _ in jobs])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    serial = [rules_post._triangular_norms(*job) for job in jobs]
    assert [t.shape for t in together] == [(2, 49, *job[2]) for job in jobs]
    assert all(torch.equal(a, b) for a, b in zip(together, serial))
