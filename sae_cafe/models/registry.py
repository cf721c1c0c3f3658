"""The model registry: adapters by name (``load_model``) or from a model instance (``get_adapter``).

It knows no family. Family modules (``cnn``, ``mobile``, ``vit``, ``mini``) import it and register
themselves — ``register_adapter(ModelClass, AdapterClass)`` for the classes they explain and
``register_model(name)`` for named constructors — and ``sae_cafe/models/__init__.py`` imports them, so a
family module imports the registry, never the reverse. A name or a model class registered twice is an error.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import SaeCafeError
from .base import ModelAdapter
from .weights import load_weights

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_ADAPTER_KW: dict[str, dict] = {}
_ADAPTERS: dict[type | str, tuple[type[ModelAdapter], str]] = {}
#: the adapter of a model instance is kept on the instance: a WeakKeyDictionary whose value (the adapter) holds
#: its key (the model) would keep every model ever adapted alive; an attribute is a plain reference cycle that
#: the garbage collector frees with the model
_ADAPTER_ATTR = "_sae_cafe_adapter"


class RegistryError(SaeCafeError, ValueError):
    """A model name or model class registered twice."""


def register_model(name: str, **adapter_kw) -> Callable:
    """Register a factory ``fn(**kw) -> nn.Module`` under ``name`` (adapter options in ``adapter_kw``).

    Raises :class:`RegistryError` if ``name`` is taken (pick another name; names are global)."""
    if name in _FACTORIES:
        raise RegistryError(f"model name {name!r} is already registered (by {_FACTORIES[name].__module__}); "
                            "choose another name for the new factory")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FACTORIES:
            raise RegistryError(f"model name {name!r} is already registered; choose another name")
        _FACTORIES[name] = fn
        _ADAPTER_KW[name] = adapter_kw
        return fn

    return deco


def register_adapter(model_class: type | str, adapter_cls: type[ModelAdapter], label: str | None = None) -> None:
    """Explain instances of ``model_class`` (and its subclasses) with ``adapter_cls``.

    ``model_class`` is a class or a dotted path ``"package.module.ClassName"`` that is resolved only once
    that module is imported (so an optional library such as timm is never imported here). For a model the
    most specific registered class in its MRO wins. ``label`` names the family in error messages.
    """
    if model_class in _ADAPTERS:
        raise RegistryError(f"model class {model_class!r} already has the adapter "
                            f"{_ADAPTERS[model_class][0].__name__}; one adapter per model class")
    _ADAPTERS[model_class] = (adapter_cls, label or (model_class if isinstance(model_class, str)
                                                     else f"{model_class.__module__}.{model_class.__name__}"))


def _resolve(model_class: type | str) -> type | None:
    if isinstance(model_class, type):
        return model_class
    module, _, qual = model_class.rpartition(".")
    mod = sys.modules.get(module)
    return getattr(mod, qual, None) if mod is not None else None


def torchvision_factory(name: str) -> Callable[..., nn.Module]:
    """Factory of ``torchvision.models.<name>(weights=None, **kw)``."""

    def make(**kw) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return make


def timm_factory(name: str) -> Callable[..., nn.Module]:
    """Factory of ``timm.create_model(name, pretrained=False, **kw)`` (no download)."""

    def make(**kw) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return make


def list_adapters() -> list[str]:
    """Names accepted by :func:`load_model`."""
    return sorted(_FACTORIES)


def make_adapter(model: nn.Module, name: str | None = None, **kw) -> ModelAdapter:
    """Build the adapter for a model instance from its class (the most specific registered class wins)."""
    table = {}
    for key, (cls, _) in _ADAPTERS.items():
        resolved = _resolve(key)
        if resolved is not None:
            table[resolved] = cls
    for klass in type(model).__mro__:
        if klass in table:
            return table[klass](model, name or type(model).__name__, **kw)
    supported = ", ".join(label for _, label in _ADAPTERS.values())
    raise SaeCafeError(f"no adapter for model class {type(model).__name__}; supported: {supported}")


def get_adapter(model: ModelAdapter | nn.Module) -> ModelAdapter:
    """Accept an adapter or a model as constructed; adapters are cached per model instance."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise SaeCafeError(f"expected a model adapter or an nn.Module, got {type(model).__name__}")
    adapter = model.__dict__.get(_ADAPTER_ATTR)
    if adapter is None or adapter.model is not model and getattr(adapter.model, "hf", None) is not model:
        adapter = make_adapter(model)
        model.__dict__[_ADAPTER_ATTR] = adapter
    return adapter


def load_model(name: str, weights: str | Path | None = None, device: str | torch.device | None = None,
               **kw) -> ModelAdapter:
    """Build a registered model by name with local ``weights`` (or random init with a warning)."""
    if name not in _FACTORIES:
        raise SaeCafeError(f"unknown model {name!r}; available: {', '.join(list_adapters())}")
    adapter_kw = dict(_ADAPTER_KW[name])
    model = _FACTORIES[name](**kw)
    default_weights = adapter_kw.pop("default_weights", None)
    given = weights
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
    adapter.weights_path = str(Path(given).resolve()) if given is not None else None  # None: shipped or random
    model.__dict__[_ADAPTER_ATTR] = adapter
    return adapter
