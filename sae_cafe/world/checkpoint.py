"""Training checkpoints of the mini models: one safetensors file per checkpoint (model, optimizer, torch RNG)
whose metadata holds the JSON training state, written atomically (temporary sibling + ``os.replace``).

Tensor names: ``model/<state-dict key>``, ``optim/<param index>/<state key>`` (AdamW's ``step``,
``exp_avg``, ``exp_avg_sq``), ``rng/torch``. Metadata: ``format`` = ``sae-cafe-train-checkpoint``,
``version``, ``state`` (JSON: step, config, curve, CPU/wall time, optimizer param groups). A readable copy
of the state is written next to it as ``<name>.json`` (informational; the safetensors metadata is what a
resume reads). Hand-written: torch's own checkpoints are pickles, which the project does not use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import SaeCafeError

FORMAT = "sae-cafe-train-checkpoint"
VERSION = "1"


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write ``path`` (``.safetensors``) and ``path.with_suffix('.json')`` atomically; returns ``path``.

    ``state`` must be JSON-able; the optimizer's param groups are added to it as ``optimizer_groups``.
    """
    from safetensors.torch import save

    from ..artifacts import atomic_write_bytes, atomic_write_json, to_jsonable

    path = Path(path)
    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    for idx, st in osd["state"].items():
        for key, val in st.items():
            if not torch.is_tensor(val):
                raise SaeCafeError(f"save_checkpoint: optimizer state {idx}/{key} is not a tensor "
                                   f"({type(val).__name__}); only tensor states (AdamW) are supported")
            tensors[f"optim/{idx}/{key}"] = val.detach().clone().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    full = dict(state, optimizer_groups=osd["param_groups"])
    meta = {"format": FORMAT, "version": VERSION, "state": json.dumps(to_jsonable(full), sort_keys=True)}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    atomic_write_json(path.with_suffix(".json"), full)
    return path


def read_checkpoint_state(path: str | Path) -> dict:
    """The JSON state stored in checkpoint ``path`` (no tensors are loaded)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any read failure means the same: not a usable checkpoint
        raise SaeCafeError(f"cannot read training checkpoint {path} ({type(e).__name__}: {e}); delete it to "
                           "start over or point the run at another checkpoint folder") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise SaeCafeError(f"{path} is not a version-{VERSION} training checkpoint (metadata format="
                           f"{meta.get('format')!r}, version={meta.get('version')!r}); use another folder")
    return json.loads(meta["state"])


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model, optimizer and torch RNG from checkpoint ``path`` (in place); return its JSON state."""
    from safetensors.torch import load_file

    state = read_checkpoint_state(path)
    tensors = load_file(str(path))
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = set(model.state_dict()) - set(model_sd), set(model_sd) - set(model.state_dict())
    if missing or unexpected:
        raise SaeCafeError(f"checkpoint {path} does not fit the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}); it belongs to another architecture")
    model.load_state_dict(model_sd)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    return state
