"""SAEs on vision layers: load any ``sae_lens.SAE`` from disk, encode/decode layer outputs, splice SAEs into a
model (``run_with_saes``).

sae-lens only splices SAEs into language models (``HookedSAETransformer``); splicing into vision layers,
with ViT class/register tokens passed through unchanged, is written here by hand.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError, MismatchError
from .models import ModelAdapter, PFVBatch, get_adapter, grid_positions


def sae_cfg_dict(path: str | Path) -> dict[str, Any]:
    """The ``cfg.json`` of an SAE directory (sae-lens layout)."""
    p = Path(path) / "cfg.json"
    if not p.exists():
        raise ArtifactError(f"{path} is not an SAE directory (no cfg.json); point to a directory written by "
                            "`sae-cafe train-sae` or sae-lens `save_inference_model`")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p} is corrupt ({e}); re-export the SAE (sae-cafe train-sae or sae-lens "
                            "save_inference_model)") from e


def check_sae(sae: Any, adapter: ModelAdapter | nn.Module, layer: str | int | None = None,
              check_model: bool = True, source: str = "SAE") -> str:
    """Check that ``sae`` fits ``adapter``'s ``layer`` (d_in, hook_name, model); return the layer id.

    ``layer`` defaults to the SAE's ``metadata.hook_name``. Mismatches raise :class:`MismatchError`
    naming both sides.
    """
    adapter = get_adapter(adapter)
    meta = sae.cfg.metadata
    hook = meta.get("hook_name") if meta is not None else None
    if layer is None:
        if hook is None:
            raise MismatchError(f"{source} has no metadata.hook_name; pass the layer id it was trained on")
        layer = hook
    name = adapter.resolve_layer(layer)
    if hook is not None:
        try:
            hook_resolved = adapter.resolve_layer(hook)
        except KeyError:
            hook_resolved = str(hook)
        if hook_resolved != name:
            raise MismatchError(f"{source} was trained on layer {hook!r} (cfg metadata.hook_name) but is used at "
                                f"layer {name!r} of {adapter.name}; use an SAE trained on {name!r} or the "
                                f"layer {hook!r}")
    channels = adapter.layer(name).channels
    if sae.cfg.d_in != channels:
        raise MismatchError(f"{source} has d_in={sae.cfg.d_in} but layer {name!r} of {adapter.name} has "
                            f"{channels} channels; use an SAE trained on this layer")
    if check_model and meta is not None:
        model_name = meta.get("model_name")
        if model_name and model_name != adapter.name:
            raise MismatchError(f"{source} was trained on model {model_name!r} but is used with {adapter.name!r};"
                                " use an SAE trained on this model (or pass check_model=False if the names "
                                "differ for the same network)")
        wh = meta.get("weights_hash")
        if wh and adapter.weights_hash and wh != adapter.weights_hash:
            raise MismatchError(f"{source} was trained on {adapter.name} weights {wh[:12]}… but the model has "
                                f"weights {adapter.weights_hash[:12]}…; retrain the SAE on these weights "
                                "(or pass check_model=False)")
    return name


def load_sae(path: str | Path, adapter: ModelAdapter | nn.Module | None = None, layer: str | int | None = None,
             device: str | torch.device | None = None, check_model: bool = True) -> Any:
    """Load an SAE directory (``cfg.json`` + ``sae_weights.safetensors``) with ``sae_lens.SAE.load_from_disk``.

    With ``adapter`` the SAE is checked against the layer (``layer`` or its ``metadata.hook_name``):
    d_in vs the layer's channels, hook_name vs the layer id, model name/weights hash (``check_model``).
    """
    from sae_lens import SAE

    path = Path(path)
    sae_cfg_dict(path)
    dev = str(device) if device is not None else (str(get_adapter(adapter).device) if adapter is not None
                                                  else "cpu")
    try:
        sae = SAE.load_from_disk(str(path), device=dev)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same user error
        raise ArtifactError(f"SAE at {path} cannot be loaded by sae-lens ({type(e).__name__}: {e}); check "
                            "cfg.json and sae_weights.safetensors or re-export the SAE") from e
    sae.eval()
    if adapter is not None:
        check_sae(sae, adapter, layer, check_model=check_model, source=f"SAE at {path}")
    return sae


def _sae_apply(sae: Any, x: torch.Tensor, fn: str) -> torch.Tensor:
    shape = x.shape
    out = getattr(sae, fn)(x.reshape(-1, shape[-1]).to(sae.dtype))
    return out.reshape(*shape[:-1], out.shape[-1])


def encode_pfv(sae: Any, pfv: torch.Tensor) -> torch.Tensor:
    """PFVs (..., D) → latents (..., S)."""
    return _sae_apply(sae, pfv, "encode")


def decode(sae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (..., S) → reconstructed PFVs (..., D)."""
    return _sae_apply(sae, latents, "decode")


def encode_layer(sae: Any, adapter: ModelAdapter | nn.Module, act: torch.Tensor,
                 return_extra: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Raw layer output → latent maps ``(B, h, w, S)``.

    CNN: one latent vector per spatial position of the (B, C, h, w) map. ViT: per patch token on the patch
    grid; with ``return_extra`` also the latents of the class/register tokens ``(B, E, S)`` (else None).
    """
    adapter = get_adapter(adapter)
    batch = adapter.to_pfv(act)
    h, w = batch.grid
    lat = encode_pfv(sae, batch.pfv)
    maps = lat.reshape(lat.shape[0], h, w, lat.shape[-1])
    if not return_extra:
        return maps
    extra = encode_pfv(sae, batch.extra) if batch.extra is not None and batch.extra.shape[1] else None
    return maps, extra


def decode_layer(sae: Any, adapter: ModelAdapter | nn.Module, latents_BhwS: torch.Tensor,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """Latent maps (B, h, w, S) → layer-shaped output (CNN (B, C, h, w); ViT (B, T, D) with ``extra``
    prefix tokens (B, E, D), required for ViTs)."""
    adapter = get_adapter(adapter)
    B, h, w, _ = latents_BhwS.shape
    rec = decode(sae, latents_BhwS.reshape(B, h * w, -1))
    return adapter.from_pfv(PFVBatch(rec, grid_positions(h, w, rec.device), (h, w), extra))


def reconstruct_layer(sae: Any, adapter: ModelAdapter, act: torch.Tensor, keep_error: bool = False
                      ) -> torch.Tensor:
    """SAE reconstruction of a raw layer output, same shape; prefix tokens unchanged.

    ``keep_error``: add the (detached) reconstruction error, so the value equals ``act`` while gradients
    flow through the SAE (like sae-lens ``use_error_term``).
    """
    batch = adapter.to_pfv(act)
    rec = decode(sae, encode_pfv(sae, batch.pfv)).to(act.dtype)
    if keep_error:
        rec = rec + (batch.pfv - rec).detach()
    return adapter.from_pfv(PFVBatch(rec, batch.positions, batch.grid, batch.extra))


@contextlib.contextmanager
def spliced(model: ModelAdapter | nn.Module, saes: Mapping[str | int, Any], keep_error: bool = False,
            check: bool = True) -> Iterator[ModelAdapter]:
    """Context manager: while active, every forward of the model uses the SAE reconstructions at the layers."""
    adapter = get_adapter(model)
    resolved = {}
    for layer, sae in saes.items():
        name = check_sae(sae, adapter, layer, check_model=False) if check else adapter.resolve_layer(layer)
        resolved[name] = sae

    def make(sae: Any):
        def hook(_m, _i, out):
            return reconstruct_layer(sae, adapter, out, keep_error=keep_error)
        return hook

    with adapter.hooks({n: make(s) for n, s in resolved.items()}):
        yield adapter


def run_with_saes(model: ModelAdapter | nn.Module, x: torch.Tensor, saes: Mapping[str | int, Any],
                  keep_error: bool = False, check: bool = True) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (N,3,H,W) with each layer's output replaced by its SAE reconstruction.

    ``saes``: ``{layer id: sae_lens.SAE}``; ViT class/register tokens pass through unchanged;
    ``keep_error`` adds the SAE error term back (same output, gradients through the SAE).
    """
    with spliced(model, saes, keep_error=keep_error, check=check) as adapter:
        return adapter.model(x)


def sae_layer(sae: Any) -> str | None:
    """The layer id an SAE was trained on (``cfg.metadata.hook_name``)."""
    meta = sae.cfg.metadata
    return meta.get("hook_name") if meta is not None else None

