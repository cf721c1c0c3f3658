"""Training and evaluation of the mini models on generated concept-world scenes (CPU), resumable.

Data (``TrainConfig.data``):

- ``fresh``: every batch is new, ``generate(batch_size, seed=batch_seed(cfg.seed, step))`` (the generator
  makes ~2000 images/s on one core, ~10 % of a mini-ViT step); no scene is seen twice.
- ``pool``: a pool of ``train_images`` scenes is generated once from ``seed``; epoch ``e`` visits it in the
  order ``default_rng([seed, e]).permutation``.

Training seeds stay below ``EVAL_SEED_BASE``, so evaluation scenes are never trained on. ``augment`` applies
one of the 8 flips/rotations of the square per batch (label-preserving: shapes keep their identity and the
cell layout is symmetric), drawn from ``default_rng([seed, step, 1])``.

Everything a step uses is a function of ``(seed, step)``, so a run continues exactly from its last
checkpoint (model, optimizer, step, torch RNG; ``checkpoint.py``), written every ``checkpoint_every`` steps
into the checkpoint folder. With the ``wsd`` schedule (warmup, constant, final linear decay over
``decay_frac`` of the steps) the checkpoint taken when the decay starts is kept as
``checkpoint-stable.safetensors``: a later run with more ``steps`` continues from it.

``distill`` names a trained teacher (the shipped mini ResNet): the loss is
``(1 - a) · CE(label, smoothing) + a · T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` (Hinton et al.
2015), with ``a = distill_alpha`` and ``T = distill_temperature``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SaeCafeError
from .generator import World, WorldConfig, generate

EVAL_SEED_BASE = 900_000_000  # evaluation/benchmark seeds start here; training seeds stay below
FRESH_SEED_BASE = 100_000_000  # fresh training batches: FRESH_SEED_BASE + seed * FRESH_SEED_STRIDE + step
FRESH_SEED_STRIDE = 10_000_000
#: fields that may differ when a run continues from a checkpoint (``steps`` and ``decay_frac`` only where the
#: learning rates of the steps done so far stay the same)
RESUMABLE_FIELDS = ("steps", "decay_frac", "threads", "eval_n", "eval_seed", "probe_every", "checkpoint_every",
                    "log_every")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``train_model`` (the defaults per architecture are in ``DEFAULTS``)."""

    arch: str = "mini_resnet"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup: int = 50
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, constant, linear decay)
    decay_frac: float = 0.2  # wsd: share of the steps in the final decay
    label_smoothing: float = 0.05
    data: str = "pool"  # "pool" or "fresh"
    train_images: int = 16384  # size of the generated training pool (data="pool")
    augment: bool = True  # one random flip/rotation of the square per batch
    distill: str | None = None  # teacher model name (shipped weights), e.g. "mini_resnet"
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    seed: int = 0
    threads: int = 2
    eval_n: int = 2000
    eval_seed: int = EVAL_SEED_BASE + 1
    probe_n: int = 500  # held-out scenes evaluated during training (a seed of their own)
    probe_seed: int = EVAL_SEED_BASE + 2
    probe_every: int = 250
    checkpoint_every: int = 100
    log_every: int = 100
    world: WorldConfig = field(default_factory=WorldConfig)

    def validate(self) -> None:
        if self.schedule not in ("cosine", "wsd"):
            raise SaeCafeError(f"TrainConfig.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if self.data not in ("pool", "fresh"):
            raise SaeCafeError(f"TrainConfig.data must be 'pool' or 'fresh', got {self.data!r}")
        if self.steps < 1 or self.batch_size < 1 or self.warmup < 0:
            raise SaeCafeError(f"TrainConfig: need steps >= 1, batch_size >= 1, warmup >= 0; got {self.steps}, "
                               f"{self.batch_size}, {self.warmup}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0 or not 0 < self.decay_frac <= 1:
            raise SaeCafeError("TrainConfig: need 0 <= distill_alpha <= 1, distill_temperature > 0 and "
                               f"0 < decay_frac <= 1; got {self.distill_alpha}, {self.distill_temperature}, "
                               f"{self.decay_frac}")
        if not 0 <= self.seed < (EVAL_SEED_BASE - FRESH_SEED_BASE) // FRESH_SEED_STRIDE \
                or self.steps >= FRESH_SEED_STRIDE:
            raise SaeCafeError(f"TrainConfig: seed must be in [0, 80) and steps < {FRESH_SEED_STRIDE} so training "
                               f"seeds stay below the evaluation seeds; got seed {self.seed}, steps {self.steps}")
        if self.data == "pool" and self.train_images < self.batch_size:
            raise SaeCafeError(f"TrainConfig: train_images ({self.train_images}) < batch_size ({self.batch_size})")
        if min(self.probe_seed, self.eval_seed) < EVAL_SEED_BASE:
            raise SaeCafeError(f"TrainConfig: probe_seed and eval_seed must be >= {EVAL_SEED_BASE} (held out)")


DEFAULTS: dict[str, dict] = {
    "mini_resnet": dict(steps=1500, lr=2e-3, weight_decay=5e-4),
    "mini_vgg": dict(steps=1000, lr=2e-3, weight_decay=5e-4),
    "mini_vit": dict(steps=20000, batch_size=32, lr=1e-3, weight_decay=0.05, warmup=300, schedule="wsd",
                     decay_frac=0.25, data="fresh", augment=False, distill="mini_resnet", distill_alpha=0.7,
                     distill_temperature=2.0),
}


def batch_seed(seed: int, step: int) -> int:
    """Generator seed of the fresh training batch of ``step`` (always below ``EVAL_SEED_BASE``)."""
    return FRESH_SEED_BASE + seed * FRESH_SEED_STRIDE + step


def world_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 → normalised (N, 3, H, W) float, as ``ModelAdapter.preprocess`` does at 64×64."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def predict(model: nn.Module, world: World, mean, std, batch_size: int = 250) -> np.ndarray:
    """(N,) predicted class of each scene."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(world_tensor(world.images[s:s + batch_size], mean, std).to(dev)).argmax(1).cpu()
           for s in range(0, len(world), batch_size)]
    return torch.cat(out).numpy()


def evaluate(model, n: int = 2000, seed: int = EVAL_SEED_BASE + 1, world: World | None = None,
             config: WorldConfig | None = None, mean=None, std=None) -> dict:
    """Accuracy (overall and per class) on fresh scenes of a registered model name, an adapter, or an
    ``nn.Module`` (then pass the world ``mean``/``std``; default: the adapter's)."""
    from ..models import get_adapter, load_model

    ad = load_model(model) if isinstance(model, str) else get_adapter(model)
    world = world if world is not None else generate(n, seed, config=config)
    pred = predict(ad.model, world, mean or ad.mean, std or ad.std)
    correct = pred == world.labels
    per_class = {int(c): float(correct[world.labels == c].mean()) for c in np.unique(world.labels)}
    return {"accuracy": float(correct.mean()), "n": len(world), "seed": world.seed, "per_class": per_class}


def decay_start(cfg: TrainConfig) -> int:
    """First step of the final decay (``wsd``); for ``cosine`` the decay starts after the warmup."""
    if cfg.schedule == "cosine":
        return min(cfg.warmup, cfg.steps)
    return max(cfg.warmup, cfg.steps - max(1, round(cfg.decay_frac * cfg.steps)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    d0 = decay_start(cfg)
    return cfg.lr if step < d0 else cfg.lr * max(0, cfg.steps - step) / max(1, cfg.steps - d0)


_lr_at = lr_at  # the former private name


def _same_schedule_until(a: TrainConfig, b: TrainConfig, step: int) -> bool:
    """Whether configs ``a`` and ``b`` (equal but for ``steps``/``decay_frac``) give the same rates for steps
    < ``step``."""
    if a.steps == b.steps and a.decay_frac == b.decay_frac:
        return True
    return a.schedule == "wsd" and step <= min(decay_start(a), decay_start(b))


class _Batches:
    """Training batch of each step, a pure function of ``(cfg, step)``."""

    def __init__(self, cfg: TrainConfig, mean, std):
        self.cfg, self.mean, self.std = cfg, mean, std
        self.gen_s, self._perm = 0.0, (-1, None)
        self.pool = generate(cfg.train_images, cfg.seed, config=cfg.world) if cfg.data == "pool" else None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised images and (B,) labels of ``step``."""
        cfg, t = self.cfg, time.process_time()
        if self.pool is None:
            w = generate(cfg.batch_size, batch_seed(cfg.seed, step), config=cfg.world)
            images, labels = w.images, w.labels
        else:
            per_epoch = cfg.train_images // cfg.batch_size
            epoch, i = divmod(step, per_epoch)
            if self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([cfg.seed, epoch]).permutation(cfg.train_images))
            sel = np.sort(self._perm[1][i * cfg.batch_size:(i + 1) * cfg.batch_size])
            images, labels = self.pool.images[sel], self.pool.labels[sel]
        x, y = world_tensor(images, self.mean, self.std), torch.from_numpy(np.asarray(labels, dtype=np.int64))
        if cfg.augment:
            rng = np.random.default_rng([cfg.seed, step, 1])
            x = torch.rot90(x, int(rng.integers(4)), (2, 3))
            if rng.random() < 0.5:
                x = x.flip(3)
        self.gen_s += time.process_time() - t
        return x.contiguous(), y


def _loss(logits, y, teacher_logits, cfg: TrainConfig) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    t = cfg.distill_temperature
    kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                  reduction="batchmean") * t * t
    return (1 - cfg.distill_alpha) * ce + cfg.distill_alpha * kd


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    def decays(n, p):
        return p.ndim > 1 and "pos_embedding" not in n and "class_token" not in n

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _pick_checkpoint(ckpt_dir: Path, cfg: TrainConfig) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``ckpt_dir`` that ``cfg`` can continue from (and notes on skipped ones)."""
    from .checkpoint import read_checkpoint_state

    notes, best = [], (None, -1)
    for name in ("checkpoint.safetensors", "checkpoint-stable.safetensors"):
        path = ckpt_dir / name
        if not path.exists():
            continue
        st = read_checkpoint_state(path)
        old = TrainConfig(**{**st["config"], "world": WorldConfig(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in st["config"]["world"].items()})})
        fixed_old = {k: v for k, v in asdict(old).items() if k not in RESUMABLE_FIELDS}
        fixed_new = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_FIELDS}
        if fixed_old != fixed_new:
            diff = sorted(k for k in fixed_new if fixed_old.get(k) != fixed_new[k])
            raise SaeCafeError(f"checkpoint {path} was written by another configuration (differs in {diff}); "
                               "continue with the same settings or use another --checkpoint-dir")
        if not _same_schedule_until(old, cfg, st["step"]):
            notes.append(f"{name} (step {st['step']}) is past the point where steps={old.steps}, decay_frac="
                         f"{old.decay_frac} and steps={cfg.steps}, decay_frac={cfg.decay_frac} give the same "
                         "learning rates")
            continue
        if st["step"] > best[1]:
            best = (path, st["step"])
    if best[0] is None and notes:
        raise SaeCafeError(f"no checkpoint in {ckpt_dir} can continue with steps={cfg.steps}: " + "; ".join(notes)
                           + ". Use the original steps, or a wsd schedule whose decay starts later, or another "
                           "--checkpoint-dir")
    return best[0], notes


def train_model(cfg: TrainConfig, out: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                log=None) -> dict:
    """Train ``cfg.arch`` from scratch or continue from ``checkpoint_dir``; write ``<out>.safetensors`` +
    ``<out>.json`` (config, recipe, curve, CPU time, evaluation on ``eval_n`` fresh scenes of ``eval_seed``).

    ``out`` defaults to the shipped weights ``sae_cafe/weights/<arch>`` (overwritten atomically). Without a
    ``checkpoint_dir`` nothing is checkpointed (a warning says so).
    """
    from safetensors.torch import save

    from ..artifacts import atomic_write_bytes, atomic_write_json, clean_partial_files, to_jsonable
    from ..models import load_model
    from ..models.mini import MINI_FACTORIES, WORLD_MEAN, WORLD_STD
    from .checkpoint import load_checkpoint, save_checkpoint

    log = log or (lambda line: print(line, flush=True))
    cfg.validate()
    if cfg.arch not in MINI_FACTORIES:
        raise SaeCafeError(f"unknown arch {cfg.arch!r}; train-model trains one of {sorted(MINI_FACTORIES)}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = MINI_FACTORIES[cfg.arch]()
    opt = _make_optimizer(model, cfg)
    teacher, teacher_info = None, None
    if cfg.distill is not None:
        tad = load_model(cfg.distill)
        teacher = tad.model.eval()
        teacher_info = {"model": cfg.distill, "weights_sha256": tad.weights_hash}
    step, history, cpu_s, wall_s, resumed = 0, [], 0.0, 0.0, []
    run_loss = run_acc = None  # running means of the loss and batch accuracy (the curve's values)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is None:
        warnings.warn("train_model: no checkpoint_dir; an interrupted run starts over", stacklevel=2)
    else:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_partial_files(ckpt_dir)
        path, notes = _pick_checkpoint(ckpt_dir, cfg)
        if path is not None:
            st = load_checkpoint(path, model, opt)
            step, history, cpu_s, wall_s = st["step"], st["history"], st["cpu_s"], st["wall_s"]
            run_loss, run_acc = st.get("running", (None, None))
            resumed = st.get("resumed", []) + [{"step": step, "from": path.name, "skipped": notes}]
            log(json.dumps({"resumed_from": str(path), "step": step}))
    batches = _Batches(cfg, WORLD_MEAN, WORLD_STD)
    probe = generate(cfg.probe_n, cfg.probe_seed, config=cfg.world) if cfg.probe_n else None
    t_cpu, t_wall = time.process_time(), time.time()

    def elapsed() -> tuple[float, float]:
        return cpu_s + time.process_time() - t_cpu, wall_s + time.time() - t_wall

    def state() -> dict:
        c, w = elapsed()
        return {"step": step, "config": asdict(cfg), "history": history, "cpu_s": c, "wall_s": w,
                "resumed": resumed, "teacher": teacher_info, "running": [run_loss, run_acc]}

    d0 = decay_start(cfg)
    while step < cfg.steps:
        if ckpt_dir is not None and cfg.schedule == "wsd" and step == d0 and step > 0:
            save_checkpoint(ckpt_dir / "checkpoint-stable.safetensors", model, opt, state())
        model.train()
        x, y = batches(step)
        with torch.no_grad():
            t_logits = teacher(x) if teacher is not None else None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = model(x)
        loss = _loss(logits, y, t_logits, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc = (logits.argmax(1) == y).float().mean().item()
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        run_acc = acc if run_acc is None else 0.95 * run_acc + 0.05 * acc
        probe_now = probe is not None and cfg.probe_every and (step % cfg.probe_every == 0 or step == cfg.steps)
        if step % cfg.log_every == 0 or probe_now or step == cfg.steps:
            c, w = elapsed()
            rec = {"step": step, "loss": round(run_loss, 4), "train_acc": round(run_acc, 4),
                   "lr": float(f"{lr_at(step - 1, cfg):.3g}"), "cpu_s": round(c, 1), "elapsed_s": round(w, 1)}
            if probe_now:
                rec["probe_acc"] = float((predict(model, probe, WORLD_MEAN, WORLD_STD) == probe.labels).mean())
            history.append(rec)
            log(json.dumps(rec))
        if ckpt_dir is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(ckpt_dir / "checkpoint.safetensors", model, opt, state())
    cpu_total, wall_total = elapsed()
    model.eval()
    metrics = evaluate(model, cfg.eval_n, cfg.eval_seed, config=cfg.world, mean=WORLD_MEAN, std=WORLD_STD)
    out = Path(out) if out is not None else _default_out(cfg.arch)
    atomic_write_bytes(out.with_suffix(".safetensors"),
                       save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    out.with_suffix(".safetensors").chmod(0o644)
    record = {"arch": cfg.arch, "config": to_jsonable(asdict(cfg)), "recipe": recipe(cfg),
              "architecture": architecture(model), "teacher": teacher_info,
              "train_time_s": round(wall_total, 1), "cpu_time_s": round(cpu_total, 1),
              "generation_cpu_s_this_session": round(batches.gen_s, 1),
              "images_seen": cfg.steps * cfg.batch_size,
              "eval": {k: metrics[k] for k in ("accuracy", "n", "seed")}, "per_class_accuracy":
              metrics["per_class"], "history": history, "resumed": resumed, "torch": torch.__version__,
              "command": command(cfg, out, ckpt_dir), "params": sum(p.numel() for p in model.parameters())}
    atomic_write_json(out.with_suffix(".json"), record)
    return record


def architecture(model: nn.Module) -> dict:
    """Constructor arguments of a torchvision ``VisionTransformer`` (empty for the CNNs)."""
    from torchvision.models import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return {}
    enc = model.encoder.layers
    return {"class": "torchvision.models.VisionTransformer", "image_size": model.image_size,
            "patch_size": model.patch_size, "num_layers": len(enc),
            "num_heads": enc[0].self_attention.num_heads, "hidden_dim": model.hidden_dim,
            "mlp_dim": model.mlp_dim, "num_classes": model.num_classes}


def recipe(cfg: TrainConfig) -> str:
    """One-paragraph description of the training recipe of ``cfg``."""
    data = (f"a fresh batch of {cfg.batch_size} generated scenes per step (never repeated)" if cfg.data == "fresh"
            else f"batches of {cfg.batch_size} from a pool of {cfg.train_images} generated scenes")
    sched = (f"cosine schedule with {cfg.warmup} warmup steps" if cfg.schedule == "cosine" else
             f"warmup {cfg.warmup} steps, constant, linear decay to 0 over the last {cfg.decay_frac:.0%}")
    kd = (f"; distillation from {cfg.distill} (alpha {cfg.distill_alpha}, temperature {cfg.distill_temperature})"
          if cfg.distill else "")
    return (f"{cfg.steps} AdamW steps (lr {cfg.lr}, weight decay {cfg.weight_decay}, grad-norm clip 1, label "
            f"smoothing {cfg.label_smoothing}), {sched}; {data}"
            f"{', one random flip/rotation per batch' if cfg.augment else ''}{kd}; seed {cfg.seed}.")


def command(cfg: TrainConfig, out, ckpt_dir) -> str:
    """The ``sae-cafe train-model`` command line that reproduces ``cfg``."""
    base = TrainConfig(arch=cfg.arch, **DEFAULTS.get(cfg.arch, {}))
    parts = [f"sae-cafe train-model --arch {cfg.arch}"]
    for k in ("steps", "batch_size", "lr", "weight_decay", "warmup", "schedule", "decay_frac", "data",
              "train_images", "distill", "distill_alpha", "distill_temperature"):
        if getattr(cfg, k) != getattr(base, k):
            parts.append(f"--{k.replace('_', '-')} {getattr(cfg, k) if getattr(cfg, k) is not None else 'none'}")
    if cfg.augment != base.augment:
        parts.append("--augment" if cfg.augment else "--no-augment")
    parts.append(f"--seed {cfg.seed} --threads {cfg.threads}")
    if out is not None and Path(out).resolve() != _default_out(cfg.arch).resolve():
        parts.append(f"--out {out}")
    if ckpt_dir is not None:
        parts.append(f"--checkpoint-dir {ckpt_dir}")
    return " ".join(parts)


def _default_out(arch: str) -> Path:
    from ..models.mini import WEIGHTS_DIR

    return WEIGHTS_DIR / arch


def config_for(arch: str, **overrides) -> TrainConfig:
    """``TrainConfig`` of ``arch`` with its ``DEFAULTS`` and the given overrides."""
    return replace(TrainConfig(arch=arch), **{**DEFAULTS.get(arch, {}), **overrides})
