"""Training and evaluation of the mini models on freshly generated concept-world scenes (CPU).

A pool of ``train_images`` scenes is generated once from ``seed`` (training seeds stay below
``EVAL_SEED_BASE``, so evaluation scenes are never trained on) and augmented with the 8 flips/rotations of
the square (they preserve every class: shapes keep their identity and the cell layout is symmetric).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SaeCafeError
from .generator import World, WorldConfig, generate

EVAL_SEED_BASE = 900_000_000  # evaluation/benchmark seeds start here; training seeds stay below


@dataclass
class TrainConfig:
    """Settings of ``train_model`` (the defaults per architecture are in ``DEFAULTS``)."""

    arch: str = "mini_resnet"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup: int = 50
    label_smoothing: float = 0.05
    train_images: int = 16384  # size of the generated training pool
    seed: int = 0
    threads: int = 2
    eval_n: int = 2000
    eval_seed: int = EVAL_SEED_BASE + 1
    world: WorldConfig = field(default_factory=WorldConfig)


DEFAULTS: dict[str, dict] = {
    "mini_resnet": dict(steps=1500, lr=2e-3, weight_decay=5e-4),
    "mini_vgg": dict(steps=1000, lr=2e-3, weight_decay=5e-4),
    "mini_vit": dict(steps=2000, lr=1.5e-3, weight_decay=0.05, warmup=150),
}


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


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_model(cfg: TrainConfig, out: str | Path | None = None, log_every: int = 100) -> dict:
    """Train ``cfg.arch`` from scratch; write ``<out>.safetensors`` + ``<out>.json`` (config, metrics).

    ``out`` defaults to the shipped weights ``sae_cafe/weights/<arch>`` (overwritten atomically).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..artifacts import atomic_write_json, to_jsonable
    from ..models.mini import MINI_FACTORIES, WEIGHTS_DIR, WORLD_MEAN, WORLD_STD

    if cfg.arch not in MINI_FACTORIES:
        raise SaeCafeError(f"unknown arch {cfg.arch!r}; train-model trains one of {sorted(MINI_FACTORIES)}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = MINI_FACTORIES[cfg.arch]()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    tg = time.time()
    world = generate(cfg.train_images, cfg.seed, config=cfg.world)
    gen_time = time.time() - tg
    pool, labels = world.images, torch.from_numpy(world.labels)  # uint8 pool, normalised per batch
    rng = np.random.default_rng(cfg.seed)
    order, pos = rng.permutation(len(labels)), 0
    history = []
    run_loss, run_acc = 0.0, 0.0
    t0 = time.time()
    model.train()
    for step in tqdm(range(cfg.steps), desc=f"train {cfg.arch}", unit="step", mininterval=5):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(len(labels)), 0
        sel = np.sort(order[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        x, y = world_tensor(pool[sel], WORLD_MEAN, WORLD_STD), labels[torch.from_numpy(sel)]
        k = int(rng.integers(4))  # one dihedral transform per batch (label-preserving)
        x = torch.rot90(x, k, (2, 3))
        if rng.random() < 0.5:
            x = x.flip(3)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss = 0.95 * run_loss + 0.05 * loss.item() if step else loss.item()
        run_acc = 0.95 * run_acc + 0.05 * (logits.argmax(1) == y).float().mean().item()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": round(run_loss, 4), "train_acc": round(run_acc, 4),
                            "elapsed_s": round(time.time() - t0, 1)})
            tqdm.write(json.dumps(history[-1]))
    train_time = time.time() - t0
    model.eval()
    metrics = evaluate(model, cfg.eval_n, cfg.eval_seed, config=cfg.world, mean=WORLD_MEAN, std=WORLD_STD)
    out = Path(out) if out is not None else WEIGHTS_DIR / cfg.arch
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out.with_suffix(".safetensors"))
    record = {"arch": cfg.arch, "config": to_jsonable(asdict(cfg)), "train_time_s": round(train_time, 1),
              "generation_time_s": round(gen_time, 1), "images_seen": cfg.steps * cfg.batch_size,
              "eval": {k: metrics[k] for k in ("accuracy", "n", "seed")}, "per_class_accuracy":
              metrics["per_class"], "history": history, "torch": torch.__version__,
              "command": f"sae-cafe train-model --arch {cfg.arch} --steps {cfg.steps} --lr {cfg.lr} "
                         f"--seed {cfg.seed} --threads {cfg.threads}",
              "params": sum(p.numel() for p in model.parameters())}
    atomic_write_json(out.with_suffix(".json"), record)
    return record
