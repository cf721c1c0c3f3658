"""torchvision DenseNet adapter (densenet121/161/169/201).

SRD sees DenseNet as a stage graph (:func:`.srd_densenet.build_densenet_graph`): channel concatenations
split relevance by channel group. PFV layers: ``features.relu0`` (stem), ``features.pool0``, every dense
layer ``features.denseblockB.denselayerL`` (its new features, the module's output) and every transition
``features.transitionB`` (after its average pool). A dense block's output (the concatenation) and
``features.norm5`` (pre-ReLU) are not PFV layers: neither is a node every relevance passes through.
"""

from __future__ import annotations

from torchvision.models import DenseNet

from .cnn import StageGraphAdapter
from .registry import register_adapter, register_model, torchvision_factory


class DenseNetAdapter(StageGraphAdapter):
    """torchvision ``DenseNet``."""

    family = "densenet"

    def srd_graph(self, dtype):
        from .srd_densenet import build_densenet_graph

        return build_densenet_graph(self.model, dtype)[0]

    def _pfv_layer_names(self) -> list[str]:
        from torchvision.models.densenet import _DenseBlock, _Transition

        names = ["features.relu0", "features.pool0"]
        for n, m in self.model.features.named_children():
            if isinstance(m, _DenseBlock):
                names += [f"features.{n}.{ln}" for ln in m]
            elif isinstance(m, _Transition):
                names.append(f"features.{n}")
        return names


register_adapter(DenseNet, DenseNetAdapter, "torchvision DenseNet")
for _n in ("densenet121", "densenet161", "densenet169", "densenet201"):
    register_model(_n)(torchvision_factory(_n))
