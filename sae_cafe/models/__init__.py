"""Model adapters: ``load_model(name, weights)``, ``get_adapter(module)``, PFV layers and layouts."""

from .base import LayerInfo, ModelAdapter, PFVBatch, grid_positions
from .registry import get_adapter, list_adapters, load_model, make_adapter, register_model
from .weights import load_weights, read_state_dict

__all__ = ["LayerInfo", "ModelAdapter", "PFVBatch", "get_adapter", "grid_positions", "list_adapters",
           "load_model", "load_weights", "make_adapter", "read_state_dict", "register_model"]
