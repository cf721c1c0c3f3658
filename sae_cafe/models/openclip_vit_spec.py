"""open_clip ``VisionTransformer`` towers as a ViT SRD :class:`~sae_cafe.srd.vit_types.Spec`, and their backend
(the layout is described in :mod:`sae_cafe.models.openclip_vit`). Written by hand: open_clip exposes no
functional form with its attention probabilities. Tensors are shared with the model (``proj.T`` is a view)
except the layer-scaled attention output weights."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..srd.vit import ViTBackend
from ..srd.vit_types import LN, Block, Spec
from .hf_vit_spec import ln_of


def _zeros(b: Tensor | None, n: int, like: Tensor) -> Tensor:
    return b if b is not None else like.new_zeros(n)


def _ls(m: nn.Module, where: str) -> Tensor | None:
    if isinstance(m, nn.Identity):
        return None
    if type(m).__name__ == "LayerScale" and isinstance(getattr(m, "gamma", None), Tensor):
        return m.gamma
    raise UnsupportedModuleError(f"SRD for open_clip: layer scale {where} ({type(m).__name__}) is not supported")


def resblock(blk: nn.Module, where: str) -> Block:
    """One open_clip ``ResidualAttentionBlock`` as a :class:`Block`."""
    if type(blk).__name__ != "ResidualAttentionBlock" or hasattr(blk, "ln_1_kv"):
        raise UnsupportedModuleError(f"SRD for open_clip: {where} is a {type(blk).__name__}; only the plain "
                                     "ResidualAttentionBlock (no cross-attention) is supported")
    mha = blk.attn
    if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim or mha.bias_k is not None \
            or mha.add_zero_attn or not mha.batch_first:
        raise UnsupportedModuleError(f"SRD for open_clip: {where}.attn must be a plain batch-first "
                                     "nn.MultiheadAttention")
    D, H = mha.embed_dim, mha.num_heads
    W = mha.in_proj_weight
    b = _zeros(mha.in_proj_bias, 3 * D, W)
    wo, bo = mha.out_proj.weight, _zeros(mha.out_proj.bias, D, W)
    g1 = _ls(blk.ls_1, f"{where}.ls_1")
    if g1 is not None:
        wo, bo = wo * g1[:, None], bo * g1
    kids = [k for k in blk.mlp if not isinstance(k, nn.Dropout | nn.Identity)]
    if len(kids) != 3 or not isinstance(kids[0], nn.Linear) or not isinstance(kids[2], nn.Linear):
        raise UnsupportedModuleError(f"SRD for open_clip: {where}.mlp is not Linear → activation → Linear")
    return Block(where, ln_of(blk.ln_1, f"{where}.ln_1"), ln_of(blk.ln_2, f"{where}.ln_2"), W, b, H,
                 (D // H) ** -0.5, None, None, wo, bo, kids[0], kids[1], kids[2], _ls(blk.ls_2, f"{where}.ls_2"))


def openclip_spec(v: nn.Module) -> Spec:
    """The :class:`Spec` of an open_clip ``VisionTransformer``."""
    if getattr(v, "attn_pool", None) is not None:
        raise UnsupportedModuleError("SRD for open_clip: attentional pooling (CoCa) is not supported")
    if v.pool_type not in ("tok", "avg"):
        raise UnsupportedModuleError(f"SRD for open_clip: pool_type={v.pool_type!r} is not supported "
                                     "('tok' or 'avg')")
    if not getattr(v.transformer, "batch_first", True):
        raise UnsupportedModuleError("SRD for open_clip: a sequence-first transformer (batch_first=False) is "
                                     "not supported")
    if not isinstance(v.patch_dropout, nn.Identity) and v.patch_dropout.training:
        raise UnsupportedModuleError("SRD for open_clip: patch dropout in training mode")
    conv = v.conv1
    D = conv.out_channels
    pos = v.positional_embedding  # (1 + h·w, D)
    blocks = [resblock(b, f"transformer.resblocks.{i}") for i, b in enumerate(v.transformer.resblocks)]
    post = ln_of(v.ln_post, "ln_post")
    # ln_post per token before a token / mean readout; after pooling (final_ln_after_pool) for 'avg' only
    after = bool(v.final_ln_after_pool) and v.pool_type == "avg"
    head = [] if v.proj is None else [("lin", v.proj.T, v.proj.new_zeros(v.proj.shape[1]))]
    return Spec(type(v).__name__, conv.weight, _zeros(conv.bias, D, conv.weight), pos[1:],
                (v.class_embedding + pos[0])[None], tuple(v.grid_size), v.patch_size[0], blocks,
                LN() if after else post, "token" if v.pool_type == "tok" else "avg", False,
                post if after else LN(), head, norm_pre=ln_of(v.ln_pre, "ln_pre"))


class OpenCLIPViTBackend(ViTBackend):
    """:class:`~sae_cafe.srd.vit.ViTBackend` for open_clip towers (Spec from :func:`openclip_spec`)."""

    def build_spec(self, model: nn.Module, grid: tuple[int, int] | None) -> Spec:  # noqa: ARG002
        return openclip_spec(model)

    def spec(self, x, dtype):
        """As :meth:`ViTBackend.spec`; a model without class outputs (an embedding or pooled feature, even
        behind a projection) is headless: class ids are refused, directions asked for."""
        out = super().spec(x, dtype)
        self.headless = not self.adapter.num_classes
        return out
