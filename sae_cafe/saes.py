"""SAEs on vision layers: load any ``sae_lens.SAE`` from disk, encode/decode layer outputs, splice SAEs into a
model (``run_with_saes``).

sae-lens only splices SAEs into language models (``HookedSAETransformer``); splicing into vision layers,
with ViT class/register tokens passed through unchanged, and editing latents there (interventions) are written
here by hand.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError, MismatchError
from .interventions import Intervention, edit_latents, group_interventions
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


def check_sae_fits(sae: Any, d_in: int, layer: str, model: str, where: str, weights_hash: str | None = None,
                   check_model: bool = True, source: str = "SAE", resolve: Any = None) -> None:
    """The one SAE compatibility check: ``sae`` against a layer with ``d_in`` channels named ``layer`` of model
    ``model`` (``where`` names it in messages, e.g. ``"layer 'layer3' of resnet18"`` or a shard directory).

    Checks the SAE's ``cfg.d_in``, its ``metadata.hook_name`` (through ``resolve``, an adapter's
    ``resolve_layer``, so aliases match) and, with ``check_model``, ``metadata.model_name`` / ``weights_hash``.
    Any mismatch raises :class:`MismatchError` naming both sides.
    """
    meta = sae.cfg.metadata
    hook = meta.get("hook_name") if meta is not None else None
    if hook is not None:
        try:
            hook_resolved = resolve(hook) if resolve is not None else str(hook)
        except KeyError:
            hook_resolved = str(hook)
        if hook_resolved != layer:
            raise MismatchError(f"{source} was trained on layer {hook!r} (cfg metadata.hook_name) but is used at "
                                f"layer {layer!r} of {model}; use an SAE trained on {layer!r} or the "
                                f"layer {hook!r}")
    if int(sae.cfg.d_in) != int(d_in):
        raise MismatchError(f"{source} has d_in={sae.cfg.d_in} but {where} has {d_in} channels; use an SAE "
                            "trained on this layer")
    if check_model and meta is not None:
        model_name = meta.get("model_name")
        if model_name and model_name != model:
            raise MismatchError(f"{source} was trained on model {model_name!r} but is used with {model!r};"
                                " use an SAE trained on this model (or pass check_model=False if the names "
                                "differ for the same network)")
        wh = meta.get("weights_hash")
        if wh and weights_hash and wh != weights_hash:
            raise MismatchError(f"{source} was trained on {model} weights {wh[:12]}… but the model has "
                                f"weights {weights_hash[:12]}…; retrain the SAE on these weights "
                                "(or pass check_model=False)")


def check_sae(sae: Any, adapter: ModelAdapter | nn.Module, layer: str | int | None = None,
              check_model: bool = True, source: str = "SAE") -> str:
    """Check that ``sae`` fits ``adapter``'s ``layer`` (:func:`check_sae_fits`); return the layer id.

    ``layer`` defaults to the SAE's ``metadata.hook_name``. Mismatches raise :class:`MismatchError`
    naming both sides.
    """
    adapter = get_adapter(adapter)
    if layer is None:
        layer = sae_layer(sae)
        if layer is None:
            raise MismatchError(f"{source} has no metadata.hook_name; pass the layer id it was trained on")
    name = adapter.resolve_layer(layer)
    check_sae_fits(sae, adapter.layer(name).channels, name, adapter.name, f"layer {name!r} of {adapter.name}",
                   adapter.weights_hash, check_model, source, adapter.resolve_layer)
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
    """``sae.<fn>`` over the last dimension of ``x`` (..., D) on the device and in the dtype of the SAE's weights
    (``W_enc``; also after ``sae.double()``); the result is on ``x``'s device."""
    shape = x.shape
    w = sae.W_enc
    out = getattr(sae, fn)(x.reshape(-1, shape[-1]).to(w.device, w.dtype))
    if out.is_sparse:
        out = out.to_dense()
    return out.reshape(*shape[:-1], out.shape[-1]).to(x.device)


def encode_pfv(sae: Any, pfv: torch.Tensor, return_pre: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The one SAE encoder call: PFVs (..., D) → latents (..., S); with ``return_pre`` also the encoder
    pre-activations (..., S).

    The pre-activation is read from the SAE's own ``hook_sae_acts_pre`` hook point, exact for every sae-lens
    architecture that runs it (standard, top-k, batch-top-k, JumpReLU, gated). An SAE whose ``encode`` does
    not run that hook raises :class:`MismatchError` (never the post-activation in its place).
    """
    if not return_pre:
        return _sae_apply(sae, pfv, "encode")
    got: dict[str, torch.Tensor] = {}
    hook_point = getattr(sae, "hook_sae_acts_pre", None)
    if not isinstance(hook_point, nn.Module):
        raise MismatchError(f"{type(sae).__name__} has no hook_sae_acts_pre hook point, so its encoder "
                            "pre-activation cannot be read; use an sae-lens SAE architecture that has it")
    handle = hook_point.register_forward_hook(lambda _m, _i, out: got.__setitem__("pre", out))
    try:
        post = _sae_apply(sae, pfv, "encode")
    finally:
        handle.remove()
    if "pre" not in got:
        raise MismatchError(f"{type(sae).__name__}.encode did not run its hook_sae_acts_pre hook point, so its "
                            "encoder pre-activation cannot be read; use an sae-lens SAE architecture that runs it")
    return post, got["pre"].reshape(post.shape).to(pfv.device)


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


@torch.no_grad()
def encode_images(sae: Any, adapter: ModelAdapter | nn.Module, layer: str, x: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Preprocessed images ``x`` (B, 3, H, W) → PFVs (B, N, D) float32, SAE latents (B, N, S) float32 at
    ``layer`` and the layer grid (h, w) (the model runs only up to ``layer``)."""
    adapter = get_adapter(adapter)
    batch = adapter.to_pfv(adapter.capture(x, [layer], stop_early=True)[layer])
    return batch.pfv.float(), encode_pfv(sae, batch.pfv).float(), tuple(batch.grid)


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


def intervene_layer(sae: Any, adapter: ModelAdapter, act: torch.Tensor, interventions: Sequence[Intervention],
                    keep_error: bool = True) -> torch.Tensor:
    """A raw layer output ``act`` (CNN (B, C, h, w); ViT (B, T, D)) with ``interventions`` (one layer's)
    applied; same shape. ``keep_error``: ``act + decode(a') − decode(a)`` (no-op edits return ``act`` exactly);
    else ``decode(a')``. Class/register tokens unchanged."""
    batch = adapter.to_pfv(act)
    a = encode_pfv(sae, batch.pfv)
    new = decode(sae, edit_latents(a, interventions, batch.grid)).to(act.dtype)
    if keep_error:
        new = batch.pfv + (new - decode(sae, a).to(act.dtype))
    return adapter.from_pfv(PFVBatch(new, batch.positions, batch.grid, batch.extra))


def run_with_saes(model: ModelAdapter | nn.Module, x: torch.Tensor, saes: Mapping[str | int, Any],
                  keep_error: bool | None = None, check: bool = True,
                  interventions: Sequence[Intervention] | None = None,
                  return_activations: Sequence[str | int] | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``model`` on ``x`` (N,3,H,W) with each layer's output replaced by its SAE reconstruction.

    ``saes``: ``{layer id: sae_lens.SAE}``; ViT class/register tokens pass through unchanged;
    ``keep_error`` adds the SAE error term back (same output, gradients through the SAE); default: False
    without interventions, True with them.

    ``interventions``: :class:`sae_cafe.interventions.Intervention` edits of latents (clamp / scale / zero /
    add at all positions, a box, a mask or tokens) at layers in ``saes``; an intervened layer's output becomes
    ``out + decode(a') − decode(a)`` (``keep_error``, so a no-op edit changes nothing) or ``decode(a')``.
    ``return_activations``: layer ids whose raw outputs (after any splice there) are returned as well, as
    ``(logits, {layer: activation})``; without it only the logits (N, classes) are returned.
    """
    if interventions is None and return_activations is None:  # the original contract
        with spliced(model, saes, keep_error=bool(keep_error), check=check) as adapter:
            return adapter.model(x)
    keep = bool(interventions) if keep_error is None else keep_error
    adapter = get_adapter(model)
    resolved: dict[str, Any] = {}
    for layer, sae in saes.items():
        name = check_sae(sae, adapter, layer, check_model=False) if check else adapter.resolve_layer(layer)
        if name in resolved:
            raise MismatchError(f"two SAEs given for layer {name!r} ({layer!r}); pass one per layer")
        resolved[name] = sae
    by_layer = group_interventions(adapter, resolved, list(interventions or []), tuple(x.shape[-2:]))
    want = [adapter.resolve_layer(n) for n in (return_activations or [])]
    got: dict[str, torch.Tensor] = {}

    def make(name: str):
        sae, ivs, record = resolved.get(name), by_layer.get(name), name in want

        def hook(_m, _i, out):
            new = out
            if ivs:
                new = intervene_layer(sae, adapter, out, ivs, keep_error=keep)
            elif sae is not None:
                new = reconstruct_layer(sae, adapter, out, keep_error=keep)
            if record:
                got[name] = new
            return None if new is out else new
        return hook

    with adapter.hooks({n: make(n) for n in dict.fromkeys([*resolved, *want])}):
        logits = adapter.model(x)
    if return_activations is None:
        return logits
    return logits, {n: got[n] for n in want}


def sae_layer(sae: Any) -> str | None:
    """The layer id an SAE was trained on (``cfg.metadata.hook_name``)."""
    meta = sae.cfg.metadata
    return meta.get("hook_name") if meta is not None else None

