"""Checkpoints of SAE training: the one module that touches sae-lens's ``SAETrainer`` state.

sae-lens (6.54) saves its trainer state with ``SAETrainer.save_trainer_state`` as a torch pickle; this package
keeps no pickles, so the same state is written as safetensors (tensors) + JSON (everything else). The fields
are exactly those ``save_trainer_state`` / ``load_trainer_state`` read and write (:data:`TRAINER_STATE_FIELDS`),
and the SAE weights and activation scaler go through sae-lens's own public savers (``TrainingSAE.save_model``
/ ``load_weights_from_checkpoint``, ``ActivationScaler.save`` / ``load``). :func:`check_seams` checks, before
training, that the installed sae-lens still has every attribute and method relied on;
``tests/test_sae_checkpoint.py`` also checks that ``save_trainer_state`` writes no field this module misses,
so a sae-lens upgrade that changes the trainer state fails loudly instead of resuming wrongly.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_cafe.artifacts import atomic_write_json
from sae_cafe.errors import ArtifactError, SaeCafeError

#: The fields of sae-lens's ``SAETrainer.save_trainer_state`` (all restored by :func:`load_checkpoint`).
TRAINER_STATE_FIELDS = ("optimizer", "lr_scheduler", "n_training_samples", "n_training_steps", "act_freq_scores",
                        "n_forward_passes_since_fired", "n_frac_active_samples", "started_fine_tuning",
                        "coefficient_schedulers")
#: ``SAETrainer`` methods used by the training loop and this module, with the parameters passed to them.
TRAINER_METHODS = {"step": ("batch",), "maybe_reset_sparsity": (), "set_final_sae_metadata": (),
                   "save_trainer_state": ("checkpoint_path",), "load_trainer_state": ("checkpoint_path",)}
#: Attributes of a constructed ``SAETrainer`` read or written here and in ``train.run_training``.
TRAINER_ATTRIBUTES = ("sae", "optimizer", "lr_scheduler", "activation_scaler", "coefficient_schedulers",
                      "n_training_samples", "n_training_steps", "act_freq_scores", "n_forward_passes_since_fired",
                      "n_frac_active_samples", "started_fine_tuning", "dead_neurons", "cfg")
SCALER = "activation_scaler.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


def check_seams(trainer: Any = None) -> None:
    """Raise :class:`SaeCafeError` when the installed sae-lens lacks a method (with the parameters used) or,
    given a constructed ``trainer``, an attribute this module relies on."""
    from sae_lens.training.sae_trainer import SAETrainer

    missing = []
    for name, params in TRAINER_METHODS.items():
        fn = getattr(SAETrainer, name, None)
        if fn is None or not set(params) <= set(inspect.signature(fn).parameters):
            missing.append(f"SAETrainer.{name}({', '.join(params)})")
    if trainer is not None:
        missing += [f"SAETrainer().{a}" for a in TRAINER_ATTRIBUTES if not hasattr(trainer, a)]
        missing += [f"ActivationScaler.{a}" for a in ("save", "load", "scaling_factor")
                    if not hasattr(trainer.activation_scaler, a)]
    if missing:
        import sae_lens

        raise SaeCafeError(f"the installed sae-lens {getattr(sae_lens, '__version__', '?')} lacks "
                           f"{', '.join(missing)}, which SAE training relies on; install the version pinned in "
                           "pyproject.toml (pip install 'sae-lens>=6.54.12,<6.55')")


def save_checkpoint(trainer: Any, path: Path, elapsed: float, extra: dict[str, Any] | None = None) -> None:
    """SAE weights (sae-lens ``save_model``), the trainer state (:data:`TRAINER_STATE_FIELDS`) and the
    activation scaler — safetensors + JSON, no pickles.

    Written into ``.<name>.tmp`` and renamed into place, so a checkpoint directory is always complete.
    ``extra`` (JSON) is stored in ``trainer_state.json`` (the data position and loss history of a run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    trainer.sae.save_model(str(tmp))
    opt = trainer.optimizer.state_dict()
    tensors = {"act_freq_scores": trainer.act_freq_scores.cpu(),
               "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired.cpu()}
    for pid, st in opt["state"].items():
        for key, v in st.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(v).cpu().contiguous()
    save_file(tensors, str(tmp / STATE_TENSORS))
    state = {
        "optimizer": {"param_groups": opt["param_groups"]}, "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "n_training_samples": trainer.n_training_samples, "n_training_steps": trainer.n_training_steps,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "started_fine_tuning": bool(trainer.started_fine_tuning),
        "coefficient_schedulers": {n: s.state_dict() for n, s in trainer.coefficient_schedulers.items()},
        "elapsed": elapsed, **(extra or {}),
    }
    trainer.activation_scaler.save(str(tmp / SCALER))  # JSON (+ whitening safetensors)
    atomic_write_json(tmp / STATE_JSON, state)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(trainer: Any, path: Path) -> float:
    """Restore what :func:`save_checkpoint` wrote into a freshly built trainer; returns elapsed seconds."""
    path = Path(path)
    if not all((path / f).exists() for f in (STATE_JSON, STATE_TENSORS, SCALER)):
        raise ArtifactError(f"checkpoint {path} is incomplete (needs {STATE_JSON}, {STATE_TENSORS} and {SCALER}); "
                            "delete it to resume from an earlier checkpoint or start over")
    trainer.sae.load_weights_from_checkpoint(path)
    tensors = load_file(str(path / STATE_TENSORS), device=str(trainer.sae.device))
    state = read_checkpoint_state(path)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
    # JSON has no tuples: restore the types of the fresh optimizer's param groups (e.g. Adam's betas)
    template = trainer.optimizer.state_dict()["param_groups"]
    groups = [{k: tuple(v) if isinstance(t.get(k), tuple) else v for k, v in g.items()}
              for g, t in zip(state["optimizer"]["param_groups"], template, strict=True)]
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.n_training_samples = state["n_training_samples"]
    trainer.n_training_steps = state["n_training_steps"]
    trainer.n_frac_active_samples = state["n_frac_active_samples"]
    trainer.started_fine_tuning = bool(state["started_fine_tuning"])
    trainer.act_freq_scores = tensors["act_freq_scores"]
    trainer.n_forward_passes_since_fired = tensors["n_forward_passes_since_fired"]
    for n, s in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[n].load_state_dict(s)
    trainer.activation_scaler.load(path / SCALER)
    return float(state["elapsed"])


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (steps, data position, loss history, …)."""
    try:
        return json.loads((Path(path) / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"checkpoint {path}: {STATE_JSON} unreadable ({e}); delete the checkpoint") from e


def latest_checkpoint(directory: Path) -> Path | None:
    """The ``step_<n>`` checkpoint with the largest n that has its state file, or None."""
    cks = [p for p in Path(directory).glob("step_*") if (p / STATE_JSON).exists()]
    return max(cks, key=lambda p: int(p.name.split("_")[1])) if cks else None


__all__ = ["TRAINER_STATE_FIELDS", "check_seams", "latest_checkpoint", "load_checkpoint", "read_checkpoint_state",
           "save_checkpoint"]
