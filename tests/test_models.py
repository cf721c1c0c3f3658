"""Model adapters: every registered adapter, layers, PFV layout, weights loading."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from sae_cafe.errors import NonFiniteError, UnknownLayerError, WeightsError
from sae_cafe.models import get_adapter, list_adapters, load_model


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()  # keep memory bounded: one big model at a time
            cache[name] = load_model(name)
        return cache[name]
    return get


@pytest.mark.parametrize("name", list_adapters())
def test_adapter_layers_fire_once_and_grids_match(name, adapters):
    adapter = adapters(name)
    if adapter.kind == "conv" and adapter.input_size[0] > 64:
        adapter.input_size = (64, 64)  # CNNs are size-agnostic; keep the test fast
        adapter._layers = None
    x = torch.randn(2, 3, *adapter.input_size)
    layers = adapter.layers()
    assert layers, name
    counts = {n: 0 for n in layers}
    outs = {}

    def hook(n):
        def f(_m, _i, o):
            counts[n] += 1
            outs[n] = o
        return f

    with torch.no_grad(), adapter.hooks({n: hook(n) for n in layers}):
        logits = adapter.model(x)
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    for n, info in layers.items():
        assert counts[n] == 1, (n, counts[n])
        batch = adapter.to_pfv(outs[n], n)
        assert batch.grid == info.grid
        assert batch.pfv.shape == (2, info.grid[0] * info.grid[1], info.channels)
        assert info.stride * info.grid[0] == adapter.input_size[0]
        assert torch.equal(adapter.from_pfv(batch), outs[n])  # exact round trip
        assert batch.positions.shape == (info.grid[0] * info.grid[1], 2)
    with pytest.raises(UnknownLayerError, match="valid PFV layers"):
        adapter.resolve_layer("no.such.layer")


def test_get_adapter_from_plain_modules():
    assert get_adapter(torchvision.models.resnet18()).family == "resnet"
    assert get_adapter(torchvision.models.vgg11()).family == "vgg"
    vit = torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32, num_classes=3)
    a = get_adapter(vit)
    assert a.family == "vit" and a.resolve_layer(0) == "encoder.layers.encoder_layer_0"
    assert get_adapter(vit) is a  # cached per instance


def test_vit_tokens_kept_apart():
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=3).eval()
    a = get_adapter(vit)
    act = a.capture(torch.randn(1, 3, 32, 32), [1])["encoder.layers.encoder_layer_1"]
    b = a.to_pfv(act)
    assert b.pfv.shape == (1, 16, 16) and b.extra.shape == (1, 1, 16)
    assert torch.equal(b.extra[:, 0], act[:, 0]) and torch.equal(a.from_pfv(b), act)


def test_weights_from_pth_and_safetensors(tmp_path):
    ref = torchvision.models.resnet18(num_classes=5)
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    for f in ("w.pth", "wrapped.pt", "w.safetensors"):
        a = load_model("resnet18", weights=tmp_path / f, num_classes=5)
        assert torch.allclose(a.model(x), ref.eval()(x)), f
        assert a.weights_hash and len(a.weights_hash) == 64


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("resnet18", weights=tmp_path / "missing.pth")
    torch.save(torchvision.models.vgg11().state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(WeightsError, match="missing key"):
        load_model("resnet18", weights=tmp_path / "vgg.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_model("resnet18", weights=tmp_path / "junk.pth")
    sd = torchvision.models.resnet18().state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(NonFiniteError, match="NaN"):
        load_model("resnet18", weights=tmp_path / "nan.pth")
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="wrong shapes"):
        load_model("resnet18", weights=tmp_path / "shape.pth")


def test_random_init_warns():
    with pytest.warns(UserWarning, match="random initialisation"):
        load_model("resnet18")
