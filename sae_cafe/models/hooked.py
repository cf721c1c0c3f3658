"""TransformerLens-style hook points on a vision model: ``HookedVisionModel``.

Wraps a model (or adapter) in a ``transformer_lens`` ``HookedRootModule`` whose ``HookPoint``s are named by
the PFV layer ids (``layer3.5``, ``blocks.5``), so ``run_with_cache``, ``run_with_hooks`` and hook functions
``fn(act, hook)`` work as in TransformerLens. The wrapped model is not modified: its module names stay the
same and the hook points are attached with forward hooks only while the wrapper runs, so outputs are
unchanged (a HookPoint is the identity unless a hook function returns a new value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from .base import ModelAdapter
from .registry import get_adapter


class HookedVisionModel(HookedRootModule):
    """``HookedRootModule`` over a vision model with one ``HookPoint`` per PFV layer (name = layer id).

    Args:
        model: adapter or ``nn.Module`` as constructed.
        layers: layer ids to expose (default: all PFV layers of the adapter).

    Example::

        hooked = HookedVisionModel(torchvision.models.resnet18())
        logits, cache = hooked.run_with_cache(x, names_filter=["layer3.1"])
        cache["layer3.1"]  # (B, 256, h, w)
    """

    def __init__(self, model: ModelAdapter | nn.Module, layers: Sequence[str | int] | None = None):
        super().__init__()
        self.adapter = get_adapter(model)
        names = [self.adapter.resolve_layer(n) for n in layers] if layers is not None else list(
            self.adapter.layers())
        self.layer_ids: list[str] = list(dict.fromkeys(names))
        # ModuleDict keys cannot contain dots; the hook names are set in setup()
        self.hook_points_list = nn.ModuleList([HookPoint() for _ in self.layer_ids])
        object.__setattr__(self, "_wrapped", self.adapter.model)
        # Expose the model's own parameters, buffers and children under their own names (state_dict keys
        # and module names are exactly the wrapped model's), unless a name clashes with a wrapper attribute.
        m = self.adapter.model
        own = [*m._parameters, *m._buffers, *m._modules]
        if not any(hasattr(self, n) for n in own):
            for n, p in m._parameters.items():
                self.register_parameter(n, p)
            for n, b in m._buffers.items():
                self.register_buffer(n, b, persistent=n not in m._non_persistent_buffers_set)
            for n, c in m._modules.items():
                self.add_module(n, c)
        self.setup()

    @property
    def model(self) -> nn.Module:
        return self._wrapped

    def setup(self) -> None:
        """Register the hook points by layer id (does not touch the wrapped model's modules)."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, hp in zip(self.layer_ids, self.hook_points_list):
            hp.name = name
            self.mod_dict[name] = hp
            self.hook_dict[name] = hp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model; each exposed layer's output passes through its HookPoint."""

        def through(hp: HookPoint):
            def hook(_m, _i, out):
                new = hp(out)
                return None if new is out else new
            return hook

        with self.adapter.hooks({n: through(hp) for n, hp in zip(self.layer_ids, self.hook_points_list)}):
            return self._wrapped(x)

    def to(self, *args, **kwargs):  # keep the wrapped model on the same device
        self._wrapped.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True):
        self._wrapped.train(mode)
        return super().train(mode)

    def __repr__(self) -> str:
        return f"HookedVisionModel({self.adapter.name!r}, hook_points={self.layer_ids})"
