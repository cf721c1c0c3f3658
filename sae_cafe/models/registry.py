"""Adapters by name (``load_model``) or from a model instance (``get_adapter``). The only place that knows
the model families."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import SaeCafeError
from .base import ModelAdapter
from .cnn import ResNetAdapter, SequentialCNNAdapter, VGGAdapter
from .mobile import ConvNeXtAdapter, EfficientNetAdapter, MobileNetV3Adapter
from .vit import TimmViTAdapter, TorchvisionViTAdapter
from .weights import load_weights

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_ADAPTER_KW: dict[str, dict] = {}
_BY_MODULE: weakref.WeakKeyDictionary[nn.Module, ModelAdapter] = weakref.WeakKeyDictionary()


def register_model(name: str, **adapter_kw) -> Callable:
    """Register a factory ``fn(**kw) -> nn.Module`` under ``name`` (adapter options in ``adapter_kw``)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FACTORIES[name] = fn
        _ADAPTER_KW[name] = adapter_kw
        return fn

    return deco


def list_adapters() -> list[str]:
    """Names accepted by :func:`load_model`."""
    return sorted(_FACTORIES)


def _tv(name: str) -> Callable[..., nn.Module]:
    def make(**kw) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return make


def _timm(name: str) -> Callable[..., nn.Module]:
    def make(**kw) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return make


for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg13", "vgg16",
           "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vit_b_16", "efficientnet_b0",
           "mobilenet_v3_small", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large"):
    register_model(_n)(_tv(_n))
for _n in ("vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224", "deit_small_patch16_224",
           "deit_tiny_patch16_224", "deit_base_patch16_224"):
    register_model(_n)(_timm(_n))


def make_adapter(model: nn.Module, name: str | None = None, **kw) -> ModelAdapter:
    """Build the adapter for a model instance from its class."""
    import torchvision

    name = name or type(model).__name__
    if isinstance(model, torchvision.models.ResNet):
        return ResNetAdapter(model, name, **kw)
    if isinstance(model, torchvision.models.VGG):
        return VGGAdapter(model, name, **kw)
    if isinstance(model, torchvision.models.VisionTransformer):
        return TorchvisionViTAdapter(model, name, **kw)
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # pragma: no cover
        TimmViT = ()
    if TimmViT and isinstance(model, TimmViT):
        return TimmViTAdapter(model, name, **kw)
    if isinstance(model, torchvision.models.EfficientNet):
        return EfficientNetAdapter(model, name, **kw)
    if isinstance(model, torchvision.models.MobileNetV3):
        return MobileNetV3Adapter(model, name, **kw)
    if isinstance(model, torchvision.models.ConvNeXt):
        return ConvNeXtAdapter(model, name, **kw)
    if isinstance(model, nn.Sequential):
        return SequentialCNNAdapter(model, name, **kw)
    raise SaeCafeError(f"no adapter for model class {type(model).__name__}; supported: torchvision ResNet, "
                       "VGG, EfficientNet, MobileNetV3, ConvNeXt, VisionTransformer, timm VisionTransformer/DeiT, "
                       "and plain nn.Sequential conv nets")


def get_adapter(model: ModelAdapter | nn.Module) -> ModelAdapter:
    """Accept an adapter or a model as constructed; adapters are cached per model instance."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise SaeCafeError(f"expected a model adapter or an nn.Module, got {type(model).__name__}")
    adapter = _BY_MODULE.get(model)
    if adapter is None:
        adapter = make_adapter(model)
        _BY_MODULE[model] = adapter
    return adapter


def load_model(name: str, weights: str | Path | None = None, device: str | torch.device | None = None,
               **kw) -> ModelAdapter:
    """Build a registered model by name with local ``weights`` (or random init with a warning)."""
    if name not in _FACTORIES:
        raise SaeCafeError(f"unknown model {name!r}; available: {', '.join(list_adapters())}")
    adapter_kw = dict(_ADAPTER_KW[name])
    model = _FACTORIES[name](**kw)
    default_weights = adapter_kw.pop("default_weights", None)
    weights = weights if weights is not None else default_weights
    whash = None
    if weights is None:
        warnings.warn(f"{name}: no weights file given; using random initialisation", stacklevel=2)
    else:
        whash = load_weights(model, weights, name)
    model.eval()
    if device is not None:
        model.to(device)
    adapter = make_adapter(model, name, **adapter_kw)
    adapter.weights_hash = whash
    _BY_MODULE[model] = adapter
    return adapter
from . import mini  # noqa: E402,F401
