"""SAEs on vision layers: load any ``sae_lens.SAE`` from disk, encode/decode layer outputs, splice SAEs into a
model (``run_with_saes``).

sae-lens only splices SAEs into language models (``HookedSAETransformer``); splicing into vision layers,
and editing latents there (interventions) are written here by hand. An SAE records the ViT token kinds it was
trained on (``cfg.metadata.sae_cafe.tokens``: ``"patch"`` — the default, also for SAEs without the record —
``"all"`` or ``"cls"``; :func:`sae_tokens`); splicing reconstructs exactly those tokens and passes the others
through unchanged, and CAFE (:func:`encode_images`, grid positions) refuses an SAE that never saw patch tokens.

Activation normalisation (``normalize_activations = "expected_average_only_in"``: PFVs scaled by a constant
factor so their mean norm is √d_in) is folded into the weights by sae-lens
(``fold_activation_norm_scaling_factor``: ``W_enc · s``, ``W_dec / s``, ``b_dec / s``) when our training
exports, and by :func:`load_sae` for an export that still carries the factor (``norm_scaling_factor`` in
``cfg.json``, or our ``metadata.sae_cafe.activation_norm.scaling_factor``), so every function here works in the
model's units. Per-input normalisations (``"layer_norm"``, ``"constant_norm_rescale"``, e.g. ViT-Prisma SAEs) are
applied here, statelessly: sae-lens keeps the input's statistics on the SAE object from ``encode`` until one
``decode`` (so a second decode, or a decode of other latents, fails); :func:`encode_pfv` normalises each input
row itself and :func:`decode` undoes it with the statistics of the PFVs the latents came from (its ``x``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .activations.rows import layer_pfv, prefix_index, token_pfv
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
    cfg_json = sae_cfg_dict(path)
    dev = str(device) if device is not None else (str(get_adapter(adapter).device) if adapter is not None
                                                  else "cpu")
    try:
        sae = SAE.load_from_disk(str(path), device=dev)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same user error
        raise ArtifactError(f"SAE at {path} cannot be loaded by sae-lens ({type(e).__name__}: {e}); check "
                            "cfg.json and sae_weights.safetensors or re-export the SAE") from e
    sae.eval()
    if getattr(sae.cfg, "normalize_activations", "none") == "expected_average_only_in":
        _fold_norm_factor(sae, cfg_json, path)
    if adapter is not None:
        check_sae(sae, adapter, layer, check_model=check_model, source=f"SAE at {path}")
    return sae


def _fold_norm_factor(sae: Any, cfg_json: dict[str, Any], path: Path) -> None:
    """Fold the activation scaling factor of an SAE exported with ``normalize_activations =
    "expected_average_only_in"`` into its weights (sae-lens applies nothing at run time for it, so without the
    factor its reconstructions would be in the wrong units: a :class:`MismatchError`)."""
    norm = ((cfg_json.get("metadata") or {}).get("sae_cafe") or {}).get("activation_norm") or {}
    factor = cfg_json.get("norm_scaling_factor", norm.get("scaling_factor"))
    if factor is None:
        raise MismatchError(f"SAE at {path} was trained on normalised activations (normalize_activations="
                            "'expected_average_only_in') but cfg.json holds no norm_scaling_factor; add the "
                            "factor (√d_in / mean PFV norm of its training data) as cfg.json norm_scaling_factor")
    sae.fold_activation_norm_scaling_factor(float(factor))


def sae_tokens(sae: Any) -> str:
    """The ViT token kinds an SAE was trained on: ``"patch"``, ``"all"`` or ``"cls"`` (recorded by our training
    in ``cfg.metadata.sae_cafe.tokens``; ``"patch"`` when not recorded)."""
    meta = sae.cfg.metadata
    info = (meta.get("sae_cafe") if meta is not None else None) or {}
    tokens = info.get("tokens", "patch") if isinstance(info, dict) else "patch"
    if tokens not in ("patch", "all", "cls"):
        raise MismatchError(f"SAE metadata sae_cafe.tokens={tokens!r}; expected 'patch', 'all' or 'cls'")
    return tokens


#: sae-lens run-time normalisations that depend on each input row (applied here, see the module docstring)
PER_INPUT_NORMS = ("layer_norm", "constant_norm_rescale")


def _per_input_norm(sae: Any) -> str | None:
    norm = getattr(sae.cfg, "normalize_activations", "none")
    return norm if norm in PER_INPUT_NORMS else None


def _norm_in(kind: str, x_ND: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """sae-lens's run-time normalisation of rows ``x`` (N, D) (``SAE._setup_activation_normalization``, same
    formulas and eps) → the normalised rows and the statistics that undo it."""
    if kind == "layer_norm":
        mu = x_ND.mean(dim=-1, keepdim=True)
        xc = x_ND - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + 1e-5), (std, mu)
    coeff = x_ND.shape[-1] ** 0.5 / x_ND.norm(dim=-1, keepdim=True)
    return x_ND * coeff, (coeff,)


def _norm_out(kind: str, y_ND: torch.Tensor, stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Undo :func:`_norm_in` on reconstructions (as sae-lens's ``run_time_activation_norm_fn_out``)."""
    return y_ND * stats[0] + stats[1] if kind == "layer_norm" else y_ND / stats[0]


@contextlib.contextmanager
def _no_runtime_norm(sae: Any) -> Iterator[None]:
    """sae-lens's stateful run-time normalisation switched off (we apply it ourselves, statelessly)."""
    fi, fo = sae.run_time_activation_norm_fn_in, sae.run_time_activation_norm_fn_out
    sae.run_time_activation_norm_fn_in = sae.run_time_activation_norm_fn_out = _identity
    try:
        yield
    finally:
        sae.run_time_activation_norm_fn_in, sae.run_time_activation_norm_fn_out = fi, fo


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _sae_apply(sae: Any, x: torch.Tensor, fn: str, ref: torch.Tensor | None = None) -> torch.Tensor:
    """``sae.<fn>`` over the last dimension of ``x`` (..., D) on the device and in the dtype of the SAE's weights
    (``W_enc``; also after ``sae.double()``); the result is on ``x``'s device. For a per-input normalised SAE
    the normalisation is applied here: ``encode`` normalises ``x``'s rows, ``decode`` un-normalises with the
    statistics of ``ref`` (..., D), the PFVs the latents ``x`` were encoded from (required)."""
    shape = x.shape
    w = sae.W_enc
    flat = x.reshape(-1, shape[-1]).to(w.device, w.dtype)
    kind = _per_input_norm(sae)
    if kind is None:
        out = getattr(sae, fn)(flat)
    else:
        if fn == "encode":
            flat, _ = _norm_in(kind, flat)
        else:
            if ref is None:
                raise MismatchError(f"this SAE normalises each input (normalize_activations={kind!r}), so decoding "
                                    "needs the PFVs the latents were encoded from: pass x= to decode (or use "
                                    "reconstruct_layer / run_with_saes)")
            r = ref.reshape(-1, ref.shape[-1]).to(w.device, w.dtype)
            if r.shape[0] != flat.shape[0]:
                raise MismatchError(f"decode got {flat.shape[0]} latent rows but x has {r.shape[0]} PFV rows; pass "
                                    "the PFVs the latents were encoded from (same leading shape)")
            stats = _norm_in(kind, r)[1]
        with _no_runtime_norm(sae):
            out = getattr(sae, fn)(flat)
        if fn == "decode":
            out = _norm_out(kind, out, stats)
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


def decode(sae: Any, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (..., S) → reconstructed PFVs (..., D). ``x`` (..., D): the PFVs the latents were encoded from,
    required by an SAE with a per-input normalisation (``layer_norm``, ``constant_norm_rescale``: its
    reconstruction is un-normalised with their statistics; any number of decodes), ignored otherwise."""
    return _sae_apply(sae, latents, "decode", x)


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
    ``layer`` and the layer grid (h, w) (the model runs only up to ``layer``).

    The PFVs are the patch tokens (grid positions): an SAE trained on class tokens only (``tokens="cls"``)
    is refused with a :class:`MismatchError`, so CAFE never mines exemplars from token kinds the SAE did not
    see."""
    if sae_tokens(sae) == "cls":
        raise MismatchError(f"the SAE at layer {layer!r} was trained on class tokens only (tokens='cls'); "
                            "exemplars and latent maps are mined at patch positions — use an SAE trained with "
                            "tokens='patch' or 'all'")
    batch = layer_pfv(get_adapter(adapter), x, layer)
    return batch.pfv.float(), encode_pfv(sae, batch.pfv).float(), tuple(batch.grid)


def decode_layer(sae: Any, adapter: ModelAdapter | nn.Module, latents_BhwS: torch.Tensor,
                 extra: torch.Tensor | None = None, pfv: torch.Tensor | None = None) -> torch.Tensor:
    """Latent maps (B, h, w, S) → layer-shaped output (CNN (B, C, h, w); ViT (B, T, D) with ``extra``
    prefix tokens (B, E, D), required for ViTs). ``pfv`` (B, h·w, D): the encoded PFVs (see :func:`decode`)."""
    adapter = get_adapter(adapter)
    B, h, w, _ = latents_BhwS.shape
    rec = decode(sae, latents_BhwS.reshape(B, h * w, -1), pfv)
    return adapter.from_pfv(PFVBatch(rec, grid_positions(h, w, rec.device), (h, w), extra))


def _prefix_mask(sae: Any, adapter: ModelAdapter, extra: torch.Tensor | None) -> torch.Tensor | None:
    """(E,) bool: the prefix tokens the SAE reconstructs (:func:`sae_tokens`: none for ``"patch"``, all for
    ``"all"``, the class tokens for ``"cls"``), None when none of them."""
    tokens = sae_tokens(sae)
    if tokens == "patch" or extra is None or not extra.shape[1]:
        return None
    mask = torch.zeros(extra.shape[1], dtype=torch.bool)
    mask[prefix_index(adapter, extra.shape[1], tokens)] = True
    return mask


def token_rows(sae: Any, adapter: ModelAdapter, batch: PFVBatch) -> torch.Tensor:
    """The PFVs of a layer batch that the SAE was trained on, as rows (n, D): the patch tokens (``"patch"``),
    the class tokens (``"cls"``) or all tokens (``"all"``: prefix tokens, then patch tokens, per image)
    (:func:`sae_cafe.activations.rows.token_pfv`)."""
    return token_pfv(adapter, batch, sae_tokens(sae)).reshape(-1, batch.pfv.shape[-1])


def _splice(sae: Any, x: torch.Tensor, keep_error: bool) -> torch.Tensor:
    """SAE reconstruction of PFVs ``x`` (..., D) in ``x``'s dtype (``keep_error``: value ``x``, gradients
    through the SAE)."""
    rec = decode(sae, encode_pfv(sae, x), x).to(x.dtype)
    return rec + (x - rec).detach() if keep_error else rec


def reconstruct_layer(sae: Any, adapter: ModelAdapter, act: torch.Tensor, keep_error: bool = False
                      ) -> torch.Tensor:
    """SAE reconstruction of a raw layer output, same shape, at the token kinds the SAE was trained on
    (:func:`sae_tokens`: patch tokens, all tokens or class tokens); the other tokens unchanged.

    ``keep_error``: add the (detached) reconstruction error, so the value equals ``act`` while gradients
    flow through the SAE (like sae-lens ``use_error_term``).
    """
    batch = adapter.to_pfv(act)
    pm = _prefix_mask(sae, adapter, batch.extra)
    rec = batch.pfv if sae_tokens(sae) == "cls" else _splice(sae, batch.pfv, keep_error)
    extra = batch.extra
    if pm is not None:
        extra = extra.clone()
        extra[:, pm.to(extra.device)] = _splice(sae, batch.extra[:, pm.to(extra.device)], keep_error)
    return adapter.from_pfv(PFVBatch(rec, batch.positions, batch.grid, extra))


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
    else ``decode(a')``. Edits act on patch tokens; prefix tokens the SAE was trained on (``tokens="all"``)
    are unchanged with ``keep_error`` and reconstructed without it. An SAE trained on class tokens only has no
    patch latents to edit (:class:`MismatchError`)."""
    if sae_tokens(sae) == "cls":
        raise MismatchError("interventions edit patch-token latents, but this SAE was trained on class tokens "
                            "only (tokens='cls'); use an SAE trained with tokens='patch' or 'all'")
    batch = adapter.to_pfv(act)
    a = encode_pfv(sae, batch.pfv)
    new = decode(sae, edit_latents(a, interventions, batch.grid), batch.pfv).to(act.dtype)
    extra = batch.extra
    if keep_error:
        new = batch.pfv + (new - decode(sae, a, batch.pfv).to(act.dtype))
    else:
        pm = _prefix_mask(sae, adapter, extra)
        if pm is not None:
            extra = extra.clone()
            extra[:, pm.to(extra.device)] = _splice(sae, batch.extra[:, pm.to(extra.device)], False)
    return adapter.from_pfv(PFVBatch(new, batch.positions, batch.grid, extra))


def run_with_saes(model: ModelAdapter | nn.Module, x: torch.Tensor, saes: Mapping[str | int, Any],
                  keep_error: bool | None = None, check: bool = True,
                  interventions: Sequence[Intervention] | None = None,
                  return_activations: Sequence[str | int] | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``model`` on ``x`` (N,3,H,W) with each layer's output replaced by its SAE reconstruction.

    ``saes``: ``{layer id: sae_lens.SAE}``; each reconstructs the token kinds it was trained on
    (:func:`sae_tokens`; patch tokens by default), ViT class/register tokens otherwise pass through unchanged;
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

