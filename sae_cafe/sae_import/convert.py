"""Convert an outside SAE into sae-cafe's SAE stage (``saes/<model>/<layer>/``: the sae-lens inference export
``cfg.json`` + ``sae_weights.safetensors`` + ``manifest.json``), so that CAFE, ICAT and the viewer read it like
an SAE trained by ``sae-cafe train-sae``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import run_dir, stage_dir, stage_path, write_manifest
from ..errors import MismatchError, SaeCafeError
from .common import TOKEN_SETS, ForeignSAE
from .formats import load_foreign_sae
from .hooks import map_hook_name


@dataclass(frozen=True)
class ConvertConfig:
    """The conversion as recorded in the manifest's ``config``.

    Attributes:
        format: ``saelens`` | ``saev`` | ``vit-prisma``. source: the path given. model: registered model name.
        layer: the sae-cafe layer id written. tokens: tokens the SAE was trained on (None: unknown).
        norm_scaling_factor: folded constant input scaling (None: none). saev_subtract_b_dec: override of
        saev's encoder rule (None: by schema).
    """

    format: str
    source: str
    model: str
    layer: str
    tokens: str | None = None
    norm_scaling_factor: float | None = None
    saev_subtract_b_dec: bool | None = None


def resolve_import_layer(foreign: ForeignSAE, adapter, layer: str | int | None = None) -> str:
    """The sae-cafe layer id for ``foreign`` on ``adapter``: ``layer`` when given (checked against the hook the
    source records, if any), else the source's hook mapped by :func:`~.hooks.map_hook_name`."""
    from_hook = map_hook_name(foreign.hook, adapter, f"the {foreign.format} SAE") if foreign.hook else None
    if layer is None:
        if from_hook is None:
            raise SaeCafeError(f"the {foreign.format} SAE at {foreign.source} does not record its layer; pass "
                               "--layer (a block index such as 9, -2, or a layer id of the model)")
        return from_hook
    given = map_hook_name(layer, adapter, "--layer")
    if from_hook is not None and from_hook != given:
        raise MismatchError(f"--layer {layer!r} is {given!r} but the SAE was trained on hook {foreign.hook!r} "
                            f"({from_hook!r}); drop --layer or pass the SAE of that layer")
    return given


def _adapter(model, weights, run: str | None, root, device):
    from ..models import get_adapter, load_model

    if not isinstance(model, str):
        return get_adapter(model)
    if run is not None:
        from ..model_record import resolve_run_model

        return resolve_run_model(run_dir(run, root), model, weights, device)
    return load_model(model, weights=weights, device=device)


@torch.no_grad()
def _check_written(final: Path, adapter, layer: str, foreign: ForeignSAE) -> float:
    """Reload the written stage with :func:`sae_cafe.saes.load_sae` and compare its encoder with the converted
    SAE on random PFV-scale inputs; return the largest absolute difference (an error above 1e-5 relative)."""
    from ..saes import encode_pfv, load_sae

    again = load_sae(final, adapter, layer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, foreign.d_in, generator=g, dtype=foreign.sae.W_enc.dtype) * 3
    a, b = encode_pfv(foreign.sae, x), encode_pfv(again, x)
    err = float((a - b).abs().max())
    if err > 1e-5 * (1 + float(a.abs().max())):
        raise SaeCafeError(f"the SAE written to {final} does not reproduce the converted encoder (max |Δ| {err:.3g});"
                           " please report this")
    return err


def convert_sae(src: str | Path, fmt: str, model: Any, layer: str | int | None = None,
                out: str | Path | None = None, *, run: str | None = None, root: str | Path | None = None,
                weights: str | Path | None = None, device: str | None = None, tokens: str | None = None,
                norm_scaling_factor: float | None = None, saev_subtract_b_dec: bool | None = None) -> Path:
    """Convert the outside SAE ``src`` (format ``fmt``) for ``model``'s ``layer`` and write our SAE stage.

    Args:
        model: registered model name (loaded with ``weights``, or the weights ``run`` recorded) or an
            adapter / ``nn.Module``. layer: block index or layer id; default: the hook the source records
            (ViT-Prisma ``blocks.9.hook_resid_post`` → block 9; see :mod:`.hooks`).
        out: stage directory (default ``<root>/<run>/saes/<model>/<layer>``; needs ``run``).
        tokens: ``patch`` / ``cls`` / ``all`` when the format does not record it (a contradiction is an error).
        norm_scaling_factor, saev_subtract_b_dec: see :func:`~.formats.load_foreign_sae`.

    Returns the stage directory. The SAE's ``d_in`` must equal the layer's PFV width (else
    :class:`MismatchError` naming both); the manifest records the source format, files and their sha256, the
    source hook, the tokens, the normalisation and any deviation from the outside math.
    """
    foreign = load_foreign_sae(src, fmt, norm_scaling_factor, saev_subtract_b_dec)
    adapter = _adapter(model, weights, run, root, device)
    name = resolve_import_layer(foreign, adapter, layer)
    width = adapter.layer(name).channels
    if foreign.d_in != width:
        raise MismatchError(f"the {fmt} SAE at {src} has d_in={foreign.d_in} but layer {name!r} of "
                            f"{adapter.name} has PFV width {width}; use the SAE trained on this model and layer")
    if tokens is not None and tokens not in TOKEN_SETS:
        raise SaeCafeError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
    if tokens is not None and foreign.tokens is not None and tokens != foreign.tokens:
        raise MismatchError(f"tokens={tokens!r} but the {fmt} SAE records training on {foreign.tokens!r} tokens")
    used_tokens = tokens or foreign.tokens
    tokens_source = "given by the caller" if tokens and not foreign.tokens else foreign.tokens_source
    warnings = list(foreign.warnings)
    if used_tokens == "cls":
        warnings.append("the SAE was trained on class tokens only; CAFE mines patch tokens, where it is off its "
                        "training distribution")
    if foreign.normalization.get("per_input"):
        warnings.append(f"per-input normalisation {foreign.normalization['kind']!r} kept as sae-lens run-time "
                        "normalisation: encode (CAFE, latent maps) is exact; a decode needs the statistics of the "
                        "encode just before it (sae-lens keeps them on the SAE object until that one decode), so "
                        "ICAT, interventions and reconstructions other than encode→decode are not supported")
    if out is None:
        if run is None:
            raise SaeCafeError("convert_sae: pass out (a directory) or run (the stage goes to "
                               "<root>/<run>/saes/<model>/<layer>)")
        out = stage_path(run, "saes", adapter.name, name, root=root)
    final = Path(out)
    sae = foreign.sae
    meta = sae.cfg.metadata
    meta.hook_name, meta.model_name = name, adapter.name
    meta.weights_hash = adapter.weights_hash
    meta.sae_cafe = {"imported_from": fmt, "source_hook": foreign.hook, "architecture": foreign.architecture,
                     **({"tokens": used_tokens} if used_tokens else {})}  # absent: saes.sae_tokens → "patch"
    if used_tokens is None:
        warnings.append("the source does not record which tokens the SAE was trained on; sae-cafe treats it as "
                        "trained on patch tokens (pass tokens / --tokens to record it)")
    from ..model_record import record_for

    record = record_for(adapter).to_json() if adapter.weights_hash else None
    config = ConvertConfig(fmt, str(src), adapter.name, name, used_tokens,
                           None if norm_scaling_factor is None else float(norm_scaling_factor), saev_subtract_b_dec)
    source = {"format": fmt, "path": str(Path(src).resolve()), "files": foreign.files, "hook": foreign.hook,
              "normalization": foreign.normalization, "notes": foreign.notes, "config": foreign.source_cfg}
    with stage_dir(final) as tmp:
        sae.save_model(str(tmp))
        write_manifest(tmp, "saes", config, upstream=None, model=adapter.name, layer=name, d_in=foreign.d_in,
                       d_sae=foreign.d_sae, architecture=foreign.architecture, weights_hash=adapter.weights_hash,
                       model_record=record, sae_lens_files=["cfg.json", "sae_weights.safetensors"],
                       imported=True, source=source, trained_on_tokens=used_tokens, tokens_source=tokens_source,
                       warnings=warnings)
    _check_written(final, adapter, name, foreign)
    return final
