"""Hugging Face vision transformers as a ViT SRD :class:`~sae_cafe.srd.vit_types.Spec`, and their backend.

Written by hand (transformers has no functional form with frozen attention): each converter reads the
model's own tensors (shared, not copied, except the fused q/k/v weight (3A, D) = cat(W_q, W_k, W_v), the
position embeddings for the input grid and the projected SigLIP probe, all derived from weights alone).
Layouts handled here, per family (transformers ≥ 5 module names):

* ViT: ``embeddings.{cls_token, position_embeddings, patch_embeddings.projection}``; layers
  ``layernorm_before`` → ``attention.{q,k,v,o}_proj`` (scale ``attention.scaling``) → ``layernorm_after`` →
  ``mlp.{fc1, activation_fn, fc2}``; ``layernorm``; pooler dense + tanh (a head chain ending in the frozen
  tanh gate) or the classifier on the class token.
* CLIP: ``class_embedding`` (D,), ``position_embedding`` (an ``nn.Embedding`` read at ``position_ids``),
  ``pre_layrnorm`` (``Spec.norm_pre``), layers ``layer_norm1`` → ``self_attn.{q,k,v,out}_proj`` (scale
  ``self_attn.scale``) → ``layer_norm2`` → ``mlp`` (quick_gelu: x·σ(1.702x), gate frozen); the pooled output
  is ``post_layernorm`` of the class token — as ``Spec.norm`` with a class-token readout, since a LayerNorm
  acts per token — then ``visual_projection`` (no bias) for ``image_embeds``.
* DINOv2: layer scales ``layer_scale{1,2}.lambda1`` (γ₁ folded into the attention output weights, γ₂ as
  ``Block.ls2``), position embeddings for the input grid from the model's own ``interpolate_pos_encoding``
  (bit for bit what the forward adds), classifier on [class token, mean of the patch tokens] (``Spec.pool``
  "cls_avg").
* SigLIP: no class token, ``post_layernorm`` on all tokens, ``SiglipMultiheadAttentionPoolingHead``:
  an ``nn.MultiheadAttention`` (fused ``in_proj_weight``: rows [q; k; v]) of the learned probe over the
  tokens, then p + MLP(LayerNorm(p)) with tanh-GELU → ``Spec.attn_pool``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..srd.vit import ViTBackend
from ..srd.vit_types import LN, AttnPool, Block, Spec
from .hf_vit_layout import layers_path, tower_of


def ln_of(m: nn.Module, where: str) -> LN:
    """A LayerNorm (or Identity) as an :class:`LN`."""
    if isinstance(m, nn.Identity):
        return LN()
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return LN(m.weight, m.bias, float(m.eps), False)
    raise UnsupportedModuleError(f"SRD for Hugging Face ViTs: {where} is a {type(m).__name__}; only "
                                 "nn.LayerNorm is supported there")


def _bias(lin: nn.Linear) -> Tensor:
    return lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)


def hf_attention(at: nn.Module, where: str) -> tuple[Tensor, Tensor, int, float, Tensor, Tensor]:
    """(W_qkv (3A,D), b_qkv (3A,), heads, scale, W_O (D,A), b_O (D,)) of an HF self-attention module with
    separate q/k/v projections (ViT, DINOv2: ``o_proj``/``scaling``; CLIP, SigLIP: ``out_proj``/``scale``)."""
    projs = [getattr(at, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    out = getattr(at, "o_proj", None) or getattr(at, "out_proj", None)
    heads = getattr(at, "num_attention_heads", None) or getattr(at, "num_heads", None)
    scale = getattr(at, "scaling", None) or getattr(at, "scale", None)
    if not all(isinstance(p, nn.Linear) for p in (*projs, out)) or heads is None or scale is None:
        raise UnsupportedModuleError(f"SRD for Hugging Face ViTs: attention {where} ({type(at).__name__}) has no "
                                     "q_proj/k_proj/v_proj/o_proj (or out_proj) Linear layers; this module layout "
                                     "(transformers < 5?) is not supported")
    W = torch.cat([p.weight for p in projs], 0)
    b = torch.cat([_bias(p) for p in projs], 0)
    return W, b, int(heads), float(scale), out.weight, _bias(out)


def _mlp(m: nn.Module, where: str) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    if not (isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear)
            and isinstance(getattr(m, "activation_fn", None), nn.Module)):
        raise UnsupportedModuleError(f"SRD for Hugging Face ViTs: MLP {where} ({type(m).__name__}) is not "
                                     "fc1 → activation_fn → fc2 (SwiGLU MLPs are not supported)")
    return m.fc1, m.activation_fn, m.fc2


def _block(layer: nn.Module, where: str, fam: str) -> Block:
    if fam.startswith("ViT"):
        ln1, ln2, at, mlp, ls1, ls2 = (layer.layernorm_before, layer.layernorm_after, layer.attention, layer.mlp,
                                       None, None)
    elif fam.startswith("Dinov2"):
        ln1, ln2, at, mlp = layer.norm1, layer.norm2, layer.attention, layer.mlp
        ls1, ls2 = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
    else:  # CLIP, SigLIP
        ln1, ln2, at, mlp, ls1, ls2 = layer.layer_norm1, layer.layer_norm2, layer.self_attn, layer.mlp, None, None
    W, b, H, scale, wo, bo = hf_attention(at, f"{where}.attention")
    if ls1 is not None:
        wo, bo = wo * ls1[:, None], bo * ls1
    fc1, act, fc2 = _mlp(mlp, f"{where}.mlp")
    return Block(where, ln_of(ln1, f"{where} first norm"), ln_of(ln2, f"{where} second norm"), W, b, H, scale,
                 None, None, wo, bo, fc1, act, fc2, ls2)


def _positions(emb: nn.Module, fam: str, grid: tuple[int, int], D: int, P: int, like: Tensor) -> Tensor:
    """Position embeddings (prefix + h·w, D) exactly as the forward adds them at this grid."""
    if fam.startswith("Dinov2"):
        with torch.no_grad():
            dummy = like.new_zeros(1, 1 + grid[0] * grid[1], D)
            return emb.interpolate_pos_encoding(dummy, grid[0] * P, grid[1] * P)[0]
    if fam.startswith("ViT"):
        return emb.position_embeddings[0]
    return emb.position_embedding.weight[emb.position_ids[0]]  # CLIP / SigLIP: nn.Embedding at position_ids


def _siglip_pool(head: nn.Module) -> AttnPool:
    mha = head.attention
    if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim or mha.bias_k is not None \
            or mha.add_zero_attn or not mha.batch_first:
        raise UnsupportedModuleError("SRD for Hugging Face ViTs: head.attention must be a plain batch-first "
                                     "nn.MultiheadAttention")
    D, H = mha.embed_dim, mha.num_heads
    e = D // H
    W, b = mha.in_proj_weight, (mha.in_proj_bias if mha.in_proj_bias is not None
                                else mha.in_proj_weight.new_zeros(3 * D))
    with torch.no_grad():  # the probe's query is a constant: derived from weights alone
        q = torch.nn.functional.linear(head.probe[0], W[:D], b[:D]).view(-1, H, e).transpose(0, 1)  # (H,Lq,e)
    fc1, act, fc2 = _mlp(head.mlp, "head.mlp")
    return AttnPool(q, W[D:], b[D:], H, e ** -0.5, None, mha.out_proj.weight, _bias(mha.out_proj),
                    ln_of(head.layernorm, "head.layernorm"), fc1, act, fc2, "token", False)


def hf_spec(wrapper: nn.Module, grid: tuple[int, int] | None = None) -> Spec:
    """The :class:`Spec` of an :class:`~sae_cafe.models.hf_vit.HFVisionOutput` (``grid``: the input's patch
    grid for DINOv2, which interpolates its position embeddings; the config's grid otherwise)."""
    model = wrapper.hf
    fam, tower = tower_of(model)
    emb = tower.embeddings
    conv = emb.patch_embeddings.projection if hasattr(emb, "patch_embeddings") else emb.patch_embedding
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModuleError(f"SRD for Hugging Face ViTs: the patch embedding of {fam} is not a Conv2d")
    cfg = tower.config
    D, P = conv.out_channels, conv.kernel_size[0]
    n = cfg.image_size // P
    gh, gw = grid if grid is not None and fam.startswith("Dinov2") else (n, n)
    pos = _positions(emb, fam, (gh, gw), D, P, conv.weight)
    if fam.startswith("Siglip"):
        prefix, pos_patch = conv.weight.new_zeros(0, D), pos
    else:
        cls = emb.class_embedding if fam.startswith("CLIP") else emb.cls_token[0, 0]
        prefix, pos_patch = (cls + pos[0])[None], pos[1:]
        reg = getattr(emb, "register_tokens", None)  # DINOv2 with registers: after the class token, no position
        if reg is not None:
            prefix = torch.cat([prefix, reg[0]], 0)
    layers = tower.get_submodule(layers_path(fam, tower))
    lp = layers_path(fam, tower)
    blocks = [_block(layer, f"{lp}.{i}", fam) for i, layer in enumerate(layers)]
    norm_pre, attn_pool, pool, head = LN(), None, "token", []
    if fam.startswith("CLIP"):
        norm_pre, norm = ln_of(tower.pre_layrnorm, "pre_layrnorm"), ln_of(tower.post_layernorm, "post_layernorm")
        if fam == "CLIPVisionModelWithProjection":
            proj = model.visual_projection
            head = [("lin", proj.weight, _bias(proj))]
    elif fam.startswith("Siglip"):
        norm, pool, attn_pool = ln_of(tower.post_layernorm, "post_layernorm"), "map", _siglip_pool(tower.head)
    else:
        norm = ln_of(tower.layernorm, "layernorm")
        if wrapper.output == "logits":
            lin = model.classifier
            if isinstance(lin, nn.Linear):
                head = [("lin", lin.weight, _bias(lin))]
            elif not isinstance(lin, nn.Identity):
                raise UnsupportedModuleError(f"SRD for Hugging Face ViTs: classifier {type(lin).__name__}")
            if fam.startswith("Dinov2"):
                pool = "cls_avg"  # [class token, mean of the patch tokens]
        elif wrapper.output == "pooler_output" and fam == "ViTModel":
            pl = model.pooler
            if not isinstance(pl.activation, nn.Tanh | nn.GELU | nn.ReLU | nn.SiLU | nn.Identity):
                raise UnsupportedModuleError(f"SRD for Hugging Face ViTs: pooler activation "
                                             f"{type(pl.activation).__name__} is not supported")
            head = [("lin", pl.dense.weight, _bias(pl.dense))]
            if not isinstance(pl.activation, nn.Identity):
                head.append(("act", pl.activation, None))
    return Spec(fam, conv.weight, conv.bias if conv.bias is not None else conv.weight.new_zeros(D), pos_patch,
                prefix, (gh, gw), P, blocks, norm, pool, False, LN(), head, has_cls=prefix.shape[0] > 0,
                norm_pre=norm_pre, attn_pool=attn_pool)


class HFViTBackend(ViTBackend):
    """:class:`~sae_cafe.srd.vit.ViTBackend` for Hugging Face models: the Spec from :func:`hf_spec`. A
    working copy in another dtype switches eager attention (softmax in float32 even for float64 inputs) to
    ``sdpa`` so that the float64 reference is really float64; the user's model is never changed."""

    def build_spec(self, model: nn.Module, grid: tuple[int, int] | None) -> Spec:
        if model is not self.adapter.model and model.hf.config._attn_implementation == "eager":
            model.hf.set_attn_implementation("sdpa")
        return hf_spec(model, grid)

    def spec(self, x, dtype):
        """As :meth:`ViTBackend.spec`; a model without class outputs (an embedding or pooled feature, even
        behind a projection) is headless: class ids are refused, directions asked for."""
        out = super().spec(x, dtype)
        self.headless = not self.adapter.num_classes
        return out
