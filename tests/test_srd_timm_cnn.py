"""SRD on timm CNNs: ResNet (BasicBlock, Bottleneck, ResNet-D deep stem + average-pool downsampling, ResNeXt
group convs, SE gates) and EfficientNet / MobileNetV3 (BatchNormAct2d, SE, Hardswish), on reduced-depth
instances; the new rules against the explicit float64 per-path reference (tests/srd_path_reference.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from srd_path_reference import (
    cafe_and_icat,
    check_family,
    randomize,
    reference_saliency,
    timm_efficientnet_recipe,
    timm_resnet_recipe,
)
from timm.models.efficientnet import EfficientNet  # timm is a dependency: a missing timm fails, never skips
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from sae_cafe.errors import UnsupportedModuleError
from sae_cafe.models import get_adapter, load_model, srd_timm
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RESNETS = {  # reduced-depth instances of the named timm configurations
    "resnet18": dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16)),
    "resnet50d": dict(block=Bottleneck, layers=(1, 1, 1, 1), channels=(4, 8, 8, 8), stem_type="deep",
                      stem_width=8, avg_down=True),
    "resnext50_32x4d": dict(block=Bottleneck, layers=(1, 1, 1, 1), channels=(4, 8, 8, 8), cardinality=2,
                            base_width=64),
    "seresnet18": dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8),
                       block_args=dict(attn_layer="se")),
    "seresnet50": dict(block=Bottleneck, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8),
                       block_args=dict(attn_layer="se")),
}


def tiny_resnet(kind: str, seed: int = 0, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(ResNet(num_classes=num_classes, **RESNETS[kind]), seed)


def tiny_efficientnet(seed: int = 0) -> nn.Module:
    """EfficientNet-B0 layout (DepthwiseSeparableConv + InvertedResidual with SE, SiLU), 3 short stages."""
    from timm.models._efficientnet_builder import decode_arch_def

    arch = [["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k3_s2_e4_c8_se0.25"], ["ir_r1_k5_s2_e4_c16_se0.25"]]
    torch.manual_seed(seed)
    model = EfficientNet(decode_arch_def(arch), num_classes=5, stem_size=8, num_features=32)
    return randomize(model, seed)


def tiny_mobilenetv3(seed: int = 0) -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [["ds_r1_k3_s1_e1_c8_nre"], ["ir_r1_k3_s2_e3_c8_nre", "ir_r1_k3_s1_e3_c8_nre"],
            ["ir_r1_k5_s2_e3_c16_se0.25_nre"], ["ir_r1_k3_s1_e4_c16_se0.25"], ["cn_r1_k1_s1_c32"]]
    torch.manual_seed(seed)
    model = MobileNetV3(decode_arch_def(arch), num_classes=5, stem_size=8, num_features=24,
                        act_layer=nn.Hardswish)
    return randomize(model, seed)


def images(n: int = 2, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_error(model: nn.Module, recipe, x: torch.Tensor, layer: str | None = None) -> float:
    """max |ours − explicit reference| over images (saliency, and the iERF of ``layer`` at (1, 0))."""
    with torch.no_grad():
        target = model(x).argmax(1)
    err = 0.0
    for n in range(x.shape[0]):
        ref = reference_saliency(model, recipe, x[n], int(target[n]))
        ours = srd_saliency(model, x[n:n + 1], target[n:n + 1], contrast="none", dtype=F64)[0]
        err = max(err, float((ours - ref).abs().max()) / max(1.0, float(ref.abs().max())))
        if layer is not None:
            ref = reference_saliency(model, recipe, x[n], 0, ierf=(layer, (1, 0)))
            ours = srd_ierf(model, x[n:n + 1], layer, (1, 0), dtype=F64)[0]
            err = max(err, float((ours - ref).abs().max()))
    return err


# ----- timm ResNet ----------------------------------------------------------------------------------------------
SIZE = {"resnet50d": 32, "resnext50_32x4d": 32}  # the reference's loops: small maps where the layout allows


@pytest.mark.parametrize("kind", list(RESNETS))
def test_timm_resnet_matches_explicit_reference(kind):
    """Avg-pool downsampling (resnet50d), deep stem, group convs and SE gates, float64, to 1e-10."""
    model = tiny_resnet(kind)
    x = images(1, size=SIZE.get(kind, 16))
    assert reference_error(model, timm_resnet_recipe, x, "layer2.0") < 1e-10


@pytest.mark.parametrize("kind", list(RESNETS))
def test_timm_resnet_conservation_ierf_batched(kind):
    model = tiny_resnet(kind, seed=1)
    check_family(model, images(3, seed=4), "layer2")


def _drop_avg_paths(pool, conv, bn, name, dtype):
    spec, bias = AVG_DOWN_SPEC(pool, conv, bn, name, dtype)
    w = spec.weight.clone()
    w[:, :, 1:, :] = 0  # a wrong rule: only the first cell of each pool window owns contributions
    w[:, :, 0, 1:] = 0
    spec.weight = w * 4
    spec._post_gram = None
    return spec, bias


AVG_DOWN_SPEC = srd_timm.avg_down_spec


def _ungated_se(name, block, source, pool, dtype):
    """A wrong SE rule: the gated projection's output computed exactly, but its contributions ungated."""
    stages = RESNET_BLOCK_STAGES(name, block, source, pool, dtype)
    se_stage = stages[-2]
    gate, (br,) = se_stage.act, se_stage.branches
    exact = br.exact
    br.exact = lambda u: gate(exact(u))
    stages[-1].branches[0] = br
    return stages[:-2] + stages[-1:]


RESNET_BLOCK_STAGES = srd_timm.resnet_block_stages


@pytest.mark.parametrize("kind,patch", [("resnet50d", ("avg_down_spec", _drop_avg_paths)),
                                        ("seresnet18", ("resnet_block_stages", _ungated_se))])
def test_reference_check_fails_on_a_broken_rule(kind, patch, monkeypatch):
    """(The SE check needs a 3×3 conv before the gate: after a 1×1 conv each target has one path.)"""
    model = tiny_resnet(kind)
    x = images(1, size=SIZE.get(kind, 16))
    assert reference_error(model, timm_resnet_recipe, x) < 1e-10
    broken = copy.deepcopy(model)
    monkeypatch.setattr(srd_timm, *patch)
    assert srd_saliency(broken, x, 0).shape == (1, *x.shape[-2:])  # the broken graph still reproduces model(x) …
    assert reference_error(broken, timm_resnet_recipe, x) > 1e-4  # … but the reference check fails


def test_avg_down_partial_windows_are_refused():
    model = tiny_resnet("resnet50d")
    with pytest.raises(UnsupportedModuleError, match=r"layer\d\.0\.downsample\.0: AvgPool2d\(ceil_mode=True\)"):
        srd_saliency(model, images(1, size=40), 0)


def test_timm_resnet_adapter_layers_apop_and_names():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("timm/resnet18")
    assert type(ad).__name__ == "TimmResNetAdapter" and ad.family == "timm_resnet"
    info = ad.layers()
    assert info["act1"].stride == 2 and info["act1"].grid == (112, 112) and info["act1"].rf_size == 7
    assert info["layer4"].grid == (7, 7) and info["layer4"].channels == 512 and info["layer4"].stride == 32
    assert info["layer2.1"].rf_size > info["layer2.0"].rf_size > info["layer1"].rf_size
    import sae_cafe.models as models

    assert {"timm/resnet50", "resnet50d", "timm/resnet50d", "resnext50_32x4d", "seresnet50",
            "timm/efficientnet_b0", "mobilenetv3_large_100", "timm/convnext_tiny"} <= set(models.list_adapters())
    model = tiny_resnet("seresnet50")
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-4, rtol=1e-4)
    pfv = get_adapter(model).to_pfv(get_adapter(model).capture(x, ["layer2.0"])["layer2.0"])
    assert pfv.pfv.shape == (2, 16, 32) and pfv.grid == (4, 4)
    xg = images(2, size=64).requires_grad_(True)  # differentiable maps (the SE gates stay in the autograd graph)
    maps = srd_saliency(model, xg, 3, differentiable=True)
    assert torch.allclose(maps.detach(), srd_saliency(model, xg.detach(), 3), atol=1e-5)
    (maps * torch.randn_like(maps)).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_unsupported_timm_resnet_parts_are_named():
    model = tiny_resnet("resnet18")
    model.layer2[0].aa = nn.AvgPool2d(1)
    with pytest.raises(UnsupportedModuleError, match=r"layer2\.0\.aa: module AvgPool2d"):
        srd_saliency(model, images(1), 0)


# ----- timm EfficientNet / MobileNetV3 ------------------------------------------------------------------------
def test_timm_efficientnet_matches_explicit_reference():
    """BatchNormAct2d (BN folded, its SiLU the node's activation), SE gates, linear projection + skip."""
    model = tiny_efficientnet()
    assert reference_error(model, timm_efficientnet_recipe, images(1), "blocks.1.0") < 1e-10


def _unfused_bn(conv, bn, target, source, dtype, conv_name, bn_name, pool=None):
    """A wrong fused-BN rule: the BN of a BatchNormAct2d not folded into the contributions."""
    stage = CONV_BN_STAGE(conv, bn, target, source, dtype, conv_name, bn_name, pool)
    stage.branches[0].conv.weight = conv.weight.detach().to(dtype)
    return stage


CONV_BN_STAGE = srd_timm.conv_bn_stage


def test_efficientnet_reference_check_fails_on_unfolded_bn(monkeypatch):
    model = tiny_efficientnet()
    monkeypatch.setattr(srd_timm, "conv_bn_stage", _unfused_bn)
    try:
        err = reference_error(model, timm_efficientnet_recipe, images(1))
    except UnsupportedModuleError:  # or the graph no longer reproduces model(x)
        err = float("inf")
    assert err > 1e-4


def test_timm_efficientnet_and_mobilenetv3_conservation():
    check_family(tiny_efficientnet(1), images(2, seed=5), "blocks.1")
    mnv3 = tiny_mobilenetv3(2)
    assert type(get_adapter(mnv3)).__name__ == "TimmMobileNetV3Adapter"
    check_family(mnv3, images(2, seed=6), "blocks.2.0")
    x = images(2, seed=7)
    with torch.no_grad():
        ref = mnv3(x)
    assert torch.allclose(apop_forward(mnv3, x, x), ref, atol=1e-4, rtol=1e-4)


def test_timm_efficientnet_adapter_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("timm/efficientnet_b0")
    names = ad._pfv_layer_names()
    assert names[0] == "bn1" and names[-1] == "bn2" and "blocks.3.2" in names and "blocks.6" in names
    info = ad.layers()
    assert info["bn1"].grid == (112, 112) and info["bn2"].grid == (7, 7) and info["bn2"].channels == 1280
    acts = ad.capture(torch.zeros(1, 3, 224, 224), ["blocks.2.1", "blocks.2"])
    assert torch.equal(acts["blocks.2.1"], acts["blocks.2"])


# ----- timm ConvNeXt (torchvision's rules through a parameter-sharing view) -----------------------------------
def tiny_timm_convnext(seed: int = 0) -> nn.Module:
    """Patch stem, stages of 2, 1, 1, 1 blocks (C = 8, 16, 16, 16), LayerNorm2d + 2×2/2 downsampling, LN head
    after pooling; LayerNorm affines, biases and layer scales (timm: 1e-6) re-randomised."""
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(seed)
    model = ConvNeXt(depths=(2, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=5).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.6 - 0.3)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
            if getattr(m, "gamma", None) is not None:
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) * 2 - 1)
    return model


def test_timm_convnext_matches_explicit_reference():
    from srd_slow_reference import reference_convnext_saliency

    from sae_cafe.models.srd_timm_convnext import torchvision_view

    model = tiny_timm_convnext()
    x = images(1)
    view, _ = torchvision_view(copy.deepcopy(model).double())
    with torch.no_grad():  # the view is the same network
        assert torch.allclose(view(x.double()), copy.deepcopy(model).double()(x.double()), rtol=1e-12, atol=1e-12)
        target = int(model(x).argmax(1))
    ref = reference_convnext_saliency(view, x[0].double(), target, contrasts=("none",))["none"][0]
    ours = srd_saliency(model, x, target, contrast="none", dtype=F64)[0]
    assert float((ours - ref).abs().max()) < 1e-10 * max(1.0, float(ref.abs().max()))


def test_timm_convnext_conservation_layers_and_names():
    model = tiny_timm_convnext(1)
    check_family(model, images(2, size=32, seed=8), "stages.0.blocks.1")
    ad = get_adapter(model)
    assert type(ad).__name__ == "TimmConvNeXtAdapter"
    assert ad._pfv_layer_names() == ["stem", "stages.0", "stages.0.blocks.0", "stages.0.blocks.1",
                                     "stages.1.downsample", "stages.1", "stages.1.blocks.0", "stages.2.downsample",
                                     "stages.2", "stages.2.blocks.0", "stages.3.downsample", "stages.3",
                                     "stages.3.blocks.0"]
    ad = get_adapter(tiny_timm_convnext(1))
    info = ad.layers()
    assert info["stem"].stride == 4 and info["stem"].rf_size == 4
    assert info["stages.1.downsample"].stride == 8 and info["stages.1.downsample"].rf_size == 4 + 6 * 4 * 2 + 4
    x = images(2, seed=9)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-4, rtol=1e-4)
    model.stages[0].blocks[0].mlp.norm = nn.LayerNorm(32)
    with pytest.raises(UnsupportedModuleError, match=r"stages\.0\.blocks\.0: ConvNeXtBlock layout"):
        srd_saliency(model, x, 0)


@pytest.mark.parametrize("make,layers", [(lambda: tiny_resnet("resnet50d"), ("layer2", "layer3")),
                                         (tiny_efficientnet, ("blocks.1", "blocks.2")),
                                         (tiny_timm_convnext, ("stages.1", "stages.2"))],
                         ids=["resnet50d", "efficientnet", "convnext"])
def test_cafe_build_and_icat_edges(make, layers, tmp_path):
    cafe_and_icat(make(), *layers, tmp_path / "cafe")
