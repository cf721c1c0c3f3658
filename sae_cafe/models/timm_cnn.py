"""timm CNN adapters: ``ResNet`` (ResNet, ResNet-D, ResNeXt, SE-ResNet), ``EfficientNet`` / ``MobileNetV3``
and ``ConvNeXt``.

SRD sees them as stage graphs built by :mod:`.srd_timm` and :mod:`.srd_timm_convnext` (the torchvision
families' records and rules, on timm's module names). timm is optional: the classes are registered by
dotted path and resolved only once timm is imported (``load_model`` imports it).

Model names (``load_model``): every timm model is registered as ``timm/<timm name>`` (e.g.
``timm/resnet50``, ``timm/efficientnet_b0``, ``timm/convnext_tiny``); names that no torchvision model
uses are also registered bare (``resnet50d``, ``resnext50_32x4d``, ``seresnet50``,
``mobilenetv3_large_100``). Bare ``resnet50`` / ``efficientnet_b0`` / ``convnext_tiny`` are torchvision's.
"""

from __future__ import annotations

from .base import IMAGENET_MEAN, IMAGENET_STD
from .cnn import StageGraphAdapter
from .registry import register_adapter, register_model, timm_factory


class _TimmAdapter(StageGraphAdapter):
    """Input size, mean and std from the model's ``pretrained_cfg`` unless given."""

    def __init__(self, model, name, **kw):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
        if size is not None:
            kw.setdefault("input_size", tuple(size[-2:]))
        kw.setdefault("mean", tuple(cfg.get("mean", IMAGENET_MEAN)))
        kw.setdefault("std", tuple(cfg.get("std", IMAGENET_STD)))
        super().__init__(model, name, **kw)


class TimmResNetAdapter(_TimmAdapter):
    """timm ``ResNet``. PFV layers: stem ``act1``, stages ``layerI`` (their last block) and blocks ``layerI.J``."""

    family = "timm_resnet"

    def srd_graph(self, dtype):
        from .srd_timm import build_timm_resnet_graph

        return build_timm_resnet_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = ["act1"]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            names.append(stage)
            names += [f"{stage}.{i}" for i in range(len(getattr(self.model, stage)))]
        return names


class TimmEfficientNetAdapter(_TimmAdapter):
    """timm ``EfficientNet`` and ``MobileNetV3``. PFV layers: stem ``bn1`` (BatchNormAct2d: its output is
    post-activation), stages ``blocks.I`` (their last block), blocks ``blocks.I.J`` and, for EfficientNet,
    the last conv's ``bn2``."""

    family = "timm_efficientnet"

    def srd_graph(self, dtype):
        from .srd_timm import build_timm_efficientnet_graph

        return build_timm_efficientnet_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = ["bn1"]
        for i, stage in enumerate(self.model.blocks):
            names.append(f"blocks.{i}")
            names += [f"blocks.{i}.{j}" for j in range(len(stage))]
        if type(self.model).__name__ != "MobileNetV3":
            names.append("bn2")
        return names


class TimmMobileNetV3Adapter(TimmEfficientNetAdapter):
    family = "timm_mobilenetv3"


class TimmConvNeXtAdapter(_TimmAdapter):
    """timm ``ConvNeXt`` (via its torchvision-layout view, :mod:`.srd_timm_convnext`). PFV layers: ``stem``,
    ``stages.I.downsample`` (I ≥ 1), stages ``stages.I`` (their last block) and blocks ``stages.I.blocks.J``."""

    family = "timm_convnext"
    rf_skip = ()  # ConvNeXt's ``downsample`` (LayerNorm2d + 2×2/2 conv) is on the main path

    def srd_graph(self, dtype):
        from .srd_timm_convnext import build_timm_convnext_graph

        return build_timm_convnext_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = ["stem"]
        for i, stage in enumerate(self.model.stages):
            if i > 0:
                names.append(f"stages.{i}.downsample")
            names.append(f"stages.{i}")
            names += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
        return names


register_adapter("timm.models.resnet.ResNet", TimmResNetAdapter, "timm ResNet/ResNeXt/SE-ResNet")
register_adapter("timm.models.efficientnet.EfficientNet", TimmEfficientNetAdapter, "timm EfficientNet")
register_adapter("timm.models.mobilenetv3.MobileNetV3", TimmMobileNetV3Adapter, "timm MobileNetV3")
register_adapter("timm.models.convnext.ConvNeXt", TimmConvNeXtAdapter, "timm ConvNeXt")

#: timm names whose bare name is a torchvision model in this registry: only ``timm/<name>``
TIMM_CLASHING = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_b0", "convnext_tiny",
                 "convnext_small", "convnext_base")
TIMM_CNN_MODELS = (*TIMM_CLASHING, "resnet50d", "resnet101d", "resnext50_32x4d", "resnext101_32x8d", "seresnet50",
                   "seresnext50_32x4d", "efficientnet_b1", "efficientnet_b2", "mobilenetv3_large_100",
                   "mobilenetv3_small_100", "convnext_nano", "convnext_pico")
for _n in TIMM_CNN_MODELS:
    register_model(f"timm/{_n}")(timm_factory(_n))
    if _n not in TIMM_CLASHING:
        register_model(_n)(timm_factory(_n))
