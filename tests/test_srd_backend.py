"""One SRD API over per-family backends: validation in api.py for every family, plug-in contract, registry."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sae_cafe.errors import MismatchError, SaeCafeError, UnsupportedModuleError
from sae_cafe.models import ModelAdapter, RegistryError, get_adapter, make_adapter, register_adapter, register_model
from sae_cafe.models import registry as reg
from sae_cafe.models.cnn import ResNetAdapter
from sae_cafe.srd import apop_forward, srd_diagnostics, srd_ierf, srd_ierf_from_relevance, srd_relevance, srd_saliency
from sae_cafe.srd.backend import SRDBackend
from sae_cafe.srd.graph_backend import StageGraphBackend
from sae_cafe.srd.vit import ViTBackend


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=7).eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5).eval()


def test_each_family_supplies_its_backend():
    assert isinstance(get_adapter(tiny_resnet()).srd_backend(), StageGraphBackend)
    assert isinstance(get_adapter(tiny_vit()).srd_backend(), ViTBackend)


@pytest.mark.parametrize("make, n_out, layer", [(tiny_resnet, 7, "layer2"), (tiny_vit, 5, 0)], ids=["cnn", "vit"])
def test_out_of_range_target_is_a_clear_error_for_every_family(make, n_out, layer):
    model = make()
    x = torch.randn(2, 3, 32, 32)
    for bad in (n_out, -1, torch.tensor([0, n_out + 3])):
        with pytest.raises(MismatchError, match=rf"out of range: the model has {n_out} outputs.*0 … {n_out - 1}"):
            srd_saliency(model, x, bad)
        with pytest.raises(MismatchError, match="out of range"):
            srd_relevance(model, x, bad, [layer])
    with pytest.raises(MismatchError, match="out of range"):
        srd_saliency(model, x, n_out, contrast="none", dtype=torch.float64)
    with pytest.raises(MismatchError, match="integer class ids"):
        srd_saliency(model, x, torch.tensor([0.5, 1.0]))
    with pytest.raises(MismatchError, match="3 entries for 2 images"):
        srd_saliency(model, x, torch.tensor([0, 1, 2]))
    # the boundary class works and an integral float target is accepted
    maps = srd_saliency(model, x, n_out - 1, contrast="none")
    assert torch.allclose(maps, srd_saliency(model, x, torch.tensor([n_out - 1.0] * 2), contrast="none"))


def test_cnn_diagnostics_range_checked_and_vit_diagnostics_unsupported():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(MismatchError, match="out of range"):
        srd_diagnostics(tiny_resnet(), x, 7)
    with pytest.raises(UnsupportedModuleError, match="srd_diagnostics is not available"):
        srd_diagnostics(tiny_vit(), x, 0)


def test_api_checks_inputs_before_delegating():
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(MismatchError, match=r"\(N, 3, H, W\)"):
        srd_saliency(model, torch.randn(2, 1, 32, 32), 0)
    with pytest.raises(SaeCafeError, match="contrast"):
        srd_saliency(model, x, 0, contrast="max")
    with pytest.raises(SaeCafeError, match="return_sink"):
        srd_saliency(model, x, 0, return_sink="yes")
    with pytest.raises(MismatchError, match="x_prime"):
        apop_forward(model, x, torch.zeros(1, 3, 32, 32))
    with pytest.raises(SaeCafeError, match="NaN"):
        srd_ierf_from_relevance(model, x, "layer2", torch.full((2, 1, 4, 4), float("nan")))
    # a CNN has no sink: zeros, also per token (E = 0)
    maps, sink = srd_ierf(model, x, "layer2", (1, 1), return_sink=True)
    assert torch.equal(sink, torch.zeros(2)) and torch.allclose(maps.sum((1, 2)), torch.ones(2), atol=1e-5)
    assert srd_saliency(model, x, 0, return_sink="tokens")[1].shape == (2, 0)


class _NoSRD(ModelAdapter):
    family = "nosrd"

    def _pfv_layer_names(self) -> list[str]:
        return ["0"]


class _WrongBackend(_NoSRD):
    def srd_backend(self):
        return object()


def test_adapter_without_backend_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedModuleError, match=r"_NoSRD \(family 'nosrd'\) does not implement srd_backend"):
        srd_saliency(_NoSRD(model, "plain"), x, 0)
    with pytest.raises(UnsupportedModuleError, match=r"_WrongBackend.srd_backend\(\) returned object"):
        srd_ierf(_WrongBackend(model, "plain"), x, "0", (0, 0))


class _ConstBackend(SRDBackend):
    """A toy family: saliency = target id everywhere (checks what the API does before delegating)."""

    calls: list = []

    def prepare(self, x, dtype):
        return 3

    def saliency(self, x, target, contrast, differentiable, dtype):
        self.calls.append((target.tolist(), contrast, dtype))
        maps = target.to(x.dtype).view(-1, 1, 1).expand(-1, *x.shape[-2:]).clone()
        return maps, torch.ones(x.shape[0], 2, dtype=x.dtype)

    def relevance(self, x, target, layers, contrast, dtype):
        raise NotImplementedError

    def ierf_from_relevance(self, x, layer, relevance, differentiable, dtype):
        raise NotImplementedError

    def ierf(self, x, layer, position, differentiable, dtype):
        raise NotImplementedError

    def apop(self, x, x_prime, dtype):
        raise NotImplementedError


class _ToyAdapter(_NoSRD):
    def srd_backend(self):
        return _ConstBackend(self)


def test_a_new_family_plugs_in_with_its_own_backend():
    adapter = _ToyAdapter(nn.Sequential(nn.Conv2d(3, 4, 3)), "toy")
    x = torch.randn(2, 3, 5, 5)
    maps, sink = srd_saliency(adapter, x, torch.tensor([2, 1]), contrast="none", return_sink=True)
    assert maps.shape == (2, 5, 5) and torch.equal(maps[:, 0, 0], torch.tensor([2.0, 1.0]))
    assert torch.equal(sink, torch.full((2,), 2.0))  # summed over the sink tokens
    assert _ConstBackend.calls[-1] == ([2, 1], "none", torch.float32)
    with pytest.raises(MismatchError, match="has 3 outputs"):  # range from the backend's prepare()
        srd_saliency(adapter, x, 3)


def test_register_model_refuses_duplicate_names():
    with pytest.raises(RegistryError, match="'resnet18' is already registered"):
        register_model("resnet18")(torchvision.models.resnet18)
    name = "_test_h4_duplicate"
    try:
        register_model(name)(tiny_resnet)
        with pytest.raises(RegistryError, match=name):
            register_model(name)(tiny_resnet)
        assert reg._FACTORIES[name] is tiny_resnet  # the first registration is kept
    finally:
        reg._FACTORIES.pop(name, None)
        reg._ADAPTER_KW.pop(name, None)


def test_register_adapter_refuses_duplicates_and_most_specific_class_wins():
    with pytest.raises(RegistryError, match="one adapter per model class"):
        register_adapter(torchvision.models.ResNet, ResNetAdapter)

    class MyResNet(torchvision.models.ResNet):
        pass

    m = MyResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)
    assert type(make_adapter(m)) is ResNetAdapter  # inherited from the ResNet registration
    try:
        register_adapter(MyResNet, _ToyAdapter, "test family")
        assert type(make_adapter(m)) is _ToyAdapter  # the more specific class wins
    finally:
        reg._ADAPTERS.pop(MyResNet, None)
    with pytest.raises(SaeCafeError, match="no adapter for model class LSTM; supported: .*torchvision ResNet"):
        make_adapter(nn.LSTM(2, 2))
