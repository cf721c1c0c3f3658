"""CNN adapters: torchvision ResNet and VGG, and plain ``nn.Sequential`` conv nets.

SRD sees them as stage graphs (:class:`~sae_cafe.srd.graph_backend.StageGraphBackend`); the graph builders
are in :mod:`.srd_cnn`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import VGG, ResNet

from .base import ACTIVATIONS, ModelAdapter
from .registry import register_adapter, register_model, torchvision_factory

__all__ = ["ACTIVATIONS", "ResNetAdapter", "SequentialCNNAdapter", "StageGraphAdapter", "VGGAdapter"]


class StageGraphAdapter(ModelAdapter):
    """An adapter whose family SRD explains as a stage graph: subclasses implement ``srd_graph(dtype)``."""

    def srd_graph(self, dtype):
        raise NotImplementedError

    def srd_backend(self):
        from ..srd.graph_backend import StageGraphBackend

        return StageGraphBackend(self, self.srd_graph)


class ResNetAdapter(StageGraphAdapter):
    """torchvision ``ResNet`` (BasicBlock or Bottleneck). PFV layers: stem ``relu``, stages, blocks."""

    family = "resnet"

    def srd_graph(self, dtype):
        from .srd_cnn import build_resnet_graph

        return build_resnet_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = ["relu"]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            seq = getattr(self.model, stage)
            names.append(stage)
            names += [f"{stage}.{i}" for i in range(len(seq))]
        return names


class VGGAdapter(StageGraphAdapter):
    """torchvision ``VGG`` (± BN). PFV layers: the activation modules of ``features`` (``features.29``)."""

    family = "vgg"

    def srd_graph(self, dtype):
        from .srd_cnn import build_vgg_graph

        return build_vgg_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        return [f"features.{i}" for i, m in enumerate(self.model.features) if isinstance(m, ACTIVATIONS)]


class SequentialCNNAdapter(StageGraphAdapter):
    """A plain ``nn.Sequential`` conv net. PFV layers: its activation modules while maps are spatial."""

    family = "sequential"

    def srd_graph(self, dtype):
        from .srd_cnn import build_sequential_graph

        return build_sequential_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = []
        for i, m in enumerate(self.model):
            if isinstance(m, nn.Flatten | nn.Linear | nn.AdaptiveAvgPool2d):
                break
            if isinstance(m, ACTIVATIONS):
                names.append(str(i))
        return names


register_adapter(ResNet, ResNetAdapter, "torchvision ResNet")
register_adapter(VGG, VGGAdapter, "torchvision VGG")
register_adapter(nn.Sequential, SequentialCNNAdapter, "plain nn.Sequential conv nets")
for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19",
           "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
    register_model(_n)(torchvision_factory(_n))
