"""CNN adapters: torchvision ResNet and VGG, and plain ``nn.Sequential`` conv nets."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid)


class ResNetAdapter(ModelAdapter):
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


class VGGAdapter(ModelAdapter):
    """torchvision ``VGG`` (± BN). PFV layers: the activation modules of ``features`` (``features.29``)."""

    family = "vgg"

    def srd_graph(self, dtype):
        from .srd_cnn import build_vgg_graph

        return build_vgg_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        return [f"features.{i}" for i, m in enumerate(self.model.features) if isinstance(m, ACTIVATIONS)]


class SequentialCNNAdapter(ModelAdapter):
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
