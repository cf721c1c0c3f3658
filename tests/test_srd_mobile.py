"""SRD on non-ReLU CNNs: torchvision EfficientNet (MBConv/FusedMBConv, SiLU, squeeze-excitation) and
MobileNetV3 (Hardswish/ReLU, Hardsigmoid SE). ConvNeXt: tests/test_srd_convnext.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

from sae_cafe.errors import UnsupportedModuleError
from sae_cafe.models import get_adapter
from sae_cafe.models.mobile import EfficientNetAdapter, MobileNetV3Adapter
from sae_cafe.srd import apop_forward, srd_diagnostics, srd_ierf, srd_ierf_from_relevance, srd_saliency
from sae_cafe.srd.api import get_graph
from sae_cafe.srd.engine import SRDRun

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared, oversubscribed dev box 2-thread OpenMP depthwise convs are 10-30×
    slower than one thread (measured); on a quiet machine one thread costs at most 2×."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calibrate_bn(model: nn.Module, size: int = 64, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics near the true batch statistics of random inputs
    (randomised like ``randomize_bn`` in test_srd_cnn.py). With statistics unrelated to the data, 16 random
    MBConv blocks wash the input out and every image gets the same logits, which would test nothing."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for m in bns:
        m.train()
        m.momentum = 1.0
        with torch.no_grad():
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=g))
        for m in bns:
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.45 + 0.8)
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def effnet() -> nn.Module:
    torch.manual_seed(0)
    return calibrate_bn(torchvision.models.efficientnet_b0(num_classes=10))


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(1)
    return calibrate_bn(torchvision.models.mobilenet_v3_small(num_classes=10))


def tiny_fused_effnet() -> nn.Module:
    """EfficientNetV2-style: FusedMBConv with expand 1 (residual after the activation) and 4, then MBConv."""
    setting = [FusedMBConvConfig(1, 3, 1, 16, 16, 2), FusedMBConvConfig(4, 3, 2, 16, 24, 2),
               MBConvConfig(4, 3, 2, 24, 32, 2)]
    torch.manual_seed(2)
    return calibrate_bn(EfficientNet(setting, dropout=0.2, num_classes=6, last_channel=64), size=32)


def graph_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 logits of the verified SRD graph (the model's ops with parameters in float64)."""
    with torch.no_grad():
        return SRDRun(get_graph(get_adapter(model), x, F64), x.to(F64)).logits()


def check_conservation(model: nn.Module, x: torch.Tensor, layers: list[str]) -> None:
    logits = graph_logits(model, x)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    assert torch.allclose(logits, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    assert float((ref[0] - ref[1]).abs().max()) > 1e-3 * float(ref.abs().max())  # images are told apart
    target = logits.argmax(1)
    maps = srd_saliency(model, x, target, contrast="none", dtype=F64)
    assert maps.shape == (x.shape[0], *x.shape[-2:]) and maps.dtype == F64
    picked = logits.gather(1, target[:, None])[:, 0]
    assert torch.allclose(maps.sum((1, 2)), picked.detach(), rtol=1e-9, atol=1e-9 * float(logits.abs().max()))
    contrast = srd_saliency(model, x, target, contrast="mean", dtype=F64)
    assert contrast.sum((1, 2)).abs().max() < 1e-9 * float(logits.abs().max())
    diag = srd_diagnostics(model, x, target)
    assert max(diag["mu_sum_error"].values()) < 1e-9
    assert max(diag["conservation_delta"].values()) < 1e-9 * float(logits.abs().max())
    for layer in layers:
        m = srd_ierf(model, x, layer, (1, 0), dtype=F64)
        assert torch.allclose(m.sum((1, 2)), torch.ones(x.shape[0], dtype=F64), atol=1e-9), layer


def test_efficientnet_b0_conservation_float64(effnet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    check_conservation(effnet, x, ["features.0", "features.3.1", "features.6", "features.8"])


def test_efficientnet_b0_apop_and_adapter(effnet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = effnet(x)
    assert torch.allclose(apop_forward(effnet, x, x), ref, atol=1e-4, rtol=1e-4)
    zero = apop_forward(effnet, x, 0)
    assert zero.shape == (2, 10) and torch.isfinite(zero).all() and not torch.allclose(zero, ref, atol=1e-2)
    adapter = get_adapter(effnet)
    assert isinstance(adapter, EfficientNetAdapter) and adapter.family == "efficientnet"
    names = adapter._pfv_layer_names()
    assert names[0] == "features.0" and names[-1] == "features.8"
    assert {"features.1.0", "features.2.1", "features.6.3", "features.7.0", "features.4"} <= set(names)
    acts = adapter.capture(x, ["features.2.1", "features.2", "features.8"])
    assert torch.equal(acts["features.2.1"], acts["features.2"]) and acts["features.8"].shape[1] == 1280


def test_efficientnet_b0_out_of_the_box_constructor():
    model = torchvision.models.efficientnet_b0()
    adapter = get_adapter(model)
    assert isinstance(adapter, EfficientNetAdapter)
    info = adapter.layers()
    assert info["features.8"].grid == (7, 7) and info["features.8"].channels == 1280
    assert info["features.0"].stride == 2 and info["features.3.1"].channels == 40


def test_fused_mbconv_efficientnet_v2_style():
    model = tiny_fused_effnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    check_conservation(model, x, ["features.1.1", "features.2.0", "features.4"])
    assert torch.allclose(apop_forward(model, x, x), model(x).detach(), atol=1e-4, rtol=1e-4)


def test_mobilenet_v3_small(mobilenet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    adapter = get_adapter(mobilenet)
    assert isinstance(adapter, MobileNetV3Adapter)
    names = adapter._pfv_layer_names()
    assert names == [f"features.{i}" for i in range(13)]
    check_conservation(mobilenet, x, ["features.1", "features.4", "features.12"])
    with torch.no_grad():
        ref = mobilenet(x)
    assert torch.allclose(apop_forward(mobilenet, x, x), ref, atol=1e-4, rtol=1e-4)
    # many seeds at once equal single iERFs (float32 path)
    h, w = adapter.capture(x, ["features.4"])["features.4"].shape[-2:]
    seeds = torch.zeros(2, 2, h, w)
    seeds[:, 0, 0, 1] = 1.0
    seeds[:, 1, h - 1, w - 1] = 1.0
    many = srd_ierf_from_relevance(mobilenet, x, "features.4", seeds)
    assert torch.allclose(many[:, 1], srd_ierf(mobilenet, x, "features.4", (h - 1, w - 1)), atol=1e-6)
    assert torch.allclose(many.sum((-2, -1)), torch.ones(2, 2), atol=1e-4)
    # differentiable maps (the SE gates and Hardswish stay in the autograd graph)
    xg = x.clone().requires_grad_(True)
    maps = srd_saliency(mobilenet, xg, 3, differentiable=True)
    assert torch.allclose(maps.detach(), srd_saliency(mobilenet, x, 3), atol=1e-5)
    (maps * torch.randn_like(maps)).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_srd_leaves_model_untouched(mobilenet):
    state = {k: v.clone() for k, v in mobilenet.state_dict().items()}
    inplace = [m.inplace for m in mobilenet.modules() if hasattr(m, "inplace")]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        srd_saliency(mobilenet, x, 2)
    for k, v in mobilenet.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.inplace for m in mobilenet.modules() if hasattr(m, "inplace")] == inplace


def test_unsupported_module_inside_block_is_named():
    model = tiny_fused_effnet()
    model.features[3][0].block[0][2] = nn.Softplus()  # not an element-wise activation SRD knows
    with pytest.raises(UnsupportedModuleError, match=r"features\.3\.0\.block\.0\.2: module Softplus"):
        srd_saliency(model, torch.randn(1, 3, 32, 32), 0)


@pytest.mark.parametrize("C, kernel, stride, padding, dilation, size", [
    (24, (3, 3), (1, 1), (1, 1), (1, 1), (9, 8)),  # MobileNet depthwise
    (16, (5, 5), (2, 2), (2, 2), (1, 1), (11, 10)),  # strided (EfficientNet 5×5 / stride 2)
    (8, (3, 5), (2, 1), (0, 3), (2, 1), (12, 9)),  # rectangular, dilated, no row padding
    (6, (2, 2), (2, 2), (0, 0), (1, 1), (8, 8)),  # an average pool as a depthwise conv
])
def test_depthwise_rule_equals_unfolded_form(C, kernel, stride, padding, dilation, size):
    """The depthwise rule (strided views + one-hot w_k² convolution) against the generic unfolded form it
    replaces outside autograd, float64, 1e-12, with a per-target bias map, zero regions and a zero target;
    flipped kernels give other ratios."""
    from sae_cafe.srd.graph import Branch, ConvSpec
    from sae_cafe.srd.rules import branch_mu

    g = torch.Generator().manual_seed(C)
    v = torch.randn(2, C, *size, dtype=F64, generator=g)
    v[0, :, :4, :4] = 0
    weight = torch.randn(C, 1, *kernel, dtype=F64, generator=g)
    spec = ConvSpec(weight, stride, padding, dilation, C, "dw")
    branch = Branch("v", spec, bias=torch.randn(C, dtype=F64, generator=g))
    out = spec(v) + branch.bias.view(1, -1, 1, 1)
    z = out.clone()
    z[1, :, 0, 0] = 0
    bias_map = torch.randn_like(z)
    bias_map[0, :, :2, :2] = 0
    for bm in (None, bias_map):
        fast = branch_mu(branch, v, z, out, None, None, bias_map=bm)
        with torch.enable_grad():  # under autograd the generic unfolded form runs
            slow = branch_mu(branch, v.clone().requires_grad_(True), z, out, None, None, bias_map=bm).detach()
        scale = float(slow.abs().max())
        assert scale > 0 and float((fast - slow).abs().max()) <= 1e-12 * scale
    flipped = Branch("v", ConvSpec(weight.flip(-1, -2), stride, padding, dilation, C, "dw"), bias=branch.bias)
    broken = branch_mu(flipped, v, z, out, None, None, bias_map=bias_map)
    assert float((broken - slow).abs().max()) > 1e-3 * scale
