"""Tiny CNN and ViT adapters shared by the activation, SAE and hook tests (random weights, 32 px)."""

import torch
import torchvision

from sae_cafe.models import make_adapter


def tiny_resnet():
    torch.manual_seed(0)
    return make_adapter(torchvision.models.resnet18(num_classes=5).eval(), "resnet18", input_size=(32, 32),
                        resize=None)


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return make_adapter(m.eval(), "tiny_vit", resize=None)
