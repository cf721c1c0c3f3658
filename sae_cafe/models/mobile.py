"""Mobile/modern CNN adapters: torchvision EfficientNet (v1/v2), MobileNetV3 and ConvNeXt."""

from __future__ import annotations

from torch import nn
from torchvision.models import ConvNeXt, EfficientNet, MobileNetV3

from .cnn import StageGraphAdapter
from .registry import register_adapter, register_model, torchvision_factory


class EfficientNetAdapter(StageGraphAdapter):
    """torchvision ``EfficientNet``. PFV layers: stem ``features.0``, each stage ``features.i`` (its last
    block) and block ``features.i.j``, last conv ``features.8`` (the last index of ``features``)."""

    family = "efficientnet"

    def srd_graph(self, dtype):
        from .srd_mobile import build_mobile_graph

        return build_mobile_graph(self.model, dtype, self.family)

    def _pfv_layer_names(self) -> list[str]:
        from torchvision.ops.misc import Conv2dNormActivation

        names = []
        for i, m in enumerate(self.model.features):
            names.append(f"features.{i}")
            if isinstance(m, nn.Sequential) and not isinstance(m, Conv2dNormActivation):  # a stage of blocks
                names += [f"features.{i}.{j}" for j in range(len(m))]
        return names


class MobileNetV3Adapter(StageGraphAdapter):
    """torchvision ``MobileNetV3``. PFV layers: every ``features.i`` (stem, InvertedResidual blocks, last
    conv)."""

    family = "mobilenetv3"

    def srd_graph(self, dtype):
        from .srd_mobile import build_mobile_graph

        return build_mobile_graph(self.model, dtype, self.family)

    def _pfv_layer_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.model.features))]


class ConvNeXtAdapter(StageGraphAdapter):
    """torchvision ``ConvNeXt`` (LayerNorm σ frozen by SRD, see :mod:`.srd_convnext`). PFV layers:
    ``features.i`` (stem, stages, downsampling layers) and the blocks ``features.i.j`` of each stage."""

    family = "convnext"

    def srd_graph(self, dtype):
        from .srd_convnext import build_convnext_graph

        return build_convnext_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = []
        for i, m in enumerate(self.model.features):
            names.append(f"features.{i}")
            if isinstance(m, nn.Sequential) and all(type(b).__name__ == "CNBlock" for b in m):
                names += [f"features.{i}.{j}" for j in range(len(m))]
        return names


register_adapter(EfficientNet, EfficientNetAdapter, "torchvision EfficientNet")
register_adapter(MobileNetV3, MobileNetV3Adapter, "torchvision MobileNetV3")
register_adapter(ConvNeXt, ConvNeXtAdapter, "torchvision ConvNeXt")
for _n in ("efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "convnext_small", "convnext_base",
           "convnext_large"):
    register_model(_n)(torchvision_factory(_n))
