"""torchvision MobileNetV2 and RegNet adapters.

SRD sees them as stage graphs: MobileNetV2 through :func:`.srd_mobile.build_mobile_graph` (ReLU6
Conv2dNormActivation nodes, linear bottlenecks), RegNet through :mod:`.srd_regnet`.
"""

from __future__ import annotations

from torchvision.models import MobileNetV2, RegNet

from .cnn import StageGraphAdapter
from .registry import register_adapter, register_model, torchvision_factory


class MobileNetV2Adapter(StageGraphAdapter):
    """torchvision ``MobileNetV2``. PFV layers: every ``features.i`` (stem, InvertedResidual blocks, last conv)."""

    family = "mobilenetv2"

    def srd_graph(self, dtype):
        from .srd_mobile import build_mobile_graph

        return build_mobile_graph(self.model, dtype, self.family)

    def _pfv_layer_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.model.features))]


class RegNetAdapter(StageGraphAdapter):
    """torchvision ``RegNet`` (X and Y). PFV layers: ``stem``, stages ``trunk_output.blockI`` (their last
    block) and blocks ``trunk_output.blockI.blockI-J``."""

    family = "regnet"
    rf_skip = ("proj",)  # the strided 1×1 shortcut runs before the block body: not on the receptive field path

    def srd_graph(self, dtype):
        from .srd_regnet import build_regnet_graph

        return build_regnet_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = ["stem"]
        for sname, stage in self.model.trunk_output.named_children():
            names.append(f"trunk_output.{sname}")
            names += [f"trunk_output.{sname}.{b}" for b, _ in stage.named_children()]
        return names


register_adapter(MobileNetV2, MobileNetV2Adapter, "torchvision MobileNetV2")
register_adapter(RegNet, RegNetAdapter, "torchvision RegNet")
for _n in ("mobilenet_v2", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_x_400mf",
           "regnet_x_800mf"):
    register_model(_n)(torchvision_factory(_n))
