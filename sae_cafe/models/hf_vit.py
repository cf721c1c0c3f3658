"""Hugging Face ``transformers`` vision transformers: adapters and their SRD form.

Supported (transformers ≥ 5 module layout, as installed): ``ViTModel`` / ``ViTForImageClassification``,
``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``, ``Dinov2Model`` / ``Dinov2ForImageClassification``
and ``SiglipVisionModel``. Which output SRD explains (and ``adapter(x)`` returns), per class:

====================================  ==========================================================================
``ViTForImageClassification``         ``logits`` (classifier on the class token after the final LayerNorm)
``ViTModel``                          ``pooler_output`` (dense + tanh on the class token); without a pooler the
                                      class token of ``last_hidden_state``
``CLIPVisionModel``                   ``pooler_output`` (``post_layernorm`` of the class token)
``CLIPVisionModelWithProjection``     ``image_embeds`` (``visual_projection`` of the pooled output, no bias)
``Dinov2Model``                       ``pooler_output`` (class token after the final LayerNorm)
``Dinov2ForImageClassification``      ``logits`` (classifier on [class token, mean of the patch tokens])
``SiglipVisionModel``                 ``pooler_output`` (the attention-pool head ``SiglipMultiheadAttention
                                      PoolingHead``)
====================================  ==========================================================================

``Dinov2WithRegistersModel`` / ``Dinov2WithRegistersForImageClassification`` read like DINOv2 (register tokens
follow the class token, without position embeddings; they are prefix tokens, kept apart from the patches).

Towers without a classifier are headless: saliency takes a direction target (⟨output, d⟩). The adapter wraps
the Hugging Face model in :class:`HFVisionOutput`, a module whose ``forward(x)`` returns that tensor (so every
tool that calls ``adapter.model(x)`` sees a tensor); layer ids are the wrapper's module paths
(``hf.encoder.layers.3``), with the Hugging Face path (``encoder.layers.3``), the block index (``3``) and
``blocks.3`` as aliases. Load a checkpoint from a local folder only: ``CLIPVisionModel.from_pretrained(path)``
with ``HF_HUB_OFFLINE=1`` set (no hub access at run time), then ``make_adapter(model)``.

Written by hand because transformers exposes no functional form with frozen attention probabilities: the
conversion reads the q/k/v projections (separate ``nn.Linear``, fused here into one (3A, D) weight), the
attention scale the module applies, the MLP (``quick_gelu`` for OpenAI CLIP, tanh-GELU for SigLIP: any
element-wise activation, its gate frozen), layer scale (DINOv2, folded into the attention output weights),
``pre_layrnorm`` (CLIP: ``Spec.norm_pre``) and the readout. The SRD backend checks that the converted forward
reproduces the model's output before any map is computed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .hf_vit_layout import FAMILIES, layers_path, tower_of
from .registry import register_adapter, register_model
from .vit import _ViTAdapter


class HFVisionOutput(nn.Module):
    """A Hugging Face vision model as a tensor-valued module: ``forward(x)`` (N,3,H,W) → the explained output
    (N, K) (see the module docstring). ``dynamic_img_size``: the model takes any multiple of the patch size
    (DINOv2 always interpolates its position embeddings)."""

    def __init__(self, hf: nn.Module, output: str, dynamic_img_size: bool = False):
        super().__init__()
        self.hf = hf
        self.output = output
        self.dynamic_img_size = dynamic_img_size

    def forward(self, x: Tensor) -> Tensor:
        out = self.hf(pixel_values=x)
        if self.output == "cls":
            return out.last_hidden_state[:, 0]
        return getattr(out, self.output)


class HFViTAdapter(_ViTAdapter):
    """Hugging Face ViT / CLIP / DINOv2 / SigLIP vision models (see :mod:`sae_cafe.models.hf_vit`). The model
    is wrapped in :class:`HFVisionOutput`; ``adapter.hf`` is the model as given."""

    def __init__(self, model, name, **kw):
        wrapper = model if isinstance(model, HFVisionOutput) else None  # get_adapter(adapter.model) works too
        model = wrapper.hf if wrapper is not None else model
        fam, tower = tower_of(model)
        _, attr, output, mean, std = FAMILIES[fam]
        cfg = model.config
        vcfg = getattr(cfg, "vision_config", cfg)
        if fam == "ViTModel" and getattr(model, "pooler", None) is None:
            output = "cls"
        output = wrapper.output if wrapper is not None else output
        if fam == "SiglipVisionModel" and not getattr(model, "use_head", False):
            raise UnsupportedModuleError(f"{name}: SiglipVisionModel without its attention-pool head "
                                         "(vision_use_head=False) has no pooled output to explain")
        P = int(vcfg.patch_size)
        side = int(vcfg.image_size)
        dynamic = fam.startswith("Dinov2")
        if dynamic and side > 224 and 224 % P == 0:
            side = 224  # DINOv2 checkpoints are built at 518 px and run at 224 (position embeddings interpolated)
        kw.setdefault("input_size", (side, side))
        kw.setdefault("mean", mean)
        kw.setdefault("std", std)
        n_labels = int(getattr(cfg, "num_labels", 0) or 0) if output == "logits" else 0
        if n_labels:
            kw.setdefault("num_classes", n_labels)
            names = [str(cfg.id2label.get(i, i)) for i in range(n_labels)] if getattr(cfg, "id2label", None) else []
            if names and names != [f"LABEL_{i}" for i in range(n_labels)]:
                kw.setdefault("class_names", names)
        super().__init__(wrapper if wrapper is not None else HFVisionOutput(model, output, dynamic), name, **kw)
        self.hf = model
        self.hf_family = fam
        self.patch_size = P
        self.num_prefix_tokens = 0 if fam.startswith("Siglip") else 1 + int(getattr(vcfg, "num_register_tokens", 0))
        self._tower_path = "hf" + (f".{attr}" if attr else "")
        self._layers_path = layers_path(fam, tower)

    def block_names(self) -> list[str]:
        tower = self.model.get_submodule(self._tower_path)
        n = len(tower.get_submodule(self._layers_path))
        return [f"{self._tower_path}.{self._layers_path}.{i}" for i in range(n)]

    def _layer_aliases(self) -> dict[str, str]:
        aliases = super()._layer_aliases()
        aliases.update({n[3:]: n for n in self.block_names()})  # the Hugging Face model's own paths
        return aliases

    def srd_backend(self):
        from .hf_vit_spec import HFViTBackend

        return HFViTBackend(self)


for _cls in FAMILIES:
    register_adapter(f"{FAMILIES[_cls][0]}.{_cls}", HFViTAdapter, f"Hugging Face {_cls}")
register_adapter(HFVisionOutput, HFViTAdapter, "sae-cafe HFVisionOutput (a wrapped Hugging Face model)")


# ----- named constructors (random weights; configs of the public checkpoints) ----------------------------
def _hf_factory(cls_name: str, config_name: str, **cfg):
    def make(**kw) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**{**cfg, **kw})
        return getattr(transformers, cls_name)(config)

    return make


register_model("hf_vit_base_patch16_224")(_hf_factory("ViTForImageClassification", "ViTConfig", num_labels=1000))
register_model("hf_clip_vit_base_patch16")(_hf_factory("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                                                        patch_size=16, projection_dim=512))
register_model("hf_dinov2_small")(_hf_factory("Dinov2Model", "Dinov2Config", hidden_size=384,
                                              num_attention_heads=6, image_size=518, patch_size=14))
register_model("hf_siglip_base_patch16_224")(_hf_factory("SiglipVisionModel", "SiglipVisionConfig"))
