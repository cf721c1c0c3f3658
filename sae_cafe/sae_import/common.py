"""Shared pieces of the SAE importers: the :class:`ForeignSAE` record, the one safe ``torch.load``, and the
construction of a sae-lens SAE from an outside SAE's arrays with its math kept exactly.

Written by hand (sae-lens converts only its own pretrained releases, from the Hugging Face hub): the
importers read local files only and never unpickle anything.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # the exception torch.load(weights_only=True) raises; nothing here unpickles
from typing import Any

import torch

from ..artifacts import hash_file
from ..errors import ArtifactError, MismatchError

#: the import formats, as the CLI names them
FORMATS = ("saelens", "saev", "vit-prisma")
#: which tokens an SAE was trained on, as recorded in the manifest
TOKEN_SETS = ("patch", "cls", "all")
#: per-input normalisations sae-lens applies at run time (kept as they are: they cannot be folded into weights)
PER_INPUT_NORMS = ("constant_norm_rescale", "layer_norm")


class ImportFormatError(ArtifactError):
    """An outside SAE file that cannot be read or whose math has no exact sae-lens equivalent."""


@dataclass(frozen=True)
class ForeignSAE:
    """An outside SAE read into a sae-lens SAE whose ``encode`` equals the outside encoder.

    Attributes:
        sae: the ``sae_lens.SAE`` (float32 or float64, CPU), ``cfg.metadata.hook_name`` = ``hook``.
        format: one of :data:`FORMATS`. source: the path given. files: ``[{"path", "sha256"}]`` of every
            file read. hook: the hook / layer name the source records (None: the format records none).
        tokens: ``"patch"``, ``"cls"``, ``"all"`` or None (the format does not say). tokens_source: where
            ``tokens`` came from. normalization: ``{"kind", "per_input", "scale"}`` as the source had it
            (constant scales are folded into the weights). notes: what was mapped how (JSON strings).
        warnings: deviations from the outside math that could not be avoided (recorded in the manifest).
        source_cfg: the source's configuration (JSON values).
    """

    sae: Any
    format: str
    source: str
    files: list[dict[str, str]]
    hook: str | None
    tokens: str | None
    tokens_source: str
    normalization: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())


def file_record(path: Path) -> dict[str, str]:
    """``{"path": absolute path, "sha256": hex}`` of a source file."""
    return {"path": str(path.resolve()), "sha256": hash_file(path)}


def safe_torch_load(data: bytes | Path, where: str) -> Any:
    """``torch.load(weights_only=True)`` of a file or bytes; a file it refuses (pickled classes/functions) is an
    :class:`ImportFormatError` saying what to do. Never unpickles arbitrary objects."""
    buf = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(buf, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's own text suggests unpickling: not relayed
        what = f" (a {found.group(1)})" if found else ""
        raise ImportFormatError(
            f"{where} holds pickled Python objects{what} that torch.load(weights_only=True) refuses; "
            "sae-cafe never unpickles files. In an environment where you trust the file, load it with its own "
            "library and save only the tensors, e.g. torch.save(sae.state_dict(), 'weights.pt') or "
            "safetensors.torch.save_file(...), next to a JSON config, then convert again") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ImportFormatError(f"{where} is not a readable torch file ({type(e).__name__}: {str(e)[:200]}); "
                                "check the path or re-save the weights") from e


def tensor_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state dict (a clear error for anything else)."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ImportFormatError(f"{where} is not a state dict of named tensors (got {type(obj).__name__}); "
                                "save the SAE's state_dict() only")
    return obj


def need(state: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise ImportFormatError(f"{where} lacks the SAE tensors {missing} (has {sorted(state)}); is this the "
                                "right file / format?")


def work_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """float64 when the source is float64, else float32 (half precisions are widened exactly)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in state.values()) else torch.float32


def make_saelens_sae(architecture: str, state: dict[str, torch.Tensor], *, apply_b_dec_to_input: bool,
                     normalize_activations: str = "none", hook: str | None = None, extra_cfg: dict | None = None,
                     where: str = "the SAE") -> Any:
    """A sae-lens SAE of ``architecture`` holding ``state`` (sae-lens names and shapes: ``W_enc`` (D, S),
    ``W_dec`` (S, D), ``b_enc`` (S,), ``b_dec`` (D,), gated: ``b_gate``, ``r_mag``, ``b_mag``; jumprelu:
    ``threshold``). Shapes are checked; loading is strict (an unknown tensor is an error)."""
    from sae_lens import SAE

    dtype = work_dtype(state)
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    need(state, ("W_enc", "W_dec", "b_dec"), where)
    d_in, d_sae = state["W_enc"].shape
    if tuple(state["W_dec"].shape) != (d_sae, d_in) or tuple(state["b_dec"].shape) != (d_in,):
        raise ImportFormatError(f"{where}: W_enc {tuple(state['W_enc'].shape)}, W_dec {tuple(state['W_dec'].shape)}"
                                f" and b_dec {tuple(state['b_dec'].shape)} do not fit together (expected W_enc "
                                "(d_in, d_sae), W_dec (d_sae, d_in), b_dec (d_in,))")
    cfg = {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae),
           "dtype": "float64" if dtype == torch.float64 else "float32", "device": "cpu",
           "apply_b_dec_to_input": bool(apply_b_dec_to_input), "normalize_activations": normalize_activations,
           "metadata": {"hook_name": hook}, **(extra_cfg or {})}
    try:
        sae = SAE.from_dict(cfg)
        sae.process_state_dict_for_loading(state)
        sae.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ImportFormatError(f"{where}: cannot build a sae-lens {architecture!r} SAE from it ({type(e).__name__}: "
                                f"{str(e)[:300]})") from e
    return sae.eval()


def fold_input_scale(state: dict[str, torch.Tensor], scale: float, where: str) -> dict[str, torch.Tensor]:
    """Fold a constant input scaling ``x → scale·x`` (undone on the output) into the weights, exactly as sae-lens
    ``fold_activation_norm_scaling_factor``: W_enc·s, W_dec/s, b_dec/s (computed in float64)."""
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise MismatchError(f"{where}: the activation scaling factor must be a positive finite number, got {scale}")
    out = dict(state)
    for name, f in (("W_enc", scale), ("W_dec", 1 / scale), ("b_dec", 1 / scale)):
        t = state[name]
        out[name] = (t.double() * f).to(work_dtype(state))
    if "threshold" in state:  # JumpReLU thresholds live on the pre-activation scale, which W_enc·s keeps
        out["threshold"] = state["threshold"]
    return out
