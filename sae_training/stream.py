"""Streamed SAE training: SAEs for several layers and several sae-lens architectures/sizes at once, from the
model's forward passes over an image source, without an activation-shard cache.

The training is sae-lens's own multi-SAE training: :class:`sae_lens.training.multi_sae_trainer.MultiSAETrainer`
(one ``SAETrainer`` per SAE, stepped in lockstep on a multi-hook stream) drives the optimisation, its
scaling-factor estimation, checkpoint schedule, activation-norm folding and final metadata. Ours are the data
provider (:mod:`.stream_data`: per-layer shuffling buffers fed by our adapter's PFVs), the checkpoint files
(safetensors + JSON through :mod:`.checkpoint`, not sae-lens's pickles, plus the buffers, generator states and
image-source position, so a resumed run reaches bitwise-equal weights) and the export (each SAE in our
``saes/<model>/<layer>/`` layout with a manifest, loadable with ``sae_lens.SAE.load_from_disk``).

Each SAE trains on the token kinds of its ``SAETrainConfig.tokens`` (patch tokens by default, as the shard
path) and the high-norm outlier rows are reported or left out (``outliers``) by the shard path's rule; both are
recorded where the shard path records them (manifest ``tokens`` / ``outliers`` / ``outlier_report`` /
``training_rows`` / ``notes``; cfg metadata ``sae_cafe.tokens``, read by :func:`sae_cafe.saes.sae_tokens`).

Shard training (:func:`sae_training.train.train_sae`) stays the default: it keeps the PFVs for reuse and a
held-out split; streaming trades that for no disk cache and one forward pass for all SAEs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_cafe.activations.shards import check_tokens
from sae_cafe.artifacts import (
    MANIFEST,
    atomic_write_json,
    clean_partial_files,
    finished_temp_stage,
    hash_json,
    is_finished,
    publish_stage,
    read_manifest,
    stage_path,
    temp_stage_path,
    write_manifest,
)
from sae_cafe.errors import ArtifactError, SaeCafeError
from sae_cafe.model_record import record_for
from sae_cafe.models import get_adapter

from .checkpoint import check_seams, load_checkpoint, save_checkpoint
from .stream_data import STATE_FORMAT, StreamProvider
from .train import SAETrainConfig, default_lr, make_training_sae

STATE = "stream_state.json"
PROVIDER = "provider.safetensors"
#: SAETrainConfig fields that all streamed SAEs share (taken from :class:`StreamConfig`).
SHARED = ("steps", "batch_size", "lr_warm_up_steps", "lr_decay_fraction", "dead_feature_window",
          "feature_sampling_window", "n_checkpoints", "device")


@dataclass(frozen=True)
class StreamSAE:
    """One SAE of a streamed run: its layer, its sae-lens architecture/size (:class:`SAETrainConfig`; the
    fields in :data:`SHARED` come from :class:`StreamConfig`) and an optional ``variant`` name. The SAE is
    written to ``<root>/<run>/saes/<model>/<layer>/`` (``<run>-<variant>`` with a variant), so one run holds
    one SAE per layer as everywhere else in sae-cafe. ``holdout`` does not apply (nothing is stored to hold
    out; evaluate with ``eval_images``); ``seconds`` is refused (step budget only)."""

    layer: str
    config: SAETrainConfig = field(default_factory=SAETrainConfig)
    variant: str | None = None


@dataclass(frozen=True)
class StreamConfig:
    """Settings shared by every SAE of a streamed run.

    ``steps`` × ``batch_size`` PFVs per SAE (all SAEs see the same number). ``buffer_rows``: rows per layer's
    shuffling buffer (default ``max(8·batch_size, 65536)``); ``mix_fraction``: kept back per shuffle
    (sae-lens's ``activations_mixing_fraction``). ``image_batch_size``: images per forward pass.
    ``rows_per_image``: PFVs kept per image and layer (default: the smallest grid among the layers).
    ``n_checkpoints``: resumable checkpoints during training (sae-lens's schedule) plus one at the end.
    ``outlier_k``: the high-norm outlier rule's k (the extraction's ``outlier_k``: a token is an outlier when
    its norm exceeds its image's median + k·MAD of patch-token norms).
    The token kinds (``tokens``) and the outlier handling (``outliers``) are per SAE (:class:`SAETrainConfig`);
    SAEs of one layer share the layer's stream, so they must agree on both.
    """

    steps: int = 2000
    batch_size: int = 4096
    buffer_rows: int | None = None
    mix_fraction: float = 0.5
    image_batch_size: int = 32
    rows_per_image: int | None = None
    lr_warm_up_steps: int = 0
    lr_decay_fraction: float = 0.2
    dead_feature_window: int = 50
    feature_sampling_window: int = 500
    n_checkpoints: int = 4
    seed: int = 0
    device: str = "cpu"
    outlier_k: float = 10.0


def _check_specs(specs: Sequence[StreamSAE], cfg: StreamConfig) -> list[StreamSAE]:
    default = SAETrainConfig()
    out = []
    for s in specs:
        for f in SHARED:
            v = getattr(s.config, f)
            if v != getattr(default, f) and v != getattr(cfg, f):
                raise SaeCafeError(f"SAE {s.layer!r} ({s.config.architecture}) sets {f}={v!r}, but streamed SAEs "
                                   f"share {f} (StreamConfig.{f}={getattr(cfg, f)!r}); set it in StreamConfig")
        if s.config.seconds is not None:
            raise SaeCafeError("streamed training has a step budget only (StreamConfig.steps); drop seconds")
        check_tokens(s.config.tokens, f"SAE {s.layer!r} ({s.config.architecture}) tokens")
        if s.config.outliers not in ("report", "exclude"):
            raise SaeCafeError(f"SAE {s.layer!r} ({s.config.architecture}) sets outliers={s.config.outliers!r}; "
                               "use 'report' or 'exclude'")
        out.append(dataclasses.replace(s, config=dataclasses.replace(
            s.config, **{f: getattr(cfg, f) for f in SHARED}, seconds=None)))
    return out


def layer_settings(specs: Sequence[StreamSAE], names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``({layer: tokens}, [layers whose outliers are excluded])`` of the SAEs; the SAEs of one layer share its
    stream, so two that disagree on ``tokens`` or ``outliers`` are an error naming both."""
    tokens: dict[str, str] = {}
    outliers: dict[str, str] = {}
    first: dict[str, str] = {}
    for n, s in zip(names, specs, strict=True):
        for what, seen in (("tokens", tokens), ("outliers", outliers)):
            v = getattr(s.config, what)
            if s.layer in seen and seen[s.layer] != v:
                raise SaeCafeError(f"SAEs {first[s.layer]!r} ({what}={seen[s.layer]!r}) and {n!r} ({what}={v!r}) "
                                   f"share layer {s.layer!r} and its stream of rows, so they must agree on "
                                   f"{what}; train SAEs of other {what} in a separate streamed run")
            seen.setdefault(s.layer, v)
        first.setdefault(s.layer, n)
    return tokens, [la for la, v in outliers.items() if v == "exclude"]


def _name(layer: str, variant: str | None) -> str:
    d = layer.replace("/", "_")
    return d if variant is None else f"{d}@{variant}"


def _trainer_config(cfg: StreamConfig, lr: float, n_norm: int):
    from sae_lens.config import SAETrainerConfig

    decay = int(cfg.steps * cfg.lr_decay_fraction)
    n_ck = max(0, min(cfg.n_checkpoints, cfg.steps - 1))
    return SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=lr,
        lr_end=lr / 10, lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=decay, device=cfg.device,
        dead_feature_window=cfg.dead_feature_window, feature_sampling_window=cfg.feature_sampling_window,
        n_checkpoints=n_ck, checkpoint_path=None, save_final_checkpoint=False, n_batches_for_norm_estimate=n_norm)


def build_multi_trainer(specs: Sequence[StreamSAE], names: Sequence[str], d_in: dict[str, int],
                        metadata: dict[str, dict[str, Any]], provider: Any, cfg: StreamConfig, save_fn=None):
    """sae-lens ``MultiSAETrainer`` for ``specs`` (per-SAE learning rates: each per-SAE ``SAETrainer`` is built
    with its own ``lr``, default :func:`~sae_training.train.default_lr` of its width, as a separate run would)."""
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer
    from sae_lens.training.sae_trainer import SAETrainer

    saes = {n: make_training_sae(s.config, d_in[s.layer], metadata[n]) for n, s in zip(names, specs, strict=True)}
    lrs = {n: s.config.lr if s.config.lr is not None else default_lr(saes[n].cfg.d_sae)
           for n, s in zip(names, specs, strict=True)}
    n_norm = min(100, max(10, 200_000 // cfg.batch_size))
    tcfg = _trainer_config(cfg, lrs[names[0]], n_norm)
    multi = MultiSAETrainer(tcfg, saes, {n: s.layer for n, s in zip(names, specs, strict=True)}, provider,
                            save_checkpoint_fn=save_fn)
    for n, t in multi.trainers.items():
        if lrs[n] != tcfg.lr:
            multi.trainers[n] = SAETrainer(cfg=dataclasses.replace(t.cfg, lr=lrs[n], lr_end=lrs[n] / 10),
                                           sae=saes[n], data_provider=iter(()))
    last = tcfg.total_training_samples - 1  # also a checkpoint at the end, before the normalisation is folded:
    if tcfg.n_checkpoints and multi.checkpoint_thresholds[-1:] != [last]:  # a kill while exporting resumes
        multi.checkpoint_thresholds.append(last)  # without training again
    for t in multi.trainers.values():
        check_seams(t)
    return multi


# ----- checkpoints ------------------------------------------------------------------------------------------
def _latest(work: Path) -> Path | None:
    cks = [p for p in work.glob("step_*") if (p / STATE).exists()]
    return max(cks, key=lambda p: int(p.name.split("_")[1])) if cks else None


def _save(work: Path, multi: Any, provider: StreamProvider, elapsed: float) -> None:
    """Every per-SAE trainer (:func:`~sae_training.checkpoint.save_checkpoint`), the provider's buffers and
    position and the torch RNG state, into ``step_<n>`` (written as ``.step_<n>.tmp`` and renamed)."""
    trainer0 = next(iter(multi.trainers.values()))
    step = trainer0.n_training_samples // trainer0.cfg.train_batch_size_samples
    final = work / f"step_{step:08d}"
    tmp = work / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for n, t in multi.trainers.items():
        save_checkpoint(t, tmp / n, elapsed)
    tensors, info = provider.state()
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(tmp / PROVIDER))
    atomic_write_json(tmp / STATE, {"step": step, "provider": info, "elapsed": elapsed,
                                    "forward_seconds": provider.forward_seconds})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(work.glob("step_*"))[:-2]:  # keep the newest two
        shutil.rmtree(old)


def _load(path: Path, multi: Any, provider: StreamProvider) -> dict[str, Any]:
    state = json.loads((path / STATE).read_text())
    for n, t in multi.trainers.items():
        load_checkpoint(t, path / n)
        # sae-lens checkpoints inside MultiSAETrainer.fit before it counts the step: count it here
        t.n_training_steps = t.n_training_samples // t.cfg.train_batch_size_samples
    t0 = next(iter(multi.trainers.values()))
    multi.n_training_steps, multi.n_training_samples = t0.n_training_steps, t0.n_training_samples
    while multi.checkpoint_thresholds and multi.n_training_samples > multi.checkpoint_thresholds[0]:
        multi.checkpoint_thresholds.pop(0)
    tensors = load_file(str(path / PROVIDER))
    torch.set_rng_state(tensors.pop("torch_rng"))
    provider.load_state(tensors, state["provider"])
    provider.forward_seconds = float(state.get("forward_seconds", 0.0))
    return state


# ----- the entry point -------------------------------------------------------------------------------------
def train_saes_streaming(model: Any, images: Any, saes: Sequence[StreamSAE | str], config: StreamConfig | None = None,
                         run: str = "default", root: str | Path | None = None,
                         out_dirs: dict[str, str | Path] | None = None, work_dir: str | Path | None = None,
                         resume: bool = True, overwrite: bool = True, eval_images: Any = None,
                         dataset: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the SAEs ``saes`` together from the model's forward passes over ``images``.

    Args:
        model: a :class:`~sae_cafe.models.ModelAdapter` or ``nn.Module``.
        images: any :class:`~sae_cafe.image_source.ImageSource` input (a random-access source is read again
            when the step budget needs more PFVs than it holds).
        saes: :class:`StreamSAE` specs (or bare layer ids: default :class:`SAETrainConfig`).
        config: shared settings (:class:`StreamConfig`).
        run, root: output run ``<root>/<run>/saes/<model>/<layer>/`` (``<run>-<variant>`` per variant).
        out_dirs: explicit output directory per SAE name (``<layer>`` or ``<layer>@<variant>``).
        work_dir: checkpoints (default ``<root>/<run>/saes/<model>/.stream.tmp``; removed when done).
        resume: continue from the checkpoints of an interrupted run with the same settings (a one-pass
            stream has no fingerprint: the caller must pass the same stream again).
        eval_images: evaluate every SAE (as reloaded from disk) on these held-out images.

    Returns ``{"saes": {name: {"sae_dir", "training"[, "eval"]}}, "training": {...}}``.
    """
    cfg = config or StreamConfig()
    adapter = get_adapter(model)
    specs = _check_specs([s if isinstance(s, StreamSAE) else StreamSAE(str(s)) for s in saes], cfg)
    if not specs:
        raise SaeCafeError("no SAEs to train; pass at least one StreamSAE (or layer id)")
    specs = [dataclasses.replace(s, layer=adapter.resolve_layer(s.layer)) for s in specs]
    names = [_name(s.layer, s.variant) for s in specs]
    if len(set(names)) != len(names):
        raise SaeCafeError(f"two SAEs share a layer and variant ({sorted(n for n in names if names.count(n) > 1)});"
                           " give each SAE of the same layer its own variant name")
    layers = list(dict.fromkeys(s.layer for s in specs))
    model_dir = adapter.name.replace("/", "_")
    finals = {n: Path(out_dirs[n]) if out_dirs and n in out_dirs else
              stage_path(run if s.variant is None else f"{run}-{s.variant}", "saes", model_dir,
                         s.layer.replace("/", "_"), root=root) for n, s in zip(names, specs, strict=True)}
    if len(set(finals.values())) != len(finals):
        raise SaeCafeError("two SAEs would be written to the same directory; give them distinct out_dirs")
    buffer_rows = cfg.buffer_rows or max(8 * cfg.batch_size, 65536)
    tokens, exclude = layer_settings(specs, names)
    provider = StreamProvider(adapter, layers, images, cfg.batch_size, buffer_rows, cfg.mix_fraction,
                              cfg.image_batch_size, cfg.rows_per_image, cfg.seed, cfg.device, tokens=tokens,
                              exclude_outliers=exclude, outlier_k=cfg.outlier_k)
    _warn_rows_per_image(provider)
    src = provider.source
    dataset_info = {"name": dataset or src.description, "source": src.description, "fingerprint": src.fingerprint()}
    key = hash_json({"stream": cfg, "saes": [[n, s] for n, s in zip(names, specs, strict=True)], "model": adapter.name,
                     "weights_hash": adapter.weights_hash, "dataset": dataset_info,
                     "rows_per_image": provider.rows_per_image, "buffer_rows": buffer_rows,
                     "stream_format": STATE_FORMAT})
    if not overwrite:
        taken = [str(p) for p in finals.values() if is_finished(p) and read_manifest(p, check_lineage=False)
                 .get("run_key") != key]
        if taken:
            raise ArtifactError(f"{', '.join(taken)} already hold SAEs; pass overwrite=True (CLI --overwrite)")
    work = Path(work_dir) if work_dir is not None else (
        next(iter(finals.values())).parent / ".stream.tmp")
    infos = adapter.layers()
    metadata = {n: _metadata(adapter, s, infos[s.layer], dataset_info, provider)
                for n, s in zip(names, specs, strict=True)}
    done = {n for n in names if resume and ((is_finished(finals[n]) and read_manifest(
        finals[n], check_lineage=False).get("run_key") == key) or finished_temp_stage(finals[n], "run_key", key))}
    summary: dict[str, Any] = {}
    if len(done) < len(names):
        multi, summary = _fit(work, key, specs, names, provider, metadata, cfg, resume, progress)
        for layer in layers:
            for note in provider.outlier_record(layer)["notes"]:
                warnings.warn(note, stacklevel=2)
        for n, s in zip(names, specs, strict=True):
            if n not in done:
                _export(multi.saes[n], multi.trainers[n], s, finals[n], key, adapter, metadata[n], dataset_info,
                        summary, cfg, provider.outlier_record(s.layer))
    for n in names:
        if finished_temp_stage(finals[n], "run_key", key):
            publish_stage(temp_stage_path(finals[n]), finals[n])
    shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"saes": {}, "training": summary}
    for n in names:
        res = {"sae_dir": str(finals[n]), "training": json.loads((finals[n] / "training.json").read_text())}
        if eval_images is not None:
            from .evaluate import evaluate_sae

            res["eval"] = evaluate_sae(finals[n], model=adapter, images=eval_images, progress=progress)
        out["saes"][n] = res
    return out


#: what a streamed layer's rows are, per ``tokens`` setting (cfg metadata ``sae_cafe.pfv_layout``)
ROWS = {"patch": "positions of the layer grid (streamed, not stored)",
        "all": "prefix (class/register/distillation) tokens and positions of the layer grid (streamed, not stored)",
        "cls": "the class token of each image (streamed, not stored)"}


def _warn_rows_per_image(provider: StreamProvider) -> None:
    """Say when a class-token layer sets the rows per image of every other layer (1 class token per image)."""
    cls = [n for n in provider.layers if provider.tokens[n] == "cls"]
    more = [n for n in provider.layers if provider.n_rows[n] > provider.rows_per_image]
    if cls and more:
        warnings.warn(f"rows_per_image={provider.rows_per_image}: layers {cls} train on class tokens, so layers "
                      f"{more} keep only {provider.rows_per_image} of their rows per image (all buffers fill at the "
                      "same rate); train class-token SAEs in their own streamed run", stacklevel=3)


def _metadata(adapter: Any, spec: StreamSAE, info: Any, dataset_info: dict, provider: StreamProvider
              ) -> dict[str, Any]:
    return {"model_name": adapter.name, "hook_name": spec.layer, "weights_hash": adapter.weights_hash,
            "dataset_path": dataset_info["source"], "dataset": dataset_info["name"],
            "dataset_hash": dataset_info["fingerprint"], "context_size": None,
            "sae_cafe": {"pfv_layout": {"rows": ROWS[spec.config.tokens]},
                         "grid": list(info.grid), "layer_kind": info.kind, "family": adapter.family,
                         "streamed": True, "rows_per_image": provider.rows_per_image,
                         "tokens": spec.config.tokens, "outliers": spec.config.outliers,
                         "outlier_k": provider.outlier_k}}


def _fit(work: Path, key: str, specs: list[StreamSAE], names: list[str], provider: StreamProvider,
         metadata: dict[str, dict[str, Any]], cfg: StreamConfig, resume: bool, progress: bool):
    """Run (or resume) sae-lens's ``MultiSAETrainer.fit``; returns the trainer (normalisation folded)."""
    same = False
    if work.exists():
        try:
            same = json.loads((work / "key.json").read_text()) == key
        except (OSError, json.JSONDecodeError):
            same = False
        if resume and same:
            clean_partial_files(work)
        else:
            if resume and _latest(work) is not None:
                warnings.warn(f"{work}: the checkpoints there are of other settings (or of an older sae-cafe, "
                              f"stream format < {STATE_FORMAT}); they are discarded and training starts at step 0",
                              stacklevel=3)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "key.json", key)
    start = [time.perf_counter()]
    d_in = dict(provider.d_in)
    multi = build_multi_trainer(specs, names, d_in, metadata, provider, cfg,
                                save_fn=lambda checkpoint_path: _save(work, multi, provider,
                                                                      time.perf_counter() - start[0]))
    latest = _latest(work) if resume and same else None
    resumed_from = None
    if latest is not None:
        state = _load(latest, multi, provider)
        start[0] -= float(state["elapsed"])
        resumed_from = int(state["step"])
    multi.fit()  # sae-lens: scaling factors, lockstep steps, checkpoints, folding, final metadata, progress bar
    seconds = time.perf_counter() - start[0]
    summary = {"steps": multi.n_training_steps, "samples_per_sae": multi.n_training_samples,
               "n_saes": len(names), "train_seconds": seconds, "images_seen": provider.images_seen,
               "epochs": provider.epoch, "forward_seconds": provider.forward_seconds,
               "rows_per_image": provider.rows_per_image, "resumed_from_step": resumed_from,
               "samples_per_second": multi.n_training_samples * len(names) / max(seconds, 1e-9)}
    return multi, summary


def _export(sae: Any, trainer: Any, spec: StreamSAE, final: Path, key: str, adapter: Any, metadata: dict,
            dataset_info: dict, summary: dict, cfg: StreamConfig, rows: dict[str, Any]) -> None:
    """sae-lens inference export + ``training.json`` + manifest into the temporary stage, then publish.
    ``rows``: the layer's :meth:`StreamProvider.outlier_record` (tokens, outlier report, row counts, notes),
    recorded under the shard path's manifest keys."""
    tmp = temp_stage_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sae.cfg.metadata.sae_cafe = {**metadata["sae_cafe"], "architecture": spec.config.architecture}
    sae.save_inference_model(str(tmp))
    training = {"architecture": spec.config.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                "k": getattr(sae.cfg, "k", None), "dead_at_end": int(trainer.dead_neurons.sum()),
                "train_l0_window": sae.cfg.metadata.get("l0"), "lr": trainer.cfg.lr, "streamed": True, **summary}
    atomic_write_json(tmp / "training.json", training)
    write_manifest(tmp, "saes", {"sae": spec.config, "stream": cfg}, upstream=None, model=adapter.name,
                   layer=spec.layer, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, architecture=spec.config.architecture,
                   weights_hash=adapter.weights_hash, model_record=record_for(adapter).to_json(),
                   dataset=dataset_info, variant=spec.variant, streamed=True, tokens=rows["tokens"],
                   outliers=rows["outliers"], training_rows=rows["training_rows"],
                   outlier_report=rows["outlier_report"], notes=rows["notes"],
                   sae_lens_files=["cfg.json", "sae_weights.safetensors"],
                   training={k: v for k, v in training.items()}, run_key=key)
    if not (tmp / MANIFEST).exists():  # pragma: no cover - write_manifest raises on failure
        raise ArtifactError(f"{tmp}: manifest missing after export")
    publish_stage(tmp, final)


__all__ = ["SHARED", "StreamConfig", "StreamSAE", "build_multi_trainer", "layer_settings", "train_saes_streaming"]
