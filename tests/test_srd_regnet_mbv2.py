"""SRD on torchvision MobileNetV2 (ReLU6, linear bottlenecks) and RegNet (group convs, SE gates), reduced-depth
instances; the rules against the explicit float64 per-path reference (tests/srd_path_reference.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from srd_path_reference import (
    cafe_and_icat,
    check_family,
    randomize,
    reference_saliency,
    torchvision_mbv2_recipe,
    torchvision_regnet_recipe,
)
from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.regnet import BlockParams, RegNet

from sae_cafe.models import get_adapter, load_model, srd_mobile
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_mbv2(seed: int = 0) -> nn.Module:
    """MobileNetV2 layout: expand-1 block, a residual pair (ReLU6, linear bottleneck + skip), a strided block."""
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes=5, width_mult=1.0, round_nearest=4,
                        inverted_residual_setting=[[1, 8, 1, 1], [4, 8, 2, 2], [4, 12, 1, 2]])
    model.features[-1][0] = nn.Conv2d(12, 24, 1, bias=False)  # a smaller last conv (1280 by default)
    model.features[-1][1] = nn.BatchNorm2d(24)
    model.classifier[-1] = nn.Linear(24, 5)
    model = randomize(model, seed)
    with torch.no_grad():  # scale up so that ReLU6 clips (values above 6 exist)
        model.features[0][0].weight.mul_(6.0)
    return model


def tiny_regnet(seed: int = 0, se: float | None = 0.25) -> nn.Module:
    torch.manual_seed(seed)
    params = BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=se)
    return randomize(RegNet(params, num_classes=5, stem_width=8), seed)


def images(n: int = 2, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_error(model, recipe, x, layer=None, node=None) -> float:
    with torch.no_grad():
        target = model(x).argmax(1)
    err = 0.0
    for n in range(x.shape[0]):
        ref = reference_saliency(model, recipe, x[n], int(target[n]))
        ours = srd_saliency(model, x[n:n + 1], target[n:n + 1], contrast="none", dtype=F64)[0]
        err = max(err, float((ours - ref).abs().max()) / max(1.0, float(ref.abs().max())))
        if layer is not None:
            ref = reference_saliency(model, recipe, x[n], 0, ierf=(node, (1, 0)))
            ours = srd_ierf(model, x[n:n + 1], layer, (1, 0), dtype=F64)[0]
            err = max(err, float((ours - ref).abs().max()))
    return err


# ----- MobileNetV2 ------------------------------------------------------------------------------------------------
def test_mbv2_matches_explicit_reference():
    model = tiny_mbv2()
    x = images(1, size=16)
    with torch.no_grad():
        assert float(model.features[0](x).max()) == 6.0  # ReLU6 clips on this input
    assert reference_error(model, torchvision_mbv2_recipe, x, "features.3", "f3") < 1e-10


BLOCK_STAGES = srd_mobile._block_stages


def _bias_to_skip(name, block, source, dtype):
    """A wrong bottleneck rule: half the projection's bias moved onto the identity skip (z unchanged)."""
    stages = BLOCK_STAGES(name, block, source, dtype)
    last = stages[-1]
    if len(last.branches) == 2 and last.branches[1].conv is None:
        proj, skip = last.branches
        half, exact = proj.bias / 2, proj.exact
        proj.bias, skip.bias = half, half
        proj.exact = lambda u: exact(u) - half.view(1, -1, 1, 1)
    return stages


def test_mbv2_reference_check_fails_on_a_broken_bottleneck_rule(monkeypatch):
    model = tiny_mbv2()
    x = images(1, size=16)
    monkeypatch.setattr(srd_mobile, "_block_stages", _bias_to_skip)
    assert reference_error(model, torchvision_mbv2_recipe, x) > 1e-4


def test_mbv2_conservation_adapter_apop(tmp_path):
    model = tiny_mbv2(1)
    check_family(model, images(3, seed=4), "features.3")
    ad = get_adapter(model)
    assert type(ad).__name__ == "MobileNetV2Adapter" and ad._pfv_layer_names()[-1] == "features.5"
    x = images(2, seed=5)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-4, rtol=1e-4)
    cafe_and_icat(model, "features.3", "features.5", tmp_path / "cafe")


def test_mbv2_full_size_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("mobilenet_v2")
    info = ad.layers()
    assert info["features.0"].stride == 2 and info["features.0"].rf_size == 3
    assert info["features.18"].grid == (7, 7) and info["features.18"].channels == 1280
    assert info["features.7"].stride == 16 and info["features.7"].rf_size > info["features.4"].rf_size


# ----- RegNet -----------------------------------------------------------------------------------------------------
def test_regnet_matches_explicit_reference():
    """Group convs, SE gates frozen in the activation, strided 1×1 projection and identity shortcuts."""
    model = tiny_regnet()
    assert any(b.proj is None for s in model.trunk_output for b in s)  # an identity shortcut is covered
    x = images(1)
    layer = "trunk_output.block1.block1-0"
    assert reference_error(model, torchvision_regnet_recipe, x, layer, "block1-0") < 1e-10


def test_regnet_conservation_adapter_apop(tmp_path):
    model = tiny_regnet(1)
    check_family(model, images(3, seed=6), "trunk_output.block2")
    ad = get_adapter(model)
    assert type(ad).__name__ == "RegNetAdapter"
    x = images(2, seed=7)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(apop_forward(model, x, x), ref, atol=1e-4, rtol=1e-4)
    cafe_and_icat(model, "trunk_output.block2", "trunk_output.block3", tmp_path / "cafe")
    check_family(tiny_regnet(2, se=None), images(2, seed=8), "trunk_output.block1")  # RegNetX: no SE


def test_regnet_full_size_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("regnet_y_400mf")
    info = ad.layers()
    assert info["stem"].stride == 2 and info["stem"].rf_size == 3
    last = ad._pfv_layer_names()[-1]
    assert info[last].grid == (7, 7) and info[last].channels == 440 and info[last].stride == 32
    b1 = info["trunk_output.block1.block1-0"]
    assert b1.stride == 4 and b1.rf_size == 3 + 2 * 2  # stem 3×3/2, then the block's 3×3/2 (proj not counted)
