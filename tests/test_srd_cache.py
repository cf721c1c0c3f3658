"""The per-model cache of built SRD forms (``sae_cafe.srd.backend.cached_build``): a model whose every reference
was dropped is freed (the cache must not keep it alive, also when a cached form references the model, as a
ViT spec does), repeated SRD calls on one model reuse the built form, a weight change rebuilds it, and a
copy of the model starts with an empty cache."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torchvision

from sae_cafe.srd import backend as be
from sae_cafe.srd import srd_saliency
from sae_cafe.srd.vit import ViTBackend


def tiny_resnet():
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=7).eval()


def tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5).eval()


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit], ids=["cnn", "vit"])
@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["own_dtype", "float64"])
def test_a_dropped_model_is_freed_after_srd(make, dtype):
    model = make()
    x = torch.randn(2, 3, 32, 32)
    srd_saliency(model, x, torch.tensor([0, 1]), dtype=dtype)
    assert model.__dict__[be._CACHE_ATTR]  # something was cached on it
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


def test_repeated_calls_reuse_the_built_form_and_a_weight_change_rebuilds(monkeypatch):
    built = []
    orig = ViTBackend.build_spec
    monkeypatch.setattr(ViTBackend, "build_spec", lambda self, m, g: built.append(1) or orig(self, m, g))
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    a = srd_saliency(model, x, torch.tensor([0, 1]))
    b = srd_saliency(model, x, torch.tensor([0, 1]))
    assert len(built) == 1 and torch.equal(a, b)
    with torch.no_grad():
        model.heads.head.weight.mul_(2.0)  # in place: a new weights version
    srd_saliency(model, x, torch.tensor([0, 1]))
    assert len(built) == 2
    twin = copy.deepcopy(model)
    assert be._CACHE_ATTR in model.__dict__ and not twin.__dict__.get(be._CACHE_ATTR)
    srd_saliency(twin, x, torch.tensor([0, 1]))
    assert len(built) == 3  # the copy built its own form (never the original's, bound to the original's modules)
