"""``sae-cafe benchmark-saliency``: SRD against the saliency baselines on the concept world or a folder."""

from __future__ import annotations

import argparse

import numpy as np

# library helpers live in runs.py; re-exported here for existing imports
from .runs import WORLD_POOL, load_folder_data, load_world_data, mask_through_preprocess  # noqa: F401


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("benchmark-saliency",
                              help="methods × metrics table (pointing, localisation, sparseness, μ-fidelity, "
                                   "stability, insertion, deletion) into indexes/<run>/saliency/<model>")
    p.add_argument("--model", required=True, help="model name (see sae_cafe.models.list_adapters)")
    p.add_argument("--weights", default=None, help="weights file (default: the model's shipped weights/random)")
    p.add_argument("--data", default="world",
                   help="'world' (the run's exported concept world, else freshly generated scenes) or a folder "
                        "of images with masks in <folder>/masks/<stem>.png or <stem>_mask.png (no masks: "
                        "pointing/localisation are skipped)")
    p.add_argument("--n", type=int, default=500, help="images (default 500)")
    p.add_argument("--n-fidelity", type=int, default=100,
                   help="the first N images also get μ-fidelity (default 100)")
    p.add_argument("--n-stability", type=int, default=None,
                   help="the first N images also get stability (default: as --n-fidelity)")
    p.add_argument("--max-images", action="append", default=[], metavar="METHOD=N",
                   help="score METHOD on its first N images only (repeatable; e.g. rise=50 for a costly method)")
    p.add_argument("--max-stability", action="append", default=[], metavar="METHOD=N",
                   help="stability of METHOD on its first N images only (repeatable)")
    p.add_argument("--methods", default="all", help="comma list, 'cheap' or 'all' (default all)")
    p.add_argument("--metrics", default=None, help="comma list of metrics (default all)")
    p.add_argument("--run", default="demo", help="run name (default demo)")
    p.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    p.add_argument("--target", choices=("label", "predicted"), default="label",
                   help="explain the ground-truth class (world/ImageFolder labels) or the predicted one")
    p.add_argument("--seed", type=int, default=0, help="seed of generated scenes, subsets and noise")
    p.add_argument("--subsets", type=int, default=200, help="μ-fidelity subsets per image (default 200)")
    p.add_argument("--noise-samples", type=int, default=20, help="stability noise samples (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="images per explanation call (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cpu)")
    p.add_argument("--attack-pairs", type=int, default=0,
                   help="also run the manipulation attack on this many image pairs (default 0: skip)")
    p.add_argument("--attack-iters", type=int, default=500, help="attack iterations (default 500)")
    p.add_argument("--definitions", choices=("both", "source", "paper"), default="both",
                   help="metric definition set(s) (docs/metrics.md); 'both' derives both from one set of maps "
                        "(table.csv = source; table_source.csv and table_paper.csv) (default both)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_benchmark)


def _benchmark(args) -> int:
    import torch

    from ..artifacts import publish_stage, stage_path
    from ..errors import SaeCafeError
    from ..models import load_model
    from .benchmark import BenchmarkConfig, run_saliency_definitions, write_saliency_benchmark
    from .metrics import METRICS

    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = load_model(args.model, args.weights, device=args.device)
    if args.data == "world":
        images, masks, labels, ids, upstream = load_world_data(args.run, args.n, args.seed, args.root)
    else:
        images, masks, labels, ids, upstream = load_folder_data(args.data, args.n, adapter.class_names)
    if not len(images):
        raise SaeCafeError(f"no images found in {args.data}")
    x = adapter.preprocess(list(images))
    if masks is not None:
        same = all(m.shape == tuple(x.shape[-2:]) for m in masks) and adapter.resize is None
        masks = np.stack([m if same else mask_through_preprocess(adapter, m) for m in masks])
    targets = None
    if args.target == "label":
        if (np.asarray(labels) < 0).any():
            print("note: no labels for some images; explaining the predicted class")
        else:
            targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    metrics = tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else METRICS
    def caps(items: list[str], flag: str) -> dict[str, int]:
        out = {}
        for item in items:
            name, _, k = item.partition("=")
            if not k.strip().isdigit():
                raise SaeCafeError(f"{flag} wants METHOD=N, got {item!r}")
            out[name.strip()] = int(k)
        return out

    cfg = BenchmarkConfig(metrics=metrics, n_fidelity=args.n_fidelity, n_stability=args.n_stability,
                          max_images=caps(args.max_images, "--max-images"),
                          max_stability=caps(args.max_stability, "--max-stability"), n_subsets=args.subsets,
                          n_noise=args.noise_samples, seed=args.seed,
                          batch_size=args.batch_size,
                          definitions="paper" if args.definitions == "paper" else "source")
    final = stage_path(args.run, "saliency", adapter.name, root=args.root)
    tmp = final.with_name(f".{final.name}.tmp")  # kept across interruptions: per-image results resume
    if not tmp.exists() and final.is_dir():
        # a finished stage keeps its per-image and per-method attack results: a rerun (more images, more
        # methods, the attack added) starts from them
        import shutil

        for part in ("per_image", "attack_state"):
            if (final / part).is_dir():
                shutil.copytree(final / part, tmp / f"{part}.partial")
                (tmp / f"{part}.partial").rename(tmp / part)
    tmp.mkdir(parents=True, exist_ok=True)
    sets = ("source", "paper") if args.definitions == "both" else (args.definitions,)
    import os
    import time

    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    res, *others = run_saliency_definitions(adapter, x, masks, targets, args.methods, cfg, sets,
                                            state_dir=tmp / "per_image", image_ids=ids,
                                            progress=not args.no_progress).values()
    timing = {"table_wall_s": round(time.perf_counter() - t0, 1), "table_cpu_s": round(time.process_time() - c0, 1),
              "threads": torch.get_num_threads(), "load_before": round(load0, 2),
              "load_after_table": round(os.getloadavg()[0], 2),
              "note": "this invocation only: per-image results resumed from an earlier run are not re-timed"}
    if args.attack_pairs:
        from ..artifacts import atomic_write_json
        from .attack import AttackConfig, plot_attack, run_attack_benchmark
        from .benchmark import write_csv

        rows, results = run_attack_benchmark(adapter, x, res.methods, args.attack_pairs,
                                             AttackConfig(iterations=args.attack_iters, seed=args.seed),
                                             progress=not args.no_progress, state_dir=tmp / "attack_state")
        write_csv(rows, tmp / "attack.csv")
        atomic_write_json(tmp / "attack.json", {"config": AttackConfig(iterations=args.attack_iters,
                                                                       seed=args.seed), "rows": rows})
        plot_attack(results, tmp / "attack.png")
        for r in rows:
            print(r["method"], r["status"] if r["status"] != "ok" else
                  f"SSIM→target {r['ssim_to_target_mean']:.3f}  PCC→target {r['pearson_to_target_mean']:.3f}  "
                  f"SSIM→orig {r['ssim_to_orig_mean']:.3f}  same class {r['same_class_mean']:.2f}")
        timing |= {"attack_wall_s": round(time.perf_counter() - t0 - timing["table_wall_s"], 1),
                   "load_after_attack": round(os.getloadavg()[0], 2)}
    write_saliency_benchmark(res, tmp, {"model": args.model, "weights": args.weights,
                                        "weights_hash": adapter.weights_hash, "data": args.data,
                                        "n": len(ids), "target": args.target,
                                        "attack_pairs": args.attack_pairs, "attack_iters": args.attack_iters,
                                        "timing": timing},
                             upstream, others=others)
    publish_stage(tmp, final)
    for r in (res, *others):
        print(f"{r.config.definitions} definitions:\n{r.format_table()}")
    print(f"wrote {final}")
    return 0
