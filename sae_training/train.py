"""SAE training on activation shards through sae-lens (its architectures and ``SAETrainer``).

The loop drives ``SAETrainer`` through its public seams (``step``, ``maybe_reset_sparsity``,
``set_final_sae_metadata``) so that a time budget, resumable checkpoints (:mod:`.checkpoint`: safetensors +
JSON only, no pickles) and our progress display fit in; the optimisation itself is sae-lens's. The result is saved with
sae-lens's ``save_inference_model`` so ``sae_lens.SAE.load_from_disk`` loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_cafe.activations import ShardReader
from sae_cafe.activations.extract import dataset_hash
from sae_cafe.activations.shards import check_tokens
from sae_cafe.artifacts import (
    MANIFEST,
    atomic_write_json,
    clean_partial_files,
    finished_temp_stage,
    hash_json,
    publish_stage,
    temp_stage_path,
    write_manifest,
)
from sae_cafe.errors import ArtifactError, SaeCafeError

from .checkpoint import check_seams, latest_checkpoint, load_checkpoint, read_checkpoint_state, save_checkpoint
from .data import ShardDataProvider, holdout_split, training_rows

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class SAETrainConfig:
    """Hyper-parameters of one SAE training run (CLI flags / TOML keys have the same names).

    ``k``: active latents (topk/batchtopk/matryoshka; default min(32, d_in // 8)). ``l1_coefficient``:
    standard SAE sparsity; ``l0_coefficient``: JumpReLU. ``steps``/``seconds``: budget (first reached
    stops). ``holdout``: fraction of images (last ones) kept out of training for evaluation.
    ``tokens``: the token kinds trained on — ``"patch"`` (default: grid positions), ``"all"`` (also ViT
    class / register / distillation tokens) or ``"cls"`` (class tokens); they must have been extracted.
    ``outliers``: rows flagged as high-norm outliers at extraction are trained on with a note (``"report"``)
    or left out (``"exclude"``).
    ``normalize``: sae-lens ``normalize_activations``. ``"expected_average_only_in"`` (default) scales the
    PFVs by ``√d_in / mean norm``, the mean taken exactly over the training rows (tokens, outliers and held-out
    images as above), so their mean norm is √d_in; the factor is recorded (manifest and cfg metadata
    ``activation_norm``) and folded into the exported weights by sae-lens
    (``fold_activation_norm_scaling_factor``), so the SAE encodes and reconstructs in the model's units.
    ``"none"`` trains on raw PFVs.
    ``lr``: default ``3e-3 · sqrt(384 / d_sae)`` clipped to [1e-4, 3e-3]. ``aux_loss_coefficient`` and a short
    ``dead_feature_window`` (steps) drive sae-lens's dead-latent auxiliary loss (topk-family SAEs);
    these defaults gave < 10 % dead latents on the concept-world mini models.
    """

    architecture: str = "batchtopk"
    expansion: int = 8
    d_sae: int | None = None
    k: float | None = None
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    jumprelu_target_l0: float | None = None
    matryoshka_widths: list[int] | None = None
    steps: int | None = 2000
    seconds: float | None = None
    batch_size: int = 4096
    lr: float | None = None
    lr_warm_up_steps: int = 0
    lr_decay_fraction: float = 0.2
    normalize: str = "expected_average_only_in"
    aux_loss_coefficient: float = 4.0
    dead_feature_window: int = 50
    feature_sampling_window: int = 500
    n_checkpoints: int = 4
    holdout: float = 0.1
    tokens: str = "patch"
    outliers: str = "report"
    buffer_rows: int | None = None
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def _sae_lens_config(cfg: SAETrainConfig, d_in: int, metadata: dict[str, Any]):
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    arch = cfg.architecture
    if arch not in ARCHITECTURES:
        raise SaeCafeError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    d_sae = int(cfg.d_sae or cfg.expansion * d_in)
    k = cfg.k if cfg.k is not None else max(1, min(32, d_in // 8))
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device=cfg.device,
                  normalize_activations=cfg.normalize, metadata=SAEMetadata(**metadata), **cfg.extra)
    if arch == "standard":
        return sae_lens.StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common)
    aux = {"aux_loss_coefficient": cfg.aux_loss_coefficient}
    if arch == "topk":
        return sae_lens.TopKTrainingSAEConfig(k=int(k), **aux, **common)
    if arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAEConfig(k=float(k), **aux, **common)
    if arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAEConfig(l0_coefficient=cfg.l0_coefficient,
                                                  target_l0=cfg.jumprelu_target_l0, **common)
    widths = cfg.matryoshka_widths or [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(k=float(k), matryoshka_widths=list(widths), **aux,
                                                         **common)


def make_training_sae(cfg: SAETrainConfig, d_in: int, metadata: dict[str, Any] | None = None):
    """A fresh sae-lens ``TrainingSAE`` of ``cfg.architecture``."""
    from sae_lens.saes.sae import TrainingSAE

    sl_cfg = _sae_lens_config(cfg, d_in, metadata or {})
    cls = TrainingSAE.get_sae_class_for_architecture(sl_cfg.architecture())
    torch.manual_seed(cfg.seed)
    return cls(sl_cfg)


def default_lr(d_sae: int) -> float:
    """``3e-3 · sqrt(384 / d_sae)`` clipped to [1e-4, 3e-3] (tuned on the mini models; ∝ 1/sqrt(width))."""
    return float(min(3e-3, max(1e-4, 3e-3 * (384 / d_sae) ** 0.5)))


def make_trainer(sae, provider, cfg: SAETrainConfig, total_steps: int):
    """sae-lens ``SAETrainer`` for ``total_steps`` steps (linear LR decay over the last fraction)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
    decay = int(total_steps * cfg.lr_decay_fraction) if cfg.steps is not None else 0
    tcfg = SAETrainerConfig(
        total_training_samples=total_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=lr, lr_end=lr / 10, lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=decay, device=cfg.device,
        dead_feature_window=cfg.dead_feature_window, feature_sampling_window=cfg.feature_sampling_window,
        n_checkpoints=0, checkpoint_path=None, n_batches_for_norm_estimate=min(
            100, max(10, 200_000 // cfg.batch_size)))
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider)
    check_seams(trainer)
    return trainer


# ----- training ---------------------------------------------------------------------------------------------
def default_sae_dir(acts_dir: Path) -> Path:
    """``indexes/<run>/acts/<model>/<layer>`` → ``indexes/<run>/saes/<model>/<layer>``."""
    acts_dir = Path(acts_dir)
    if acts_dir.parent.parent.name != "acts":
        raise SaeCafeError(f"{acts_dir} is not in the indexes/<run>/acts/<model>/<layer> layout; pass out_dir")
    return acts_dir.parent.parent.parent / "saes" / acts_dir.parent.name / acts_dir.name


def run_training(trainer, provider, cfg: SAETrainConfig, total_steps: int, ckpt_dir: Path | None,
                 progress: bool = True, elapsed0: float = 0.0, log_every: int = 50,
                 history: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Drive ``trainer`` until ``total_steps`` or ``cfg.seconds``; returns the loss history and timing.

    With checkpoints (``cfg.n_checkpoints`` and ``ckpt_dir``) a checkpoint is also saved when the budget is
    reached, so a run killed while exporting resumes without training again. ``history``: the loss history
    of the steps before a resumed checkpoint.
    """
    sae = trainer.sae
    if sae.cfg.normalize_activations == "expected_average_only_in" and \
            trainer.activation_scaler.scaling_factor is None:
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=sae.cfg.d_in, data_provider=provider,
            n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate)
    elif sae.cfg.normalize_activations == "covariance_whitening" and trainer.activation_scaler.whitening is None:
        trainer.activation_scaler.estimate_whitening(
            d_in=sae.cfg.d_in, data_provider=provider,
            n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate)
    ck_every = max(1, total_steps // (cfg.n_checkpoints + 1)) if cfg.n_checkpoints and ckpt_dir else None
    history = list(history or [])

    def checkpoint(step: int) -> None:
        save_checkpoint(trainer, ckpt_dir / f"step_{step:08d}", time.perf_counter() - start,
                        {"provider_batches": int(provider.served), "history": history})

    start = time.perf_counter() - elapsed0
    step0 = trainer.n_training_steps
    bar = tqdm(total=total_steps, initial=step0, desc="train SAE", unit="step", disable=not progress)
    try:
        while trainer.n_training_steps < total_steps:
            if cfg.seconds is not None and time.perf_counter() - start >= cfg.seconds:
                break
            trainer.maybe_reset_sparsity()
            out = trainer.step(next(provider))
            trainer.n_training_steps += 1
            s = trainer.n_training_steps
            if s % log_every == 0 or s == total_steps:
                with torch.no_grad():
                    x, xh = out.sae_in, out.sae_out
                    ev = 1 - (xh - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
                    row = {"step": s, "loss": float(out.loss), "mse": float(out.losses["mse_loss"]),
                           "explained_variance": float(ev),
                           "l0": float((out.feature_acts != 0).float().sum(-1).mean()),
                           "dead": int(trainer.dead_neurons.sum())}
                history.append(row)
                bar.set_postfix(ev=f"{row['explained_variance']:.3f}", l0=f"{row['l0']:.1f}", dead=row["dead"])
            bar.update(1)
            if ck_every and s % ck_every == 0 and s < total_steps:
                checkpoint(s)
        if ck_every and trainer.n_training_steps > step0:
            checkpoint(trainer.n_training_steps)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    steps_run = trainer.n_training_steps - step0
    return {"history": history, "train_seconds": seconds, "steps": trainer.n_training_steps,
            "samples": trainer.n_training_samples,
            "samples_per_second": steps_run * cfg.batch_size / max(seconds - elapsed0, 1e-9)}


def finish_trainer(trainer) -> None:
    """Fold activation normalisation into the weights and record final stats (as ``SAETrainer.fit`` does)."""
    sae, sc = trainer.sae, trainer.activation_scaler
    if sc.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(sc.scaling_factor)
        sc.scaling_factor = None
    if sc.whitening is not None:
        sae.fold_activation_whitening(mean=sc.whitening.mean, whitening_matrix=sc.whitening.matrix,
                                      unwhitening_matrix=sc.whitening.inverse_matrix)
        sc.whitening = None
    trainer.set_final_sae_metadata()


def train_sae(acts_dir: str | Path, out_dir: str | Path | None = None, architecture: str = "batchtopk",
              expansion: int = 8, k: float | None = None, steps: int | None = 2000, seconds: float | None = None,
              config: SAETrainConfig | None = None, model: Any = None, eval_images: Any = None,
              eval_labels: Any = None, resume: bool = True, overwrite: bool = True, progress: bool = True,
              evaluate: bool = True, return_sae: bool = False, **overrides: Any) -> dict[str, Any]:
    """Train an SAE on an ``acts`` stage and save it as a sae-lens inference export + manifest.

    Args:
        acts_dir: ``indexes/<run>/acts/<model>/<layer>``.
        out_dir: default ``indexes/<run>/saes/<model>/<layer>``.
        architecture, expansion, k, steps, seconds: shortcuts for :class:`SAETrainConfig` fields;
            ``config`` gives all of them, ``overrides`` set any other field.
        model, eval_images, eval_labels: also evaluate the spliced-in model on held-out images.
        resume: continue from the checkpoints of an interrupted run with the same config.
        return_sae: also return the trained (in-memory, normalisation folded) sae-lens SAE under "sae".

    Returns the metrics: training summary and the evaluation of the SAE as reloaded from disk on the
    held-out images' PFVs (explained variance, L0, dead/dense latents) and, with ``model`` and
    ``eval_images``, accuracy and logit KL with the SAE spliced in; ``notes``: sentences also recorded in the
    manifest and warned (high-norm outlier rows trained on or left out, shards without an outlier report).
    """
    reader = ShardReader(acts_dir)
    if config is None:
        config = SAETrainConfig(architecture=architecture, expansion=expansion, k=k, steps=steps,
                                seconds=seconds)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    if config.steps is None and config.seconds is None:
        raise SaeCafeError("give a training budget: steps and/or seconds")
    check_tokens(config.tokens, "SAE training tokens")
    if config.outliers not in ("report", "exclude"):
        raise SaeCafeError(f"outliers={config.outliers!r}; use 'report' or 'exclude'")
    final = Path(out_dir) if out_dir is not None else default_sae_dir(reader.directory)
    if final.exists() and (final / MANIFEST).exists() and not overwrite:
        raise ArtifactError(f"{final} already holds an SAE; pass overwrite=True (CLI --overwrite)")
    train_rng, held_rng = holdout_split(reader.n_images, config.holdout)
    if evaluate and (eval_images is None or model is None) and held_rng[1] <= held_rng[0]:
        raise SaeCafeError(f"holdout={config.holdout} leaves no held-out image of the {reader.n_images} in "
                           f"{reader.directory} to evaluate the SAE on; set holdout > 0 (with at least 2 images), "
                           "pass eval_images (and model), or evaluate=False")
    rows, notes = _training_rows(reader, config, train_rng)
    dataset_name = reader.manifest.get("dataset", {}).get("name")
    metadata = {
        "model_name": reader.model, "hook_name": reader.layer, "weights_hash": reader.weights_hash,
        "dataset_path": str(reader.directory), "dataset": dataset_name,
        "dataset_hash": dataset_hash(reader), "context_size": None,
        "sae_cafe": {"pfv_layout": reader.manifest.get("pfv_layout"), "grid": list(reader.grid),
                     "layer_kind": reader.manifest.get("layer_kind"), "family": reader.manifest.get("family"),
                     "preprocessing": reader.manifest.get("preprocessing"),
                     "train_images": list(train_rng), "held_out_images": list(held_rng),
                     "tokens": config.tokens, "outliers": config.outliers,
                     "activation_norm": _activation_norm(config, reader.d_in, rows)},
    }
    key = hash_json({"config": config, "acts": reader.manifest.get("extract_key"), "n": reader.n})
    tmp = temp_stage_path(final)
    if resume and finished_temp_stage(final, "run_key", key):  # killed after the manifest, before publishing
        train_metrics = json.loads((tmp / "training.json").read_text())
        _publish(tmp, final)
        sae = None
    else:
        sae, train_metrics = _train(reader, final, tmp, config, key, metadata, train_rng, held_rng, dataset_name,
                                    resume, progress, rows, notes)
    metrics: dict[str, Any] = {"sae_dir": str(final), "training": train_metrics, "notes": notes}
    if evaluate:
        from .evaluate import evaluate_sae

        metrics["eval"] = evaluate_sae(final, acts=reader.directory, image_range=held_rng, model=model,
                                       images=eval_images, labels=eval_labels, progress=progress)
    if return_sae:
        if sae is None:
            from sae_lens import SAE

            sae = SAE.load_from_disk(str(final), device=config.device)
        metrics["sae"] = sae
    return metrics


def _training_rows(reader: ShardReader, config: SAETrainConfig, train_rng: tuple[int, int]
                   ) -> tuple[dict[str, Any], list[str]]:
    """The training rows' count, mean norm and outliers (:func:`.data.training_rows`) and the notes to record;
    a token setting that selects no row is an error saying what the shards hold."""
    exclude = config.outliers == "exclude"
    rows = training_rows(reader, train_rng, config.tokens, exclude)
    by_kind = (reader.manifest.get("counts") or {}).get("by_kind")
    if rows["n"] == 0:
        raise SaeCafeError(f"tokens={config.tokens!r} selects no training PFV at {reader.directory}: the shards were "
                           f"extracted with tokens={reader.tokens!r}" + (f" (rows per kind: {by_kind})" if by_kind
                                                                        else "")
                           + "; re-extract with that token setting (extract tokens='all' or 'cls') or train on "
                             "the tokens the shards hold")
    notes = []
    report = reader.outlier_report
    if report is None:
        notes.append(f"{reader.directory} predates the high-norm outlier report: its tokens were not checked "
                     "for outliers (re-extract to get the report)")
    elif report.get("n") and not exclude and rows["outliers"]:
        notes.append(f"trained on {rows['outliers']} high-norm outlier rows of {rows['n']} (flagged at extraction, "
                     f"norm up to {report['norm_ratio']['max']:.1f}× the image's median); set outliers='exclude' "
                     "to leave them out")
    elif exclude and rows["outliers_excluded"]:
        notes.append(f"left out {rows['outliers_excluded']} high-norm outlier rows (outliers='exclude')")
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return rows, notes


def _activation_norm(config: SAETrainConfig, d_in: int, rows: dict[str, Any]) -> dict[str, Any]:
    """The record of the activation normalisation (manifest and cfg metadata ``activation_norm``)."""
    out: dict[str, Any] = {"normalize": config.normalize}
    if config.normalize == "expected_average_only_in":
        out.update(scaling_factor=d_in ** 0.5 / rows["mean_norm"], mean_norm=rows["mean_norm"],
                   target_mean_norm=d_in ** 0.5, rows=rows["n"], folded_into_weights=True,
                   how="x · scaling_factor before encoding, x̂ / scaling_factor after decoding; folded into "
                       "W_enc, W_dec, b_dec by sae-lens fold_activation_norm_scaling_factor, so the exported "
                       "SAE works in the model's units")
    return out


def _publish(tmp: Path, final: Path) -> None:
    shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)
    (tmp / "run_key.json").unlink(missing_ok=True)
    publish_stage(tmp, final)


def _train(reader: ShardReader, final: Path, tmp: Path, config: SAETrainConfig, key: str,
           metadata: dict[str, Any], train_rng: tuple[int, int], held_rng: tuple[int, int],
           dataset_name: str | None, resume: bool, progress: bool, rows: dict[str, Any], notes: list[str]):
    """Train (resuming from the checkpoints in ``tmp``), export into ``tmp`` and publish it as ``final``.

    Kill-safe at every point: the temporary stage keeps ``run_key.json`` and the checkpoints until the
    manifest is written; a later call resumes from the latest complete checkpoint (the data provider is
    fast-forwarded to the batch the checkpoint was taken at, so the result equals an uninterrupted run) or,
    once the manifest exists, only publishes.
    """
    ckpt_dir = tmp / CHECKPOINTS
    if tmp.exists():
        same = False
        with contextlib.suppress(OSError, json.JSONDecodeError):
            same = json.loads((tmp / "run_key.json").read_text()) == key
        if not (resume and same) or (tmp / MANIFEST).exists():
            shutil.rmtree(tmp)
        else:
            clean_partial_files(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    atomic_write_json(tmp / "run_key.json", key)

    sae = make_training_sae(config, reader.d_in, metadata)
    provider = ShardDataProvider(reader, config.batch_size, image_range=train_rng, seed=config.seed,
                                 buffer_rows=config.buffer_rows, device=config.device, tokens=config.tokens,
                                 exclude_outliers=config.outliers == "exclude")
    total_steps = int(config.steps) if config.steps is not None else 10 ** 9 // config.batch_size
    trainer = make_trainer(sae, provider, config, total_steps)
    norm = metadata["sae_cafe"]["activation_norm"]
    if "scaling_factor" in norm:  # the exact factor (sae-lens would estimate it from a few batches)
        trainer.activation_scaler.scaling_factor = float(norm["scaling_factor"])
    elapsed0, history = 0.0, []
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        elapsed0 = load_checkpoint(trainer, latest)
        state = read_checkpoint_state(latest)
        history = state["history"]
        provider.skip(state["provider_batches"])  # continue with the batches an uninterrupted run sees
    summary = run_training(trainer, provider, config, total_steps, ckpt_dir, progress, elapsed0,
                           history=history)
    summary["resumed_from_step"] = int(latest.name.split("_")[1]) if latest is not None else None
    dead_train = int(trainer.dead_neurons.sum())
    finish_trainer(trainer)
    sae = trainer.sae
    sae.cfg.metadata.sae_cafe = {**metadata["sae_cafe"], "architecture": config.architecture}
    for p in tmp.iterdir():  # an export cut short by a kill
        if p.name not in (CHECKPOINTS, "run_key.json"):
            p.unlink() if p.is_file() else shutil.rmtree(p)
    sae.save_inference_model(str(tmp))
    if len(summary["history"]) > 200:
        summary["history"] = summary["history"][:: len(summary["history"]) // 200 + 1]
    train_metrics = {"architecture": config.architecture, "d_in": reader.d_in, "d_sae": sae.cfg.d_sae,
                     "k": sae.cfg.k if hasattr(sae.cfg, "k") else None, "dead_during_training": dead_train,
                     "train_l0_window": sae.cfg.metadata.get("l0"), **summary}
    atomic_write_json(tmp / "training.json", train_metrics)
    write_manifest(tmp, "saes", config, upstream={"acts": reader.directory}, model=reader.model,
                   layer=reader.layer, d_in=reader.d_in, d_sae=sae.cfg.d_sae, architecture=config.architecture,
                   weights_hash=reader.weights_hash, model_record=reader.manifest.get("model_record"),
                   dataset=dataset_name, train_images=list(train_rng),
                   held_out_images=list(held_rng), sae_lens_files=["cfg.json", "sae_weights.safetensors"],
                   tokens=config.tokens, outliers=config.outliers,
                   activation_norm=metadata["sae_cafe"]["activation_norm"],
                   training_rows={k: rows[k] for k in ("n", "outliers", "outliers_excluded")},
                   outlier_report=reader.outlier_report, notes=notes,
                   training={k: v for k, v in train_metrics.items() if k != "history"}, run_key=key)
    _publish(tmp, final)
    return sae, train_metrics
