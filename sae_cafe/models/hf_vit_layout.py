"""Which Hugging Face vision classes sae-cafe explains, and where their parts live (shared by the adapter in
:mod:`sae_cafe.models.hf_vit` and the SRD conversion in :mod:`sae_cafe.models.hf_vit_spec`)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModuleError
from .base import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

_T = "transformers.models."
#: class name → (module path, tower attribute ("" = the model itself), output field, mean, std)
FAMILIES: dict[str, tuple[str, str, str, tuple, tuple]] = {
    "ViTModel": (_T + "vit.modeling_vit", "", "pooler_output", HALF, HALF),
    "ViTForImageClassification": (_T + "vit.modeling_vit", "vit", "logits", HALF, HALF),
    "CLIPVisionModel": (_T + "clip.modeling_clip", "", "pooler_output", CLIP_MEAN, CLIP_STD),
    "CLIPVisionModelWithProjection": (_T + "clip.modeling_clip", "vision_model", "image_embeds", CLIP_MEAN,
                                      CLIP_STD),
    "Dinov2Model": (_T + "dinov2.modeling_dinov2", "", "pooler_output", IMAGENET_MEAN, IMAGENET_STD),
    "Dinov2ForImageClassification": (_T + "dinov2.modeling_dinov2", "dinov2", "logits", IMAGENET_MEAN,
                                     IMAGENET_STD),
    "Dinov2WithRegistersModel": (_T + "dinov2_with_registers.modeling_dinov2_with_registers", "", "pooler_output",
                                 IMAGENET_MEAN, IMAGENET_STD),
    "Dinov2WithRegistersForImageClassification": (_T + "dinov2_with_registers.modeling_dinov2_with_registers",
                                                  "dinov2_with_registers", "logits", IMAGENET_MEAN, IMAGENET_STD),
    "SiglipVisionModel": (_T + "siglip.modeling_siglip", "", "pooler_output", HALF, HALF),
}


def _family(model: nn.Module) -> str:
    for klass in type(model).__mro__:
        if klass.__name__ in FAMILIES and klass.__module__ == FAMILIES[klass.__name__][0]:
            return klass.__name__
    raise UnsupportedModuleError(f"Hugging Face model {type(model).__name__} is not supported by sae-cafe; "
                                 f"supported: {', '.join(FAMILIES)}")


def tower_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(family class name, the vision tower holding embeddings/encoder) of a supported Hugging Face model."""
    fam = _family(model)
    attr = FAMILIES[fam][1]
    return fam, (getattr(model, attr) if attr else model)


def layers_path(fam: str, tower: nn.Module) -> str:
    """Module path of the transformer layer list inside the tower."""
    if fam.startswith("Dinov2"):
        return "encoder.layer"
    if fam.startswith("ViT"):
        return "layers"
    return "encoder.layers"
