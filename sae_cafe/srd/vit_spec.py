"""torchvision and timm ViTs as a :class:`~sae_cafe.srd.vit_types.Spec` (the SRD form of the model).

Written by hand: the libraries expose no functional form with their attention probabilities. timm variants:
class / register / distillation tokens, ``no_embed_class``, ``norm_pre`` (CLIP), layer scale (DINOv2),
``global_pool`` "token" / "avg" / "map" (``AttentionPoolLatent``, SigLIP), ``fc_norm``, headless models
(``num_classes=0``), distilled DeiT (two heads averaged), ``dynamic_img_size`` (position embeddings
resampled by timm's own function). Anything else raises ``UnsupportedModuleError`` naming the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .vit_types import LN, AttnPool, Block, Spec


def _ln(m: nn.Module, where: str) -> LN:
    if isinstance(m, nn.Identity):
        return LN()
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return LN(m.weight, m.bias, float(m.eps), False)
    raise UnsupportedModuleError(f"SRD for ViTs: {where} is a {type(m).__name__}; only nn.LayerNorm (or "
                                 "Identity) is supported there")


def _zeros_if_none(b: Tensor | None, n: int, like: Tensor) -> Tensor:
    return b if b is not None else like.new_zeros(n)


def _mlp(m: nn.Module, where: str) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """fc1, activation, fc2 of a torchvision MLPBlock or a timm Mlp (dropouts are identities at eval)."""
    if isinstance(m, nn.Sequential):
        kids = [k for k in m if not isinstance(k, nn.Dropout | nn.Identity)]
        if len(kids) == 3 and isinstance(kids[0], nn.Linear) and isinstance(kids[2], nn.Linear):
            return kids[0], kids[1], kids[2]
    elif type(m).__name__ == "Mlp" and isinstance(getattr(m, "norm", None), nn.Identity) \
            and all(isinstance(getattr(m, a, None), nn.Linear) for a in ("fc1", "fc2")):
        return m.fc1, m.act, m.fc2
    raise UnsupportedModuleError(f"SRD for ViTs: MLP {where} ({type(m).__name__}) is not supported; expected "
                                 "Linear → activation → Linear (torchvision MLPBlock, timm Mlp)")


def _head_chain(mods: list[tuple[str, nn.Module]]) -> list[tuple[str, object, object]]:
    """("lin", W, b) / ("act", module, None) records of a head; [] for an Identity head (headless)."""
    chain: list[tuple[str, object, object]] = []
    for name, m in mods:
        if isinstance(m, nn.Dropout | nn.Identity):
            continue
        if isinstance(m, nn.Linear):
            chain.append(("lin", m.weight, _zeros_if_none(m.bias, m.out_features, m.weight)))
        elif isinstance(m, nn.Tanh | nn.GELU | nn.ReLU | nn.SiLU):
            chain.append(("act", m, None))
        else:
            raise UnsupportedModuleError(f"SRD for ViTs: head module {name} ({type(m).__name__}) is not "
                                         "supported")
    if chain and chain[-1][0] != "lin":
        raise UnsupportedModuleError("SRD for ViTs: a head must end in nn.Linear (or be absent: a headless "
                                     "backbone explains its pooled feature)")
    return chain


def spec_torchvision(model: nn.Module) -> Spec:
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise UnsupportedModuleError("SRD for ViTs: torchvision conv stems (conv_stem_configs) are not "
                                     "supported")
    conv = model.conv_proj
    D = conv.out_channels
    pos = model.encoder.pos_embedding[0]
    blocks = []
    for name, blk in model.encoder.layers.named_children():
        mha = blk.self_attention
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim \
                or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModuleError(f"SRD for ViTs: attention encoder.layers.{name}.self_attention "
                                         "must be a plain nn.MultiheadAttention")
        W, b = mha.in_proj_weight, _zeros_if_none(mha.in_proj_bias, 3 * D, mha.in_proj_weight)
        fc1, act, fc2 = _mlp(blk.mlp, f"encoder.layers.{name}.mlp")
        where = f"encoder.layers.{name}"
        blocks.append(Block(where, _ln(blk.ln_1, f"{where}.ln_1"), _ln(blk.ln_2, f"{where}.ln_2"),
                            W, b, mha.num_heads,
                            (D // mha.num_heads) ** -0.5, None, None, mha.out_proj.weight,
                            _zeros_if_none(mha.out_proj.bias, D, W), fc1, act, fc2, None))
    n = model.image_size // model.patch_size
    return Spec(type(model).__name__, conv.weight, _zeros_if_none(conv.bias, D, conv.weight), pos[1:],
                model.class_token[0] + pos[:1], (n, n), model.patch_size, blocks,
                _ln(model.encoder.ln, "encoder.ln"), "token", False, LN(),
                _head_chain(list(model.heads.named_children())))


def _pos_for_grid(model: nn.Module, grid: tuple[int, int]) -> Tensor | None:
    """timm's position embedding (1, n, D) for a patch grid, resampled as ``_pos_embed`` does under
    ``dynamic_img_size`` (timm's own ``resample_abs_pos_embed``, so the values match bit for bit)."""
    if model.pos_embed is None:
        return None
    if tuple(grid) == tuple(model.patch_embed.grid_size):
        return model.pos_embed
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        return resample_abs_pos_embed(model.pos_embed, new_size=grid, old_size=model.patch_embed.grid_size,
                                      num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)


def _scale(m: nn.Module, e: int) -> float:
    """The attention scale the module really applies: timm's fused path (scaled_dot_product_attention)
    ignores ``m.scale`` and uses 1/√e."""
    return e ** -0.5 if getattr(m, "fused_attn", False) else float(m.scale)


def _attn_pool(ap: nn.Module, include_prefix: bool) -> AttnPool:
    """timm ``AttentionPoolLatent`` as an :class:`AttnPool` (queries projected once, under no_grad)."""
    if type(ap).__name__ != "AttentionPoolLatent" or getattr(ap, "pos_embed", None) is not None \
            or ap.pool not in ("token", "avg"):
        raise UnsupportedModuleError(f"SRD for ViTs: attn_pool ({type(ap).__name__}) is not supported; only "
                                     "timm AttentionPoolLatent without pos_embed, pool_type 'token' or 'avg'")
    H, e = ap.num_heads, ap.head_dim
    with torch.no_grad():
        q = ap.q(ap.latent).reshape(1, ap.latent_len, H, e).transpose(1, 2)
        q = ap.q_norm(q)[0]  # (H, Lq, e)
    A = ap.kv.out_features // 2
    kn = None if isinstance(ap.k_norm, nn.Identity) else ap.k_norm.forward
    if ap.mlp is None:
        if not isinstance(ap.proj, nn.Identity):
            raise UnsupportedModuleError("SRD for ViTs: attn_pool with a projection but no MLP")
        eye = torch.eye(A, dtype=ap.kv.weight.dtype, device=ap.kv.weight.device)
        wo, bo, fc1, act, fc2 = eye, eye.new_zeros(A), None, None, None
    else:
        fc1, act, fc2 = _mlp(ap.mlp, "attn_pool.mlp")
        wo, bo = ap.proj.weight, _zeros_if_none(ap.proj.bias, ap.proj.out_features, ap.proj.weight)
    return AttnPool(q, ap.kv.weight, _zeros_if_none(ap.kv.bias, 2 * A, ap.kv.weight), H, _scale(ap, e), kn,
                    wo, bo, _ln(ap.norm, "attn_pool.norm"), fc1, act, fc2, ap.pool, include_prefix)


def spec_timm(model: nn.Module, grid: tuple[int, int] | None = None) -> Spec:
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled`` (``grid``: the patch grid of the input for
    ``dynamic_img_size`` models; default the model's own)."""
    from timm.models.vision_transformer import Block as TimmBlock

    pe = model.patch_embed
    if not isinstance(pe.proj, nn.Conv2d) or not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModuleError("SRD for ViTs: patch_embed must be a Conv2d without a norm")
    if getattr(pe, "dynamic_img_pad", False):
        raise UnsupportedModuleError("SRD for ViTs: dynamic_img_pad=True is not supported (give images whose "
                                     "sides are multiples of the patch size)")
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        pool = "map"
    elif model.global_pool in ("token", "avg"):
        pool = model.global_pool
    else:
        raise UnsupportedModuleError(f"SRD for ViTs: global_pool={model.global_pool!r} is not supported "
                                     "(use 'token', 'avg' or 'map')")
    dist = getattr(model, "dist_token", None)
    if dist is not None and (pool != "token" or not isinstance(model.fc_norm, nn.Identity)):
        raise UnsupportedModuleError("SRD for ViTs: a distilled model must read its class and distillation "
                                     "tokens directly (global_pool='token', no fc_norm)")
    conv = pe.proj
    D = conv.out_channels
    E = model.num_prefix_tokens
    gh, gw = grid if grid is not None and model.dynamic_img_size else pe.grid_size
    pe_full = _pos_for_grid(model, (gh, gw))
    pos = pe_full[0] if pe_full is not None else conv.weight.new_zeros(gh * gw + E, D)
    pre = [t[0] for t in (model.cls_token, dist, model.reg_token) if t is not None]
    prefix = torch.cat(pre, 0) if pre else conv.weight.new_zeros(0, D)
    if prefix.shape[0] != E:
        raise UnsupportedModuleError(f"SRD for ViTs: {type(model).__name__} has {E} prefix tokens but "
                                     f"{prefix.shape[0]} class/distillation/register token parameters")
    if model.no_embed_class or model.pos_embed is None:
        pos_patch = pos if model.pos_embed is not None else pos[E:]
    else:
        prefix, pos_patch = prefix + pos[:E], pos[E:]
    blocks = []
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        at = blk.attn
        if type(blk) is not TimmBlock or not hasattr(at, "qkv") or getattr(at, "gate", None) is not None \
                or not isinstance(getattr(at, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModuleError(f"SRD for ViTs: {where} ({type(blk).__name__}/{type(at).__name__}) "
                                         "is not a pre-LN timm Block with plain qkv attention")
        A = at.qkv.out_features // 3
        Wqkv, bqkv = at.qkv.weight, _zeros_if_none(at.qkv.bias, 3 * A, at.qkv.weight)
        g1 = _ls(blk.ls1, where)
        wo, bo = at.proj.weight, _zeros_if_none(at.proj.bias, D, at.proj.weight)
        if g1 is not None:
            wo, bo = wo * g1[:, None], bo * g1
        fc1, act, fc2 = _mlp(blk.mlp, f"{where}.mlp")
        qn = None if isinstance(at.q_norm, nn.Identity) else at.q_norm.forward
        kn = None if isinstance(at.k_norm, nn.Identity) else at.k_norm.forward
        blocks.append(Block(where, _ln(blk.norm1, f"{where}.norm1"), _ln(blk.norm2, f"{where}.norm2"),
                            Wqkv, bqkv, at.num_heads, _scale(at, A // at.num_heads), qn, kn, wo, bo, fc1, act, fc2,
                            _ls(blk.ls2, where)))
    include = bool(getattr(model, "pool_include_prefix", False))
    return Spec(type(model).__name__, conv.weight, _zeros_if_none(conv.bias, D, conv.weight), pos_patch,
                prefix, (gh, gw), pe.patch_size[0], blocks, _ln(model.norm, "norm"), pool, include,
                _ln(model.fc_norm, "fc_norm"), _head_chain([("head", model.head)]),
                has_cls=model.cls_token is not None, norm_pre=_ln(model.norm_pre, "norm_pre"),
                attn_pool=_attn_pool(attn_pool, include) if attn_pool is not None else None,
                dist_head=_head_chain([("head_dist", model.head_dist)]) if dist is not None else None)


def _ls(m: nn.Module, where: str) -> Tensor | None:
    if isinstance(m, nn.Identity):
        return None
    if hasattr(m, "gamma") and type(m).__name__ == "LayerScale":
        return m.gamma
    raise UnsupportedModuleError(f"SRD for ViTs: layer scale in {where} ({type(m).__name__}) is not "
                                 "supported")


def make_spec(m: nn.Module, grid: tuple[int, int] | None = None) -> Spec:
    """Weights of a torchvision or timm ViT as a :class:`Spec` (tensors shared with the model, not copied).

    ``grid``: the input's patch grid, used by models that accept other input sizes (timm
    ``dynamic_img_size=True``: position embeddings resampled as timm does); ignored otherwise."""
    import torchvision

    if isinstance(m, torchvision.models.VisionTransformer):
        return spec_torchvision(m)
    return spec_timm(m, grid)


