"""Tiny CNN and ViT adapters and random SAEs shared by the activation, SAE, hook and ICAT tests (random weights,
32 px)."""

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


def mini_resnet_32(name: str = "mini_resnet", class_names: list[str] | None = None):
    """The mini ResNet (random weights, seed 0) at 32 px, as an adapter."""
    from sae_cafe.models.mini import make_mini_resnet

    torch.manual_seed(0)
    return make_adapter(make_mini_resnet().eval(), name, input_size=(32, 32), resize=None, class_names=class_names)


def random_sae(d_in: int, d_sae: int, seed: int, topk: int | None = None):
    """A sae-lens Standard (or TopK) SAE with encoder weights N(0, 1/d_in) and zero encoder bias."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    if topk:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=topk))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.b_enc.fill_(0.0)
    return sae.eval()
