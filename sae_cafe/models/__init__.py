"""Model adapters: ``load_model(name, weights)``, ``get_adapter(module)``, PFV layers and layouts.

The family modules register their adapters and named models with :mod:`.registry` when imported here
(a family imports the registry, never the reverse); a new family adds its module to the import below.
"""

from . import cnn, densenet, hf_vit, mini, mobile, mobilenet_regnet, openclip_vit, swin, timm_cnn, vit  # noqa: F401  (the families register themselves in .registry)
from .base import LayerInfo, ModelAdapter, PFVBatch, grid_positions
from .registry import (
    RegistryError,
    get_adapter,
    list_adapters,
    load_model,
    make_adapter,
    register_adapter,
    register_model,
)
from .weights import load_weights, read_state_dict

__all__ = ["LayerInfo", "ModelAdapter", "PFVBatch", "RegistryError", "get_adapter", "grid_positions",
           "list_adapters", "load_model", "load_weights", "make_adapter", "read_state_dict", "register_adapter",
           "register_model"]
