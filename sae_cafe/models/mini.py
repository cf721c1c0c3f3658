"""Three small models for the 64×64 concept world (``sae_cafe.world``), built from torchvision classes.

``mini_resnet`` is a torchvision ``ResNet`` (BasicBlock, [2, 2, 2, 2], widths 16/32/48/64, 3×3 stride-1
stem + max-pool: maps 32→4 px from layer1 to layer4); ``mini_vgg`` a torchvision ``VGG`` (features built
by torchvision's ``make_layers`` with batch norm, as ``vgg11_bn``; 2×2 avg-pool; small
Linear/ReLU/Dropout head); ``mini_vit`` a torchvision ``VisionTransformer`` (64×64, patch 8, 6 layers,
width 96). Module names are torchvision's, so the adapters, SRD and the library baselines treat them like
their big siblings. Trained weights ship in ``sae_cafe/weights/`` (reproduce with
``sae-cafe train-model --arch NAME``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models import VGG, ResNet, VisionTransformer
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import make_layers

from ..world.vocab import CLASS_NAMES, NUM_CLASSES
from .registry import register_model

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: pixel statistics of the generated world (measured on 2000 images: 0.462 ± 0.252 per channel)
WORLD_MEAN = (0.46, 0.46, 0.46)
WORLD_STD = (0.25, 0.25, 0.25)
MINI_ARCHS = ("mini_resnet", "mini_vgg", "mini_vit")


def weights_path(arch: str) -> Path:
    """Path of the shipped weights of ``arch`` (``sae_cafe/weights/<arch>.safetensors``)."""
    return WEIGHTS_DIR / f"{arch}.safetensors"


class MiniResNet(ResNet):
    """torchvision ``ResNet`` with reduced widths and a small-image stem (conv1 3×3/1, maxpool 3×3/2).

    torchvision's ``ResNet.__init__`` hard-codes widths 64..512, so the modules are built here with its own
    ``_make_layer``; names, ``forward`` and init scheme are torchvision's.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64), layers: tuple[int, ...] = (2, 2, 2, 2),
                 num_classes: int = NUM_CLASSES):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class MiniVGG(VGG):
    """torchvision ``VGG``: ``features`` from ``make_layers(cfg)``, ``avgpool`` 2×2, small classifier.

    Built without ``VGG.__init__`` (which would allocate the 25088×4096 ImageNet head first).
    """

    CFG = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(self, cfg: tuple = CFG, hidden: int = 128, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.3, batch_norm: bool = True):
        nn.Module.__init__(self)
        self.features = make_layers(list(cfg), batch_norm=batch_norm)
        width = [c for c in cfg if c != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(width * 4, hidden), nn.ReLU(True), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def make_mini_resnet(num_classes: int = NUM_CLASSES) -> ResNet:
    return MiniResNet(num_classes=num_classes)


def make_mini_vgg(num_classes: int = NUM_CLASSES) -> VGG:
    return MiniVGG(num_classes=num_classes)


def make_mini_vit(num_classes: int = NUM_CLASSES) -> VisionTransformer:
    return VisionTransformer(image_size=64, patch_size=8, num_layers=6, num_heads=4, hidden_dim=96,
                             mlp_dim=192, dropout=0.0, attention_dropout=0.0, num_classes=num_classes)


MINI_FACTORIES = {"mini_resnet": make_mini_resnet, "mini_vgg": make_mini_vgg, "mini_vit": make_mini_vit}

for _name, _fn in MINI_FACTORIES.items():
    register_model(_name, input_size=(64, 64), resize=None, mean=WORLD_MEAN, std=WORLD_STD,
                   num_classes=NUM_CLASSES, class_names=list(CLASS_NAMES),
                   default_weights=weights_path(_name))(_fn)
