"""Readers of outside SAE files: SAELens folders, saev checkpoints, ViT-Prisma SAEs → :class:`ForeignSAE`.

Each reader turns the outside SAE into a sae-lens SAE whose ``encode`` is the outside encoder, formula for
formula (``docs/sae_import.md`` lists each mapping):

* **SAELens** (``cfg.json`` + ``sae_weights.safetensors``, sae-lens 6 or older flat configs with ``hook_name`` /
  ``hook_point``, ``activation_fn_str``, boolean ``normalize_activations``): read as sae-lens reads it.
  ``expected_average_only_in`` needs the dataset scaling factor (``norm_scaling_factor``), folded into the
  weights; an old ``scaling_factor`` tensor (finetuning scaling) is folded into ``W_dec``.
* **saev** (``sae.pt``: one JSON header line, then a ``torch.save``'d state dict): ``f = act(x W_enc + b_enc)``
  for schema 2, ``act((x − b_dec) W_enc + b_enc)`` for schema 1 and pre-schema files; Relu → standard,
  TopK / (schema 2) BatchTopK → top-k per token.
* **ViT-Prisma** (a directory with ``config.json`` and a state-dict weights file ``*.pt`` / ``*.safetensors``):
  ``act(norm(x) − b_dec) W_enc + b_enc)`` with ``normalize_activations`` ``none`` / ``constant_norm_rescale`` /
  ``layer_norm`` kept as sae-lens run-time normalisations; ``standard`` (relu, topk) and ``gated``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from .common import (
    FORMATS,
    PER_INPUT_NORMS,
    ForeignSAE,
    ImportFormatError,
    file_record,
    fold_input_scale,
    make_saelens_sae,
    need,
    safe_torch_load,
    tensor_dict,
)

_BASE_CFG = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
             "metadata"}
_TOPK_NOTE = ("top-k keeps the k largest pre-activations per token and clamps negative ones to 0 (sae-lens TopK); "
              "{src} keeps them unclamped, so latents differ only where a kept pre-activation is negative")


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ImportFormatError(f"{path} is missing; {what}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImportFormatError(f"{path} is not valid JSON ({e}); {what}") from e
    if not isinstance(out, dict):
        raise ImportFormatError(f"{path} is not a JSON object; {what}")
    return out


def _tokens_from(cfg: dict[str, Any]) -> str | None:
    if cfg.get("cls_token_only"):
        return "cls"
    if cfg.get("use_patches_only"):
        return "patch"
    sc = cfg.get("sae_cafe") if isinstance(cfg.get("sae_cafe"), dict) else {}
    t = sc.get("tokens")
    return t if t in ("patch", "cls", "all") else None


def _scale(state, norm_scaling_factor, where, normalization, notes):
    if norm_scaling_factor is None:
        return state
    state = fold_input_scale(state, float(norm_scaling_factor), where)
    normalization["scale"] = float(norm_scaling_factor)
    notes.append(f"activation scaling x→{norm_scaling_factor}·x folded into W_enc, W_dec and b_dec")
    return state


# ----- SAELens --------------------------------------------------------------------------------------------
def read_saelens(src: str | Path, norm_scaling_factor: float | None = None) -> ForeignSAE:
    """A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) as a :class:`ForeignSAE`."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(src)
    d = d.parent if d.is_file() else d
    where = f"SAELens SAE at {d}"
    raw = _json(d / "cfg.json", "a SAELens folder holds cfg.json and sae_weights.safetensors")
    w_path = d / "sae_weights.safetensors"
    try:
        state = dict(load_file(str(w_path)))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ImportFormatError(f"{w_path} cannot be read ({type(e).__name__}: {e}); a SAELens folder holds "
                                "sae_weights.safetensors") from e
    try:
        cfg = handle_config_defaulting(copy.deepcopy(raw))
    except Exception as e:  # noqa: BLE001 - sae-lens raises plain errors for unknown architectures/keys
        raise ImportFormatError(f"{where}: sae-lens cannot read its cfg.json ({type(e).__name__}: {e})") from e
    meta = dict(cfg.get("metadata") or {})
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if meta.get("hook_head_index") is not None or raw.get("hook_head_index") is not None \
            or cfg.get("reshape_activations") == "hook_z":
        raise ImportFormatError(f"{where} is an attention-head (hook_z / head index) SAE; sae-cafe splices SAEs "
                                "at block outputs only")
    notes: list[str] = []
    if "scaling_factor" in state:  # pre-6 finetuning scaling: decode multiplies the latents by it
        sf = state.pop("scaling_factor")
        state["W_dec"] = state["W_dec"] * sf[:, None].to(state["W_dec"].dtype)
        notes.append("finetuning scaling_factor folded into W_dec (decode only; the encoder is unchanged)")
    norm = cfg.get("normalize_activations") or "none"
    normalization: dict[str, Any] = {"kind": norm, "per_input": norm in PER_INPUT_NORMS, "scale": None}
    if norm == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise ImportFormatError(f"{where} was trained with normalize_activations='expected_average_only_in' "
                                    "but the folder does not store the dataset scaling factor; pass it "
                                    "(--norm-scaling-factor F: the factor activations were multiplied by)")
        norm = "none"
    elif norm not in ("none", *PER_INPUT_NORMS):
        raise ImportFormatError(f"{where}: normalize_activations={norm!r} has no exact sae-lens inference form; "
                                "fold it into the weights with sae-lens first")
    if cfg.get("rescale_acts_by_decoder_norm") and norm_scaling_factor is not None:
        raise ImportFormatError(f"{where}: a scaling factor cannot be folded into a top-k SAE with "
                                "rescale_acts_by_decoder_norm; fold it with sae-lens first")
    state = _scale(state, norm_scaling_factor, where, normalization, notes)
    extra = {k: v for k, v in cfg.items() if k not in _BASE_CFG}
    sae = make_saelens_sae(cfg.get("architecture", "standard"), state,
                           apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                           normalize_activations=norm, hook=hook, extra_cfg=extra, where=where)
    tokens = _tokens_from({**raw, **meta})
    return ForeignSAE(sae, "saelens", str(src), [file_record(d / "cfg.json"), file_record(w_path)], hook, tokens,
                      "cfg.json" if tokens else "not recorded by the SAELens config", normalization, notes, [],
                      json.loads(json.dumps(raw, default=str)))


# ----- saev -------------------------------------------------------------------------------------------------
def _saev_file(src: Path) -> Path:
    if src.is_file():
        return src
    for cand in (src / "sae.pt", src / "checkpoint" / "sae.pt"):
        if cand.is_file():
            return cand
    raise ImportFormatError(f"no saev checkpoint at {src} (looked for sae.pt and checkpoint/sae.pt); pass the "
                            "sae.pt file")


def read_saev(src: str | Path, norm_scaling_factor: float | None = None,
              subtract_b_dec: bool | None = None) -> ForeignSAE:
    """A saev ``sae.pt`` (JSON header line + ``torch.save``'d state dict) as a :class:`ForeignSAE`.

    ``subtract_b_dec`` overrides the schema's encoder rule (None: schema 2 → no, older → yes)."""
    path = _saev_file(Path(src))
    where = f"saev checkpoint {path}"
    raw = path.read_bytes()
    nl = raw.find(b"\n")
    try:
        header = json.loads(raw[:nl].decode("utf-8")) if nl > 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ImportFormatError(f"{where} does not start with a JSON header line; it is not a saev checkpoint "
                                "(saev.nn.dump writes one JSON line, then the torch state dict)")
    state = tensor_dict(safe_torch_load(raw[nl + 1:], where), where)
    need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    schema = header.get("schema")
    warnings: list[str] = []
    notes: list[str] = []
    if schema is None:
        cfg, act, sub = header, {"cls": "Relu", "params": {}}, True
    elif schema == 1:
        cfg = dict(header.get("cfg") or {})
        cls = header.get("cls", "SparseAutoencoderConfig")
        if cls in ("Relu", "TopK", "BatchTopK"):
            act = {"cls": cls, "params": {"top_k": cfg.get("top_k", 32)}, "batch_level": cls == "BatchTopK"}
        else:
            act = cfg.get("activation") or {"cls": "Relu", "params": {}}
            warnings.append("saev schema-1 checkpoint with an activation dict: its encoder is taken to subtract "
                            "b_dec as schema-1 saev did; pass subtract_b_dec=False (--saev-subtract-b-dec no) if "
                            "your saev version did not")
        sub = True
    elif schema == 2:
        cfg = dict(header.get("cfg") or {})
        act, sub = cfg.get("activation") or {"cls": "Relu", "params": {}}, False
    else:
        raise ImportFormatError(f"{where} has saev schema {schema!r}; sae-cafe reads schemas 1 and 2 and "
                                "pre-schema files")
    if subtract_b_dec is not None:
        if subtract_b_dec != sub:
            notes.append(f"encoder b_dec subtraction set to {subtract_b_dec} by the caller (schema rule: {sub})")
        sub = bool(subtract_b_dec)
    d_vit = cfg.get("d_vit")
    if d_vit is not None and int(d_vit) != state["W_enc"].shape[0]:
        raise ImportFormatError(f"{where}: header d_vit={d_vit} but W_enc has {state['W_enc'].shape[0]} rows")
    cls = act.get("cls")
    extra: dict[str, Any] = {}
    if cls == "Relu":
        arch = "standard"
    elif cls in ("TopK", "BatchTopK"):
        if act.get("batch_level"):
            raise ImportFormatError(f"{where}: schema-1 BatchTopK selects the top k over a whole batch, so a "
                                    "token's latents depend on the batch; it has no per-token equivalent")
        arch, extra["k"] = "topk", int((act.get("params") or {}).get("top_k", 32))
        warnings.append(_TOPK_NOTE.format(src="saev"))
    else:
        raise ImportFormatError(f"{where}: activation {cls!r} is not supported (Relu, TopK, BatchTopK are)")
    normalization: dict[str, Any] = {"kind": "none", "per_input": False, "scale": None}
    state = _scale(state, norm_scaling_factor, where, normalization, notes)
    notes.append(f"encoder: {'(x − b_dec)' if sub else 'x'}·W_enc + b_enc (saev schema {schema})")
    layer = cfg.get("layer")
    hook = str(layer) if isinstance(layer, int) else None
    sae = make_saelens_sae(arch, state, apply_b_dec_to_input=sub, hook=hook, extra_cfg=extra, where=where)
    return ForeignSAE(sae, "saev", str(src), [file_record(path)], hook, None,
                      "not recorded in sae.pt (saev trains on patch tokens by default)", normalization, notes,
                      warnings, json.loads(json.dumps(header, default=str)))


# ----- ViT-Prisma -------------------------------------------------------------------------------------------
def _prisma_files(src: Path) -> tuple[Path, Path]:
    if src.is_file():
        return src.parent / "config.json", src
    if src.suffix in (".pkl", ".gz") or not src.is_dir():
        raise ImportFormatError(f"no ViT-Prisma SAE at {src}; pass its directory (config.json + weights)")
    cands = sorted(p for p in src.iterdir() if p.suffix in (".pt", ".pth", ".safetensors", ".pkl", ".gz"))
    if len(cands) != 1:
        raise ImportFormatError(f"{src} holds {len(cands)} weight files ({[p.name for p in cands]}); pass the "
                                "weights file itself")
    return src / "config.json", cands[0]


def _prisma_state(w_path: Path, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes = []
    if w_path.suffix in (".pkl", ".gz"):
        raise ImportFormatError(f"{w_path} is a pickle (ViT-Prisma save_model .pkl/.pkl.gz); sae-cafe never "
                                "unpickles files: save the SAE's state_dict() with torch.save or safetensors, "
                                "next to its config.json, and convert that")
    if w_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(w_path))), notes
    obj = safe_torch_load(w_path, where)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        notes.append("weights read from the 'state_dict' entry of the file")
        obj = obj["state_dict"]
    return tensor_dict(obj, where), notes


def read_prisma(src: str | Path, norm_scaling_factor: float | None = None) -> ForeignSAE:
    """A ViT-Prisma SAE (``config.json`` + state-dict weights file) as a :class:`ForeignSAE`."""
    cfg_path, w_path = _prisma_files(Path(src))
    where = f"ViT-Prisma SAE {w_path}"
    cfg = _json(cfg_path, "ViT-Prisma SAEs carry the VisionModelSAERunnerConfig as config.json next to the "
                          "weights")
    state, notes = _prisma_state(w_path, where)
    if cfg.get("is_transcoder"):
        raise ImportFormatError(f"{where} is a transcoder (is_transcoder=true), not an SAE")
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", "relu")
    extra: dict[str, Any] = {}
    if arch == "gated":
        if "b_enc" in state:
            state = {k: v for k, v in state.items() if k != "b_enc"}
            notes.append("gated SAE: ViT-Prisma's unused b_enc dropped (its gated encoder uses b_gate, b_mag)")
    elif arch == "standard" and act == "relu":
        pass
    elif arch == "standard" and act == "topk":
        kw = cfg.get("activation_fn_kwargs") or {}
        if "k" not in kw:
            raise ImportFormatError(f"{where}: activation 'topk' without activation_fn_kwargs.k in config.json")
        arch, extra["k"] = "topk", int(kw["k"])
    else:
        raise ImportFormatError(f"{where}: architecture {arch!r} with activation {act!r} is not supported "
                                "(standard relu/topk and gated are)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", *PER_INPUT_NORMS):
        raise ImportFormatError(f"{where}: normalize_activations={norm!r} is not supported ({PER_INPUT_NORMS} "
                                "and 'none' are)")
    normalization: dict[str, Any] = {"kind": norm, "per_input": norm in PER_INPUT_NORMS, "scale": None}
    state = _scale(state, norm_scaling_factor, where, normalization, notes)
    hook = cfg.get("hook_point")
    if hook is None and cfg.get("hook_point_layer") is not None and cfg.get("layer_subtype"):
        hook = f"blocks.{int(cfg['hook_point_layer'])}.{cfg['layer_subtype']}"
    if hook is None:
        notes.append("config.json names no hook (hook_point / hook_point_layer + layer_subtype): pass the layer")
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != state["W_enc"].shape[0]:
        raise ImportFormatError(f"{where}: config d_in={cfg['d_in']} but W_enc has {state['W_enc'].shape[0]} rows")
    sae = make_saelens_sae(arch, state, apply_b_dec_to_input=True, normalize_activations=norm, hook=hook,
                           extra_cfg=extra, where=where)
    tokens = _tokens_from(cfg) or "all"
    return ForeignSAE(sae, "vit-prisma", str(src), [file_record(cfg_path), file_record(w_path)], hook, tokens,
                      "config.json (cls_token_only / use_patches_only)", normalization, notes, [],
                      json.loads(json.dumps(cfg, default=str)))


def load_foreign_sae(src: str | Path, fmt: str, norm_scaling_factor: float | None = None,
                     saev_subtract_b_dec: bool | None = None) -> ForeignSAE:
    """Read an outside SAE (``fmt`` one of ``saelens``, ``saev``, ``vit-prisma``) without a model.

    Args:
        src: the SAELens folder, the saev ``sae.pt`` (or its run / checkpoint directory), the ViT-Prisma
            directory (or its weights file).
        norm_scaling_factor: a constant the activations were multiplied by before the SAE (SAELens
            ``expected_average_only_in``, saev scaled shards); folded into the weights exactly.
        saev_subtract_b_dec: override saev's encoder rule (None: by schema).
    """
    if not Path(src).exists():
        raise ImportFormatError(f"{src} does not exist; pass the outside SAE's file or folder")
    if fmt == "saelens":
        return read_saelens(src, norm_scaling_factor)
    if fmt == "saev":
        return read_saev(src, norm_scaling_factor, saev_subtract_b_dec)
    if fmt == "vit-prisma":
        return read_prisma(src, norm_scaling_factor)
    raise ImportFormatError(f"unknown SAE format {fmt!r}; expected one of {FORMATS}")
