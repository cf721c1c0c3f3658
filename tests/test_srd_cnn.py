"""SRD for CNNs: reference maps, conservation, an explicit slow reference, API contracts and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from srd_slow_reference import reference_saliency
from torch import nn

from sae_cafe.errors import NonFiniteError, SaeCafeError, UnknownLayerError, UnsupportedModuleError
from sae_cafe.models import get_adapter
from sae_cafe.srd import (
    apop_forward,
    srd_diagnostics,
    srd_ierf,
    srd_ierf_from_relevance,
    srd_relevance,
    srd_saliency,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "srd_reference"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def plain_net(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Every CNN rule: strided/padded/dilated/grouped convs, overlapping max-pool, avg-pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), act(),
        nn.MaxPool2d(3, stride=2, padding=1),              # overlapping windows
        nn.Conv2d(6, 8, 3, stride=1, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8), act(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 2, stride=2), act(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 5),
    ).eval()


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def tiny_resnet() -> nn.Module:
    return randomize_bn(torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                  num_classes=7))


def tiny_vgg() -> nn.Module:
    feats = torchvision.models.vgg.make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=True)
    model = torchvision.models.VGG(feats, num_classes=4, init_weights=False)
    model.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 12), nn.ReLU(True), nn.Dropout(), nn.Linear(12, 4))
    return randomize_bn(model)


def model_unchanged(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]

    def check():
        assert [n for n, _ in model.named_modules()] == names
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        for m in model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    return check


# ----- reference implementation conformance -----------------------------------------------------------------
def rebuild_reference_weights(model: nn.Module, seed: int) -> nn.Module:
    """The weight recipe of shared/srd_reference/README.md."""
    rng = np.random.default_rng(seed)
    mods = dict(model.named_modules())
    new = {}
    for key, v in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        is_bn = hasattr(mods[mod], "running_var")
        shape = tuple(v.shape)
        if leaf == "num_batches_tracked":
            new[key] = torch.zeros_like(v)
            continue
        if is_bn and leaf in ("running_var", "weight"):
            a = rng.uniform(0.5, 1.5, shape)
        elif is_bn and leaf in ("running_mean", "bias"):
            a = rng.uniform(-0.1, 0.1, shape)
        elif leaf == "weight":
            a = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        else:
            a = rng.uniform(-0.1, 0.1, shape)
        new[key] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    model.load_state_dict(new)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_reproduces_reference_maps(name):
    path = REFERENCE / f"{name}_seed0_chelsea.safetensors"
    if not path.exists():
        pytest.skip(f"reference maps not found at {path} (../shared is absent)")
    from safetensors import safe_open

    f = safe_open(str(path), "pt")
    meta = f.metadata()
    model = rebuild_reference_weights(getattr(torchvision.models, name)(), int(meta["seed"]))
    x, cls = f.get_tensor("input"), int(meta["cls"])
    with torch.no_grad():
        assert torch.allclose(model(x), f.get_tensor("logits"), atol=2e-2, rtol=1e-4)
    keys = list(f.keys())
    rel_layers = [k.split(":")[1] for k in keys if k.startswith("relevance_contrast:")]
    hidden = srd_relevance(model, x, cls, rel_layers) if rel_layers else {}
    checked = 0
    for key in keys:
        ref = f.get_tensor(key)
        if key == "saliency_identity":
            ours = srd_saliency(model, x, cls, contrast="none")[0]
        elif key == "saliency_contrast":
            ours = srd_saliency(model, x, cls, contrast="mean")[0]
        elif key.startswith("relevance_contrast:"):
            ours = hidden[key.split(":")[1]][0]
        elif key.startswith("erf:"):
            _, layer, h, w = key.split(":")
            ours = srd_ierf(model, x, layer, (int(h), int(w)))[0]
            assert abs(float(ours.sum()) - 1) < 1e-4
        else:
            continue
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert rel_l2(ours, ref) <= 1e-4, (key, rel_l2(ours, ref))
        checked += 1
    assert checked >= 2


# ----- conservation and the explicit reference --------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU])
def test_matches_slow_explicit_reference(act):
    model = randomize_bn(plain_net(act)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ours = srd_saliency(model, x, 3, contrast="none", dtype=torch.float64)
    ours_c = srd_saliency(model, x, 3, contrast="mean", dtype=torch.float64)
    for n in range(2):
        ref = reference_saliency(model, x[n], 3)
        assert torch.allclose(ours[n], ref, atol=1e-10, rtol=1e-8)
        assert torch.allclose(ours_c[n], reference_saliency(model, x[n], 3, "mean"), atol=1e-10, rtol=1e-8)
        logit = model(x[n:n + 1])[0, 3]
        assert torch.allclose(ours[n].sum(), logit, rtol=1e-9)


def test_dense_stride1_conv_after_pool_matches_reference():
    """3×3 stride-1 dense convs (the shifted 1×1 formulation), after a 2×2 pool and on their own."""
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3))).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = srd_saliency(model, x, 1, contrast="none", dtype=torch.float64)
    for n in range(2):
        assert torch.allclose(ours[n], reference_saliency(model, x[n], 1), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vgg, plain_net])
def test_conservation_and_sharing_ratios_float64(make):
    model = make().double()
    size = 16 if make is plain_net else 32
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    logits = model(x)
    target = logits.argmax(1)
    maps = srd_saliency(model, x, target, contrast="none", dtype=torch.float64)
    assert torch.allclose(maps.sum((1, 2)), logits.gather(1, target[:, None])[:, 0], rtol=1e-9, atol=1e-9)
    assert srd_saliency(model, x, target, dtype=torch.float64).sum((1, 2)).abs().max() < 1e-9
    diag = srd_diagnostics(model, x, target)
    assert max(diag["mu_sum_error"].values()) < 1e-9
    scale = float(logits.detach().abs().max())
    assert max(diag["conservation_delta"].values()) < 1e-9 * scale
    adapter = get_adapter(model)
    for layer in adapter._pfv_layer_names()[::2]:
        m = srd_ierf(model, x, layer, (0, 0), dtype=torch.float64)
        assert torch.allclose(m.sum((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-9), layer


def test_conservation_with_max_pool_ties():
    """Flat image regions make max-pool windows full of ties: route by index, never by value."""
    model = tiny_resnet()
    x = torch.zeros(2, 3, 64, 64)
    x[1, :, 20:40, 10:50] = 1.5  # a flat patch on a flat background
    logits = model(x).detach()
    maps = srd_saliency(model, x, 2, contrast="none")
    assert torch.allclose(maps.sum((1, 2)), logits[:, 2], rtol=1e-4, atol=1e-4)
    ierf = srd_ierf(model, x, "layer2", (3, 3))
    assert torch.allclose(ierf.sum((1, 2)), torch.ones(2), atol=1e-5)


def test_torchvision_resnet_vgg_bn_out_of_the_box():
    for make in (lambda: torchvision.models.resnet18(num_classes=10),
                 lambda: torchvision.models.vgg11_bn(num_classes=10)):
        model = randomize_bn(make())
        x = torch.randn(1, 3, 64, 64)
        logit = model(x)[0, 1].item()
        s = srd_saliency(model, x, 1, contrast="none")
        assert s.shape == (1, 64, 64)
        assert abs(s.sum().item() - logit) <= 1e-4 * max(1.0, abs(logit)) + 1e-3 * s.abs().sum().item() * 1e-3


def test_batched_equals_per_image_and_seeds_equal_single_calls():
    model = tiny_resnet()
    x = torch.randn(3, 3, 48, 48)
    target = torch.tensor([0, 3, 5])
    batched = srd_saliency(model, x, target)
    for n in range(3):
        assert torch.allclose(batched[n], srd_saliency(model, x[n:n + 1], int(target[n]))[0], atol=1e-5, rtol=1e-4)
    h, w = get_adapter(model).capture(x, ["layer2"])["layer2"].shape[-2:]
    seeds = torch.zeros(3, h * w, h, w)
    seeds.view(3, h * w, -1)[:, torch.arange(h * w), torch.arange(h * w)] = 1.0
    many = srd_ierf_from_relevance(model, x, "layer2", seeds)
    for idx in (0, 5, h * w - 1):
        one = srd_ierf(model, x, "layer2", (idx // w, idx % w))
        assert torch.allclose(many[:, idx], one, atol=1e-6)
    pos = torch.tensor([[0, 0], [1, 2], [h - 1, w - 1]])
    per = srd_ierf(model, x, "layer2", pos)
    for n in range(3):
        assert torch.allclose(per[n], many[n, int(pos[n, 0] * w + pos[n, 1])], atol=1e-6)


def test_hidden_relevance_is_conserved_between_layers():
    model = tiny_resnet().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    rel = srd_relevance(model, x, 4, ["layer1", "layer2.0", "layer3", "layer4"], contrast="none",
                        dtype=torch.float64)
    logit = model(x)[:, 4]
    for r in rel.values():
        assert torch.allclose(r.sum((1, 2)), logit, rtol=1e-9)


def test_apop_forward():
    model = tiny_resnet()
    x = torch.randn(4, 3, 64, 64)
    assert torch.allclose(apop_forward(model, x, x), model(x), atol=1e-4, rtol=1e-4)
    vgg = tiny_vgg()
    assert torch.allclose(apop_forward(vgg, x, x), vgg(x), atol=1e-4, rtol=1e-4)
    gelu = plain_net(nn.GELU)
    assert torch.allclose(apop_forward(gelu, x[:, :, :16, :16], x[:, :, :16, :16]), gelu(x[:, :, :16, :16]),
                          atol=1e-5)
    zero = apop_forward(model, x, 0)
    assert zero.shape == (4, 7) and torch.isfinite(zero).all()


def test_api_contracts_model_untouched_no_grad_frozen_differentiable():
    model = tiny_resnet()
    for p in model.parameters():
        p.requires_grad_(False)
    check = model_unchanged(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = srd_saliency(model, x, 1)
        srd_relevance(model, x, 1, ["layer3"])
        srd_ierf(model, x, "layer1.0", (2, 2))
    check()
    xg = x.clone().requires_grad_(True)
    b = srd_saliency(model, xg, 1, differentiable=True)
    assert torch.allclose(a, b.detach(), atol=1e-5)
    (b * torch.randn_like(b)).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and torch.isfinite(xg.grad).all()
    with pytest.raises(UnknownLayerError):
        srd_ierf(model, x, "layer9", (0, 0))
    check()


def test_graph_follows_weight_updates():
    model = tiny_resnet()
    x = torch.randn(1, 3, 32, 32)
    srd_saliency(model, x, 0)
    with torch.no_grad():
        model.fc.bias += 3.0
    s = srd_saliency(model, x, 0, contrast="none")
    assert abs(float(s.sum()) - float(model(x)[0, 0])) < 1e-3


def test_errors_are_clear():
    model = tiny_resnet()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(UnknownLayerError, match="valid PFV layers: .*layer1"):
        srd_ierf(model, x, "layer7", (0, 0))
    with pytest.raises(SaeCafeError, match="off the"):
        srd_ierf(model, x, "layer4", (5, 0))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        srd_saliency(model, bad, 0)
    lstm_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 56 * 56, 2))
    with pytest.raises(UnsupportedModuleError, match="Upsample"):
        srd_saliency(lstm_net, torch.randn(1, 3, 32, 32), 0)
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        nan_model.layer2[0].conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="layer2"):
        srd_saliency(nan_model, x, 0)


def test_differentiable_path_matches_banded_and_gradcheck_float64():
    """``differentiable=True`` takes the unfolded rule path (the banded channels-last forms are skipped under
    autograd): same maps as the banded path in float64, and its input gradient passes ``gradcheck``. The net
    has every banded form: RGB outer product, gram (C_in < C_out), direct and fused (C_in ≥ C_out, after a
    tiling max-pool)."""
    torch.manual_seed(5)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),                        # outer (RGB)
        nn.Conv2d(6, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),   # gram
        nn.MaxPool2d(2),
        nn.Conv2d(10, 6, 3, padding=1), nn.ReLU(),                       # fused (pool + C_in ≥ C_out)
        nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.ReLU(),              # strided, C_in ≥ C_out
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3))).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    banded = srd_saliency(model, x, 1, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    unfolded = srd_saliency(model, xg, 1, differentiable=True, dtype=torch.float64)
    assert unfolded.requires_grad
    assert (unfolded.detach() - banded).abs().max() <= 1e-12 * banded.abs().max()
    assert torch.autograd.gradcheck(lambda v: srd_saliency(model, v, 1, differentiable=True, dtype=torch.float64),
                                    (xg,), eps=1e-6, atol=1e-6, rtol=1e-4)
