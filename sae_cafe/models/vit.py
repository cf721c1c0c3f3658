"""ViT adapters: torchvision ``VisionTransformer`` and timm ``VisionTransformer`` / DeiT (incl. distilled
DeiT and the CLIP / SigLIP / DINOv2 image towers). What SRD explains: the logits of a classifier head, the
pooled feature of a headless tower (``num_classes=0``; saliency then needs a direction target).

Layer ids are block module paths (``encoder.layers.encoder_layer_5`` / ``blocks.5``); the block index
(``5`` or ``"5"``) is accepted as an alias. Class/register tokens are kept apart from patch tokens.
"""

from __future__ import annotations

import torch
from torchvision.models import VisionTransformer

from ..errors import MismatchError
from .base import IMAGENET_MEAN, IMAGENET_STD, ModelAdapter, PFVBatch, grid_positions
from .registry import register_adapter, register_model, timm_factory, torchvision_factory


class _ViTAdapter(ModelAdapter):
    family = "vit"
    kind = "tokens"
    num_prefix_tokens = 1
    patch_size = 16

    def block_names(self) -> list[str]:
        raise NotImplementedError

    def srd_backend(self):
        from ..srd.vit import ViTBackend

        return ViTBackend(self)

    def _pfv_layer_names(self) -> list[str]:
        return self.block_names()

    def _layer_aliases(self) -> dict[str, str]:
        names = self.block_names()
        aliases = {str(i): n for i, n in enumerate(names)}
        aliases.update({f"blocks.{i}": n for i, n in enumerate(names)})
        return aliases

    def block_index(self, layer: str | int) -> int:
        return self.block_names().index(self.resolve_layer(layer))

    def patch_grid(self, input_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = input_hw or self.input_size
        return h // self.patch_size, w // self.patch_size

    def _grid_and_channels(self, act: torch.Tensor) -> tuple[tuple[int, int], int]:
        if act.ndim != 3:
            raise MismatchError(f"{self.name}: expected (B, T, D) tokens, got {tuple(act.shape)}")
        n = act.shape[1] - self.num_prefix_tokens
        h, w = self.patch_grid()
        if h * w != n:
            side = int(round(n ** 0.5))
            h, w = side, n // side
        return (h, w), act.shape[2]

    def to_pfv(self, act: torch.Tensor, layer: str | int | None = None) -> PFVBatch:  # noqa: ARG002
        (h, w), _ = self._grid_and_channels(act)
        p = self.num_prefix_tokens
        return PFVBatch(act[:, p:], grid_positions(h, w, act.device), (h, w), act[:, :p])

    def from_pfv(self, batch: PFVBatch) -> torch.Tensor:
        if batch.extra is None:
            raise MismatchError("ViT PFVs need their class/register tokens (PFVBatch.extra) to rebuild tokens")
        return torch.cat([batch.extra, batch.pfv], 1)


class TorchvisionViTAdapter(_ViTAdapter):
    """torchvision ``VisionTransformer`` (``vit_b_16`` …): class token first, no register tokens."""

    def __init__(self, model, name, **kw):
        kw.setdefault("input_size", (model.image_size, model.image_size))
        super().__init__(model, name, **kw)
        self.patch_size = model.patch_size
        self.num_prefix_tokens = 1

    def block_names(self) -> list[str]:
        return [f"encoder.layers.{n}" for n, _ in self.model.encoder.layers.named_children()]


class TimmViTAdapter(_ViTAdapter):
    """timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, CLIP / SigLIP / DINOv2 towers): class,
    distillation and register tokens first (``num_prefix_tokens``). Models built with
    ``dynamic_img_size=True`` take any input size that is a multiple of the patch size."""

    def __init__(self, model, name, **kw):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = tuple(model.patch_embed.img_size)
        kw.setdefault("input_size", size)
        kw.setdefault("mean", tuple(cfg.get("mean", IMAGENET_MEAN)))
        kw.setdefault("std", tuple(cfg.get("std", IMAGENET_STD)))
        super().__init__(model, name, **kw)
        self.patch_size = model.patch_embed.patch_size[0]
        self.num_prefix_tokens = model.num_prefix_tokens

    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.model.blocks))]

    def prefix_kinds(self) -> list[str]:
        """Kinds of the prefix tokens in timm's order: class token, distillation token, register tokens."""
        m = self.model
        return (["cls"] * (getattr(m, "cls_token", None) is not None)
                + ["dist"] * (getattr(m, "dist_token", None) is not None)
                + ["register"] * int(getattr(m, "num_reg_tokens", 0) or 0))


register_adapter(VisionTransformer, TorchvisionViTAdapter, "torchvision VisionTransformer")
register_adapter("timm.models.vision_transformer.VisionTransformer", TimmViTAdapter, "timm VisionTransformer/DeiT")
register_model("vit_b_16")(torchvision_factory("vit_b_16"))
for _n in ("vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224", "deit_small_patch16_224",
           "deit_tiny_patch16_224", "deit_base_patch16_224",
           # foundation towers as timm builds them (SRD: norm_pre, attention-pool head, distillation token;
           # num_classes defaults as in timm: CLIP 1000 (a fresh head), SigLIP and DINOv2 headless)
           "vit_base_patch16_clip_224", "vit_base_patch16_siglip_224", "deit_small_distilled_patch16_224"):
    register_model(_n)(timm_factory(_n))


def _dinov2_factory(name: str):
    """DINOv2 as timm builds it (518 px position embeddings, so timm checkpoints load strictly) with
    ``dynamic_img_size=True``: the adapter runs it at 224 px, position embeddings resampled as timm does."""
    make = timm_factory(name)

    def build(**kw):
        kw.setdefault("dynamic_img_size", True)
        return make(**kw)

    return build


for _n in ("vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"):
    register_model(_n, input_size=(224, 224))(_dinov2_factory(_n))
