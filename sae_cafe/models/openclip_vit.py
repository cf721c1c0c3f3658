"""open_clip image towers (``open_clip.create_model(name, pretrained=None).visual``, a
``open_clip.transformer.VisionTransformer``): adapter and ViT SRD form.

What SRD explains (and ``adapter(x)`` returns): the tower's output, ``image_embeds`` = ``ln_post`` of the
class token (``pool_type='tok'``; 'avg': of the mean patch token) times the bare projection parameter
``proj`` (D, Dout) — the image embedding whose cosine with a text embedding gives CLIP's zero-shot logits. So
the tower is headless: saliency takes a direction target, e.g. a text embedding (⟨image_embeds, text⟩), or a
linear probe's weight row. Without ``proj`` (``proj=None``) the output is the pooled feature itself.

Layer ids are ``transformer.resblocks.<i>`` (aliases ``<i>`` and ``blocks.<i>``); the class token is the one
prefix token. Weights only from local files: ``open_clip.create_model(name, pretrained="/path/to/file")``
then ``make_adapter(model.visual)``, or ``load_model("openclip_vit_b_16", weights=...)`` with a state dict
of the visual tower. OpenAI CLIP weights need the QuickGELU architecture (``"ViT-B-16-quickgelu"``; open_clip
otherwise builds nn.GELU and the weights run with the wrong activation — SRD explains whatever is built). Pass
the tower (``model.visual``), not the whole CLIP model.

Written by hand (open_clip runs ``nn.MultiheadAttention`` fused kernels, no probabilities): each
``ResidualAttentionBlock`` becomes a :class:`~sae_cafe.srd.vit_types.Block` — ``ln_1``, ``attn.in_proj_weight``
(rows [q; k; v], used as the fused (3D, D) weight as is), scale 1/√(D/H) as ``nn.MultiheadAttention``
applies, ``attn.out_proj`` (with ``ls_1`` folded in), ``ln_2``, ``mlp.c_fc`` → ``mlp.gelu`` (GELU or
QuickGELU, gate frozen) → ``mlp.c_proj``, ``ls_2``; ``ln_pre`` is ``Spec.norm_pre``. CoCa attentional
pooling, custom blocks (qk-norm, scaled cosine attention), sequence-first transformers and patch dropout in
training mode raise UnsupportedModuleError.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModuleError
from .registry import register_adapter, register_model
from .vit import _ViTAdapter

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPViTAdapter(_ViTAdapter):
    """``open_clip.transformer.VisionTransformer`` (the ``.visual`` tower of an open_clip CLIP model)."""

    def __init__(self, model, name, **kw):
        if getattr(model, "output_tokens", False):
            raise UnsupportedModuleError(f"{name}: an open_clip tower built with output_tokens=True returns a "
                                         "tuple; build it with output_tokens=False")
        kw.setdefault("input_size", tuple(model.image_size))
        kw.setdefault("mean", tuple(getattr(model, "image_mean", None) or OPENAI_MEAN))
        kw.setdefault("std", tuple(getattr(model, "image_std", None) or OPENAI_STD))
        super().__init__(model, name, **kw)
        self.patch_size = model.patch_size[0]
        self.num_prefix_tokens = 1

    def block_names(self) -> list[str]:
        return [f"transformer.resblocks.{i}" for i in range(len(self.model.transformer.resblocks))]

    def srd_backend(self):
        from .openclip_vit_spec import OpenCLIPViTBackend

        return OpenCLIPViTBackend(self)


def _factory(arch: str):
    """``open_clip.create_model(arch, pretrained=None).visual`` (random weights, never a download)."""

    def make(**kw) -> nn.Module:
        import open_clip

        return open_clip.create_model(arch, pretrained=None, **kw).visual

    return make


register_adapter("open_clip.transformer.VisionTransformer", OpenCLIPViTAdapter, "open_clip VisionTransformer")
register_model("openclip_vit_b_32")(_factory("ViT-B-32"))
register_model("openclip_vit_b_16")(_factory("ViT-B-16"))
