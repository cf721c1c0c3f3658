"""Hook names of outside SAEs → sae-cafe layer ids (module paths of the model as constructed).

sae-cafe's ViT layers are block outputs (the residual stream after block ``i``). Outside tools name that
point differently:

=====================================  =========================================  ==========================
source                                 name of "output of block i"                sae-cafe layer id
=====================================  =========================================  ==========================
ViT-Prisma / TransformerLens hooks     ``blocks.i.hook_resid_post``               block ``i``
                                       ``blocks.(i+1).hook_resid_pre``            block ``i``
saev (``--layer``; negative counts     ``i`` / ``-k``                             block ``i`` / ``n_blocks-k``
from the end, as saev's ``layer``)
timm ``VisionTransformer``             ``blocks.i``                               ``blocks.i``
Hugging Face ViT / DINOv2              ``encoder.layer.i``                        ``hf.…layer.i`` (adapter)
Hugging Face CLIP / SigLIP towers      ``vision_model.encoder.layers.i``          ``hf.…layers.i`` (adapter)
open_clip visual towers                ``transformer.resblocks.i`` (also          ``transformer.resblocks.i``
                                       ``visual.transformer.resblocks.i``)
torchvision ``VisionTransformer``      ``encoder.layers.encoder_layer_i``         same
=====================================  =========================================  ==========================

The block index found is handed to the model adapter (``adapter.resolve_layer``), so a hook written for one
family maps onto the same block of another family (e.g. a saev DINOv2 SAE on an HF ``Dinov2Model``).
Hooks inside a block (``hook_mlp_out``, ``hook_attn_out``, ``hook_resid_mid``, ``ln1.hook_normalized``,
``attn.hook_z`` …) are not block outputs: they are refused with a clear error, never mapped to a neighbour.
"""

from __future__ import annotations

import re

from ..errors import MismatchError, UnknownLayerError

_RESID = re.compile(r"^(?:[\w.]*\.)?blocks\.(\d+)\.hook_resid_(post|pre)$")
_TL_INNER = re.compile(r"^(?:[\w.]*\.)?blocks\.(\d+)\.(.+)$")
#: module paths of the supported ViT families whose last component is the block index
_BLOCK_PATHS = (
    re.compile(r"^(?:[\w.]*\.)?blocks\.(\d+)$"),
    re.compile(r"^(?:[\w.]*\.)?encoder\.layers?\.(\d+)$"),
    re.compile(r"^(?:[\w.]*\.)?transformer\.resblocks\.(\d+)$"),
    re.compile(r"^(?:[\w.]*\.)?encoder\.layers\.encoder_layer_(\d+)$"),
)


def _block(adapter, index: int, source: str) -> str:
    names = list(adapter.layers()) if adapter.kind == "tokens" else []
    if not names:
        raise MismatchError(f"{source} names a transformer block, but model {adapter.name!r} has no blocks "
                            f"(family {adapter.family!r}); convert it for a ViT model or pass --layer with one "
                            f"of {list(adapter.layers())[:12]}")
    if index < 0:
        index += len(names)
    if not 0 <= index < len(names):
        raise MismatchError(f"{source} names block {index} but model {adapter.name!r} has {len(names)} blocks "
                            f"(0…{len(names) - 1}); is it the model the SAE was trained on?")
    return names[index]


def map_hook_name(hook: str | int, adapter, source: str = "the SAE") -> str:
    """The sae-cafe layer id of an outside hook / layer name on ``adapter``'s model (see the module table).

    Raises :class:`MismatchError` for hooks that are not block outputs or that name a block the model lacks,
    and :class:`~sae_cafe.errors.UnknownLayerError` for names matching nothing (the error lists valid ids).
    """
    key = str(hook).strip()
    where = f"{source} (hook {key!r})"
    try:
        return adapter.resolve_layer(key)
    except UnknownLayerError:
        pass
    if re.fullmatch(r"-?\d+", key):
        return _block(adapter, int(key), where)
    m = _RESID.match(key)
    if m:
        i = int(m.group(1))
        if m.group(2) == "pre":
            if i == 0:
                raise MismatchError(f"{where} is the input of block 0 (the patch embedding), which is not a "
                                    "sae-cafe layer; only block outputs are")
            i -= 1
        return _block(adapter, i, where)
    for pat in _BLOCK_PATHS:
        m = pat.match(key)
        if m:
            return _block(adapter, int(m.group(1)), where)
    m = _TL_INNER.match(key)
    if m:
        raise MismatchError(f"{where} is inside block {m.group(1)} ({m.group(2)!r}), not a block output; "
                            "sae-cafe splices SAEs at block outputs (the residual stream, hook_resid_post), so "
                            "this SAE cannot be used here")
    raise UnknownLayerError(f"{key} (from {source})", adapter.name, list(adapter.layers()))
