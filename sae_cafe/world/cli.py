"""``sae-cafe make-world``, ``train-model`` and ``eval-models`` (the embedded concept world)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-world", help="generate the concept world into indexes/<run>/world")
    p.add_argument("--run", default="demo", help="run name (default: demo)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    p.set_defaults(func=_make_world)

    t = subparsers.add_parser("train-model", help="train a mini model on the concept world (CPU)")
    t.add_argument("--arch", required=True, choices=("mini_resnet", "mini_vgg", "mini_vit"))
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default per arch)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--train-images", type=int, default=None, help="generated training pool size")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    t.add_argument("--out", default=None,
                   help="output stem (writes STEM.safetensors + STEM.json); default: the shipped weights "
                        "sae_cafe/weights/<arch>")
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval-models", help="accuracy of the shipped mini models on fresh scenes")
    e.add_argument("--arch", nargs="*", default=["mini_resnet", "mini_vgg", "mini_vit"])
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--seed", type=int, default=None, help="world seed (default: the evaluation seed)")
    e.set_defaults(func=_eval)


def _make_world(args) -> int:
    from .dataset import write_world
    from .generator import WorldConfig

    path = write_world(args.run, n=args.n, seed=args.seed, config=WorldConfig(size=args.size), root=args.root)
    print(f"wrote {args.n} images and ground truth to {path}")
    return 0


def _train(args) -> int:
    from .train import DEFAULTS, TrainConfig, train_model

    kw = dict(DEFAULTS[args.arch])
    for k in ("steps", "batch_size", "lr", "train_images"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    cfg = TrainConfig(arch=args.arch, seed=args.seed, threads=args.threads, **kw)
    rec = train_model(cfg, out=args.out)
    print(json.dumps({"arch": rec["arch"], "accuracy": rec["eval"]["accuracy"],
                      "train_time_s": rec["train_time_s"]}))
    return 0


def _eval(args) -> int:
    from .train import EVAL_SEED_BASE, evaluate

    seed = EVAL_SEED_BASE + 1 if args.seed is None else args.seed
    for arch in args.arch:
        r = evaluate(arch, n=args.n, seed=seed)
        print(f"{arch}: accuracy {r['accuracy']:.4f} on {r['n']} images (seed {seed})")
    return 0
