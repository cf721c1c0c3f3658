"""Loading weights from local files only: safetensors, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..artifacts import hash_file
from ..errors import NonFiniteError, WeightsError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint (no pickled objects)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist; pass the path of a local .pth/.pt/.safetensors "
                           "file (nothing is ever downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same user error
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}. It must be a "
                           ".safetensors file or a torch state_dict saved with torch.save(model.state_dict())"
                           ) from e
    for key in WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | Path, model_name: str = "model") -> str:
    """Load local weights into ``model`` strictly; return the file's sha256.

    Missing/unexpected keys, shape mismatches and NaN/inf values are errors naming the file.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not fit {model_name}: {len(missing)} missing key(s) {missing[:8]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:8]}. Use weights saved from the same "
            f"architecture ({model_name}).")
    bad_shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                  if tuple(sd[k].shape) != tuple(v.shape)]
    if bad_shapes:
        raise WeightsError(f"weights file {path} has wrong shapes for {model_name}: {bad_shapes[:5]}")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise NonFiniteError(f"weights file {path} contains NaN/inf in {nonfinite[:5]}; the checkpoint is "
                             "corrupt (retrain or re-export it)")
    model.load_state_dict(sd, strict=True)
    return hash_file(path)
