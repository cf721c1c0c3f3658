"""Saliency benchmark (issue 9): the full methods × metrics table on the concept world for the mini models,
the cost columns (seconds per image per method) on torchvision ResNet50 / VGG16 / ViT-B/16 with random
weights at 224 px, and optionally the manipulation attack.

    .venv/bin/python benchmarks/bench_saliency.py                        # defaults of the issue (long)
    .venv/bin/python benchmarks/bench_saliency.py --n 40 --n-fidelity 10 --cost-n 1 --cost-methods cheap

Table runs go through ``sae-cafe benchmark-saliency`` (artifacts under ``indexes/<run>/saliency/<model>``,
resumable per image). Mini models without shipped weights are reported and skipped.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def table_runs(args) -> None:
    from sae_cafe.cli import main
    from sae_cafe.models.mini import weights_path

    for name in args.models:
        if not weights_path(name).exists():
            print(f"\n### {name}: no shipped weights ({weights_path(name)}); skipped")
            continue
        print(f"\n### {name}: {args.n} world images ({args.n_fidelity} for μ-fidelity and stability)")
        t0 = time.perf_counter()
        cmd = ["benchmark-saliency", "--model", name, "--n", str(args.n), "--n-fidelity", str(args.n_fidelity),
               "--methods", args.methods, "--run", args.run, "--subsets", str(args.subsets),
               "--noise-samples", str(args.noise_samples), "--attack-pairs", str(args.attack_pairs),
               "--attack-iters", str(args.attack_iters)]
        if args.no_progress:
            cmd.append("--no-progress")
        main(cmd)
        print(f"{name}: {(time.perf_counter() - t0) / 60:.1f} min total")


def cost_runs(args) -> None:
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, resolve_methods, run_saliency_benchmark
    from sae_cafe.models import load_model

    methods = resolve_methods(args.cost_methods)
    g = torch.Generator().manual_seed(0)
    rows = {}
    for name in args.cost_models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = load_model(name)
        x = torch.randn(args.cost_n, 3, 224, 224, generator=g)
        res = run_saliency_benchmark(adapter, x, None, None, methods, BenchmarkConfig(metrics=(), n_fidelity=0),
                                     progress=not args.no_progress)
        rows[name] = {m: (f"{res.seconds[m].mean():.2f}" if m in res.seconds
                          else "n/a" if m in res.not_applicable else "error") for m in methods}
        for m, r in {**res.not_applicable, **res.errors}.items():
            print(f"  {name} {m}: {r}")
    print(f"\n### seconds per image at 224 px (random weights, n={args.cost_n}, "
          f"{torch.get_num_threads()} threads)")
    print(f"{'method':<22}" + "".join(f"{n:>14}" for n in rows))
    for m in methods:
        print(f"{m:<22}" + "".join(f"{rows[n][m]:>14}" for n in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["mini_resnet", "mini_vgg", "mini_vit"])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--n-fidelity", type=int, default=100)
    p.add_argument("--subsets", type=int, default=200)
    p.add_argument("--noise-samples", type=int, default=20)
    p.add_argument("--methods", default="all")
    p.add_argument("--run", default="bench_saliency")
    p.add_argument("--attack-pairs", type=int, default=0, help="issue: 20")
    p.add_argument("--attack-iters", type=int, default=500)
    p.add_argument("--cost-models", nargs="*", default=["resnet50", "vgg16", "vit_b_16"])
    p.add_argument("--cost-n", type=int, default=2)
    p.add_argument("--cost-methods", default="all")
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_table:
        table_runs(args)
    if not args.skip_cost:
        cost_runs(args)


if __name__ == "__main__":
    main()
