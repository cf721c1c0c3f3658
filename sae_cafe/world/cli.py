"""``sae-cafe make-world``, ``train-model`` and ``eval-models`` (the embedded concept world)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-world", help="generate the concept world into indexes/<run>/world")
    p.add_argument("--run", default="demo", help="run name (default: demo)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    p.set_defaults(func=_make_world)

    t = subparsers.add_parser("train-model", help="train a mini model on the concept world (CPU, resumable)")
    t.add_argument("--arch", required=True, choices=("mini_resnet", "mini_vgg", "mini_vit"), help="which mini model")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default per arch)")
    t.add_argument("--batch-size", type=int, default=None, help="scenes per step (default per arch)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default per arch)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default per arch)")
    t.add_argument("--warmup", type=int, default=None, help="warmup steps")
    t.add_argument("--schedule", choices=("cosine", "wsd"), default=None,
                   help="cosine, or wsd (warmup, constant, linear decay over --decay-frac of the steps)")
    t.add_argument("--decay-frac", type=float, default=None, help="wsd: fraction of the steps of the final decay")
    t.add_argument("--data", choices=("pool", "fresh"), default=None,
                   help="pool: a fixed generated pool; fresh: new scenes every batch")
    t.add_argument("--train-images", type=int, default=None, help="generated training pool size (--data pool)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="one random flip/rotation of the square per batch")
    t.add_argument("--distill", default=None,
                   help="teacher model with shipped weights (e.g. mini_resnet), or 'none'")
    t.add_argument("--distill-alpha", type=float, default=None, help="weight of the distillation loss")
    t.add_argument("--distill-temperature", type=float, default=None, help="softmax temperature of the distillation")
    t.add_argument("--probe-every", type=int, default=None, help="steps between held-out probe evaluations")
    t.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    t.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    t.add_argument("--eval-n", type=int, default=None, help="fresh evaluation scenes at the end (default 2000)")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    t.add_argument("--checkpoint-dir", default=None,
                   help="folder for resumable checkpoints (default: <artifact root>/train/<arch>-seed<seed>); "
                        "a rerun with the same settings continues from it")
    t.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint (an interruption restarts)")
    t.add_argument("--out", default=None,
                   help="output stem (writes STEM.safetensors + STEM.json); default: the shipped weights "
                        "sae_cafe/weights/<arch>")
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval-models", help="accuracy of the shipped mini models on fresh scenes")
    e.add_argument("--arch", nargs="*", default=["mini_resnet", "mini_vgg", "mini_vit"], help="mini models to evaluate")
    e.add_argument("--n", type=int, default=2000, help="fresh scenes")
    e.add_argument("--seed", type=int, default=None, help="world seed (default: the evaluation seed)")
    e.set_defaults(func=_eval)


def _make_world(args) -> int:
    from .dataset import write_world
    from .generator import WorldConfig

    path = write_world(args.run, n=args.n, seed=args.seed, config=WorldConfig(size=args.size), root=args.root)
    print(f"wrote {args.n} images and ground truth to {path}")
    return 0


def _train(args) -> int:
    from ..artifacts import run_dir
    from .train import config_for, train_model

    keys = ("steps", "batch_size", "lr", "weight_decay", "warmup", "schedule", "decay_frac", "data",
            "train_images", "augment", "distill", "distill_alpha", "distill_temperature", "probe_every",
            "checkpoint_every", "log_every", "eval_n")
    kw = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if kw.get("distill", "").lower() == "none":
        kw["distill"] = None  # explicit: no teacher, whatever the arch default
    cfg = config_for(args.arch, seed=args.seed, threads=args.threads, **kw)
    ckpt = None if args.no_checkpoint else (args.checkpoint_dir or run_dir("train") / f"{args.arch}-seed{args.seed}")
    rec = train_model(cfg, out=args.out, checkpoint_dir=ckpt)
    print(json.dumps({"arch": rec["arch"], "accuracy": rec["eval"]["accuracy"],
                      "train_time_s": rec["train_time_s"], "cpu_time_s": rec["cpu_time_s"]}))
    return 0


def _eval(args) -> int:
    from .train import EVAL_SEED_BASE, evaluate

    seed = EVAL_SEED_BASE + 1 if args.seed is None else args.seed
    for arch in args.arch:
        r = evaluate(arch, n=args.n, seed=seed)
        print(f"{arch}: accuracy {r['accuracy']:.4f} on {r['n']} images (seed {seed})")
    return 0
