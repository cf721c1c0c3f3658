"""HookedVisionModel: TransformerLens HookPoints at PFV layers without changing outputs or module names."""

from __future__ import annotations

import pytest
import torch
import torchvision
from tiny_models import tiny_resnet, tiny_vit

from sae_cafe.models import make_adapter
from sae_cafe.models.hooked import HookedVisionModel


def tiny_models():
    yield tiny_resnet()
    yield tiny_vit()
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                              hidden_dim=32, mlp_dim=64, num_classes=5)
    torch.nn.init.normal_(tv.heads.head.weight)  # torchvision initialises the head to zero
    yield make_adapter(tv.eval(), "tv_vit", resize=None)
    yield make_adapter(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                           torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                           torch.nn.Linear(8, 5)).eval(), "seq", input_size=(32, 32),
                       resize=None)


@pytest.mark.parametrize("adapter", list(tiny_models()), ids=lambda a: a.name)
def test_hooked_wrapper_changes_nothing_and_caches(adapter):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names_before = [n for n, _ in adapter.model.named_modules()]
    keys_before = list(adapter.model.state_dict())
    hooked = HookedVisionModel(adapter)
    assert list(hooked.hook_dict) == list(adapter.layers())
    with torch.no_grad():
        clean = adapter.model(x)
        out = hooked(x)
        out2, cache = hooked.run_with_cache(x)
        ref = adapter.capture(x, list(adapter.layers()))
    assert torch.equal(out, clean) and torch.equal(out2, clean)
    assert set(cache.keys()) == set(adapter.layers())
    for n, a in ref.items():
        assert torch.equal(cache[n], a)
    # the wrapped model is untouched: names, state-dict keys, no hooks left behind
    assert [n for n, _ in adapter.model.named_modules()] == names_before
    assert list(hooked.state_dict()) == keys_before
    assert all(not m._forward_hooks for m in adapter.model.modules())
    # a hook function that edits an activation changes the output, like in TransformerLens
    layer = list(adapter.layers())[-1]
    with torch.no_grad():
        edited = hooked.run_with_hooks(x, fwd_hooks=[(layer, lambda act, hook: act * 0)])
        expect = adapter.forward_from(layer, ref[layer] * 0, x)
    torch.testing.assert_close(edited, expect)
    assert not torch.allclose(edited, clean)
    seen = []
    hooked.run_with_hooks(x, fwd_hooks=[(lambda name: True, lambda act, hook: seen.append(hook.name))])
    assert sorted(seen) == sorted(adapter.layers())  # each fires once (in execution order)


def test_hooked_subset_of_layers():
    adapter = next(tiny_models())
    hooked = HookedVisionModel(adapter, layers=["layer3", "layer1.0"])
    assert list(hooked.hook_dict) == ["layer3", "layer1.0"]
    _, cache = hooked.run_with_cache(torch.zeros(1, 3, 32, 32), names_filter=["layer3"])
    assert list(cache.keys()) == ["layer3"] and cache["layer3"].shape == (1, 256, 2, 2)
