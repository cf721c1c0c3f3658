"""The SRD backend interface: what a model family supplies so that :mod:`sae_cafe.srd.api` can explain it.

:mod:`sae_cafe.srd.api` is family-free: it validates the inputs once (images, dtype, NaN/inf, layer ids,
target range, seed shapes common to all families) and delegates to the backend that the model's adapter
returns from ``adapter.srd_backend()``. Two backends exist:

* :class:`~sae_cafe.srd.graph_backend.StageGraphBackend` — CNN-like networks as a stage graph
  (:mod:`sae_cafe.srd.graph`, propagated by :mod:`sae_cafe.srd.engine`): ResNet, VGG, plain
  ``nn.Sequential`` nets, EfficientNet, MobileNetV3, ConvNeXt.
* :class:`~sae_cafe.srd.vit.ViTBackend` — token/attention networks (:mod:`sae_cafe.srd.vit_model`,
  :mod:`sae_cafe.srd.vit_share`): torchvision and timm ViTs.

How a new model family plugs in
-------------------------------
1. **Adapter** (``sae_cafe/models/<family>.py``): a :class:`~sae_cafe.models.base.ModelAdapter` subclass
   with ``family``, ``kind`` and ``_pfv_layer_names`` (plus the token layout for token models), registered
   with ``register_adapter(ModelClass, AdapterClass)`` from :mod:`sae_cafe.models.registry`; named
   constructors with ``register_model(name)``. The family module imports the registry, never the reverse,
   and is imported by ``sae_cafe/models/__init__.py``.
2. **Backend**: the adapter's ``srd_backend()`` returns an :class:`SRDBackend`, imported lazily inside the
   method (``sae_cafe.srd`` imports ``sae_cafe.models``). A CNN-like family writes a graph builder
   ``build(model, dtype) -> SRDGraph`` (``sae_cafe/models/srd_<family>.py``) and returns
   ``StageGraphBackend(self, build)``: saliency, relevance, iERFs, APOP and diagnostics then come from the
   engine. A family with another structure implements the abstract methods below (as :class:`ViTBackend`).
3. **Per-layer-type rules**: a stage-graph builder expresses each module as graph records — a conv / linear
   (BN folded) is a :class:`~sae_cafe.srd.graph.ConvSpec` branch, a residual add one more branch, a max-pool
   a :class:`~sae_cafe.srd.graph.MaxPoolSpec` on the consuming branch, an input-dependent affine map
   (LayerNorm σ, SE gate) a ``Branch.freeze`` record, an element-wise nonlinearity the stage's ``act``.
   A module without a rule raises :class:`~sae_cafe.errors.UnsupportedModuleError` naming its path and
   type. Every new rule is checked in float64 against an explicit per-path reference on a tiny instance
   (``tests/srd_slow_reference.py``), with re-randomised biases, norm affines and layer scales.

Every backend must reproduce ``model(x)`` (checked in :meth:`SRDBackend.prepare`, once per model, dtype and
weights version) and must never change the model's parameters, buffers, hooks or module tree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MismatchError, NonFiniteError, UnsupportedModuleError

#: the SRD forms built for a model are kept on the model instance (this attribute), not in a module-level
#: WeakKeyDictionary: a built form may reference the model (a ViT spec holds its modules; the float32 working
#: copy of a float32 model is the model itself), and a WeakKeyDictionary value that references its key keeps the
#: model alive forever. An attribute is a plain reference cycle that the garbage collector frees with the model
#: (as ``sae_cafe.models.registry`` keeps a model's adapter).
_CACHE_ATTR = "_sae_cafe_srd_cache"


class _BuildCache(dict):
    """{key: (weights signature, SRD form, number of outputs)}; a copy of the model (deepcopy, pickle) starts
    empty, so a model copied to another dtype or device never carries the original's forms."""

    def __deepcopy__(self, memo: dict) -> _BuildCache:
        return _BuildCache()

    def __reduce__(self) -> tuple:
        return (_BuildCache, ())


def weights_signature(model: nn.Module) -> tuple:
    """Identity of the model's current weights (storage, in-place version, dtype, device per tensor)."""
    return tuple((t.data_ptr(), t._version, t.dtype, str(t.device))
                 for t in (*model.parameters(), *model.buffers()))


def cached_build(model: nn.Module, key: Any, build: Callable[[], tuple[Any, int]]) -> tuple[Any, int]:
    """``build()`` → (SRD form of ``model``, number of outputs), cached per model (on the instance, freed with it)
    and ``key`` and rebuilt whenever the weights change (:func:`weights_signature`)."""
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[_CACHE_ATTR] = _BuildCache()
    sig = weights_signature(model)
    if key not in cache or cache[key][0] != sig:
        cache[key] = (sig, *build())
    return cache[key][1], cache[key][2]


def check_images(x: object, name: str) -> Tensor:
    """``x`` must be a finite (N, 3, H, W) tensor; returns it unchanged."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise MismatchError(f"{name}: expected images of shape (N, 3, H, W), got "
                            f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{name}: the input images contain NaN/inf values; check the image loading and "
                             "preprocessing")
    return x


class SRDBackend(ABC):
    """SRD for one model family. Built by ``adapter.srd_backend()``; cheap to construct (caches are per model).

    The API calls :meth:`prepare` first, then one of the computing methods. Arguments arrive validated:
    ``x`` (N, 3, H, W) finite on the model's device; ``target`` (N,) long class ids in range; ``layer`` a
    canonical layer id (:meth:`resolve_layer`); ``contrast`` "mean" or "none"; ``dtype`` the compute dtype.
    ``target`` may instead be directions (N, K) (floating point, K = number of outputs): the backend then
    explains ⟨output, direction⟩ (a backend without direction support raises UnsupportedModuleError)
    (None: the model's own). Maps come back with a *sink*: the relevance that reached no pixel (ViT class /
    register tokens), per sink token, shape (..., E) with E = 0 for families without one.
    """

    #: set by :meth:`prepare` when the model has no classifier (its output is a feature vector): the API
    #: then refuses class ids and asks for a direction target.
    headless: bool = False

    def __init__(self, adapter):
        self.adapter = adapter

    @property
    def name(self) -> str:
        return self.adapter.name

    def resolve_layer(self, layer: str | int) -> str:
        """Canonical layer id (the adapter's; raises UnknownLayerError listing the valid ids)."""
        return self.adapter.resolve_layer(layer)

    @abstractmethod
    def prepare(self, x: Tensor, dtype: torch.dtype | None) -> int:
        """Build (or reuse) the SRD form of the model in ``dtype``, checked against ``model(x)`` when built
        (UnsupportedModuleError if it does not reproduce it). Returns the number of model outputs."""

    @abstractmethod
    def saliency(self, x: Tensor, target: Tensor, contrast: str, differentiable: bool,
                 dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """Class saliency: maps (N, H, W) and sink (N, E)."""

    @abstractmethod
    def relevance(self, x: Tensor, target: Tensor, layers: dict[str, str], contrast: str,
                  dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Relevance at the outputs of ``layers`` ({key: canonical id}) during the class propagation:
        ({key: (N, h, w)}, {key: sink (N, E)})."""

    @abstractmethod
    def ierf_from_relevance(self, x: Tensor, layer: str, relevance: Tensor, differentiable: bool,
                            dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """Seeds ``relevance`` (N, S, h, w) (or a family's own layout) at ``layer`` → maps (N, S, H, W) and
        sink (N, S, E)."""

    @abstractmethod
    def ierf(self, x: Tensor, layer: str, position: object, differentiable: bool,
             dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """iERF of the PFV at ``position`` (family-specific forms) of ``layer``: maps (N, H, W), sink (N, E)."""

    @abstractmethod
    def apop(self, x: Tensor, x_prime: Tensor, dtype: torch.dtype | None) -> Tensor:
        """Outputs (N, K) for input ``x_prime`` (shape of ``x``) with the activation pattern of ``x``."""

    def diagnostics(self, x: Tensor, target: Tensor, contrast: str) -> dict[str, dict[str, float]]:
        """Per-node max |Σμ − 1| and conservation deltas (float64). Optional for a backend."""
        raise UnsupportedModuleError(f"{self.name}: srd_diagnostics is not available for the "
                                     f"{type(self).__name__} backend (family {self.adapter.family!r})")
