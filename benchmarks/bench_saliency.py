"""Saliency benchmark (issue 9): the full methods × metrics table on the concept world for the mini models,
the cost columns (seconds per image per method) on torchvision ResNet50 / VGG16 / ViT-B/16 with random
weights at 224 px, and optionally the manipulation attack.

    .venv/bin/python benchmarks/bench_saliency.py                        # defaults of the issue (long)
    .venv/bin/python benchmarks/bench_saliency.py --n 40 --n-fidelity 10 --cost-n 1 --cost-methods cheap
    .venv/bin/python benchmarks/bench_saliency.py --n 8 --n-fidelity 4 --methods saliency,gradcam,chefer2021 \
        --skip-cost --root /tmp/sal --run tiny                                  # a tiny run of both sets

Table runs go through ``sae-cafe benchmark-saliency`` (artifacts under ``<root>/<run>/saliency/<model>``,
resumable per image). One run per model computes every method's maps once (and the stability metric's noisy
copies) and derives both metric definition sets from them (``--definitions both``, docs/metrics.md):
``table_source.csv`` and ``table_paper.csv``; ``benchmarks/saliency_tables.py`` renders them. Mini models
without shipped weights are reported and skipped.
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
        n_stab = args.n_fidelity if args.n_stability is None else args.n_stability
        print(f"\n### {name}: {args.n} world images ({args.n_fidelity} for μ-fidelity, {n_stab} for stability)")
        t0 = time.perf_counter()
        cmd = ["benchmark-saliency", "--model", name, "--n", str(args.n), "--n-fidelity", str(args.n_fidelity),
               "--methods", args.methods, "--run", args.run, "--subsets", str(args.subsets),
               "--noise-samples", str(args.noise_samples), "--attack-pairs", str(args.attack_pairs),
               "--attack-iters", str(args.attack_iters), "--definitions", args.definitions]
        if args.root:
            cmd += ["--root", args.root]
        if args.n_stability is not None:
            cmd += ["--n-stability", str(args.n_stability)]
        for flag, items in (("--max-images", args.max_images), ("--max-stability", args.max_stability)):
            for item in items:
                cmd += [flag, item]
        if args.no_progress:
            cmd.append("--no-progress")
        main(cmd)
        print(f"{name}: {(time.perf_counter() - t0) / 60:.1f} min total")


def _cam_channels(adapter, x) -> int:
    """Channels of the adapter's CAM layer (Score-CAM and Ablation-CAM run one forward per channel)."""
    from sae_cafe.evaluation.baselines import cam_target_layer

    layer, reshape = cam_target_layer(adapter)
    got = {}
    with torch.no_grad(), adapter.hooks({layer: lambda _m, _i, out: got.setdefault("A", out)}):
        adapter.model(x[:1])
    A = got["A"] if reshape is None else reshape(got["A"])
    return int(A.shape[1])


def estimated_cost(method: str, adapter, x, fwd: float, grad: float) -> str:
    """Estimated seconds per image of a method whose 224-px cost is not measured: forwards (RISE masks,
    Score-/Ablation-CAM channels) × the measured forward time, or gradient passes (IG steps, SmoothGrad
    samples) × the measured Saliency (one gradient) time."""
    from sae_cafe.evaluation.baselines import IG_STEPS, RISE_MASKS

    if method == "rise":
        k, unit, sec = RISE_MASKS, "fwd", fwd
    elif method in ("scorecam", "ablationcam"):
        k, unit, sec = 1 + _cam_channels(adapter, x), "fwd", fwd
    elif method in ("integrated_gradients", "smoothgrad"):
        k, unit, sec = (IG_STEPS if method == "integrated_gradients" else 16), "grad", grad
    else:
        raise ValueError(f"no cost estimate for {method}")
    return f"≈{k * sec:.0f} (est.: {k} {unit})"


def cost_runs(args) -> None:
    from sae_cafe.evaluation.baselines import applicability
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, resolve_methods, run_saliency_benchmark
    from sae_cafe.models import load_model

    methods = resolve_methods(args.cost_methods)
    estimate = [m for m in methods if m in set(args.cost_estimate)]
    measure = [m for m in methods if m not in estimate]
    if any(m in ("integrated_gradients", "smoothgrad") for m in estimate) and "saliency" not in measure:
        measure.insert(0, "saliency")  # their estimate is a multiple of one gradient
    import captum.attr  # noqa: F401  (library imports are not part of a method's seconds per image)
    import pytorch_grad_cam  # noqa: F401
    import zennit.composites  # noqa: F401
    g = torch.Generator().manual_seed(0)
    rows, fwd = {}, {}
    for name in args.cost_models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = load_model(name)
        x = torch.randn(args.cost_n, 3, 224, 224, generator=g)
        xb = torch.randn(8, 3, 224, 224, generator=g)
        with torch.no_grad():
            adapter.model(xb[:1])
            t0 = time.perf_counter()
            adapter.model(xb)
            fwd[name] = (time.perf_counter() - t0) / len(xb)
        print(f"{name}: forward {fwd[name]:.3f} s/img (batch 8, no grad)", flush=True)
        res = run_saliency_benchmark(adapter, x, None, None, measure, BenchmarkConfig(metrics=(), n_fidelity=0),
                                     progress=not args.no_progress)
        rows[name] = {m: (f"{res.seconds[m].mean():.2f}" if m in res.seconds
                          else "n/a" if m in res.not_applicable else "error") for m in measure}
        for m in estimate:
            rows[name][m] = ("n/a" if applicability(m, adapter) else
                             estimated_cost(m, adapter, x, fwd[name], float(res.seconds["saliency"].mean())))
        for m, r in {**res.not_applicable, **res.errors}.items():
            print(f"  {name} {m}: {r}")
        print("  " + "  ".join(f"{m}={v}" for m, v in rows[name].items()), flush=True)
    print(f"\n### seconds per image at 224 px (random weights, n={args.cost_n}, "
          f"{torch.get_num_threads()} threads; est. = forwards × measured forward time)")
    print(f"| method | {' | '.join(rows)} |")
    print("|---|" + "---|" * len(rows))
    print(f"| forward (no grad) | {' | '.join(f'{fwd[n]:.3f}' for n in rows)} |")
    for m in dict.fromkeys(measure + methods):
        print(f"| {m} | {' | '.join(rows[n][m] for n in rows)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["mini_resnet", "mini_vgg", "mini_vit"])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--n-fidelity", type=int, default=100)
    p.add_argument("--n-stability", type=int, default=None, help="default: as --n-fidelity")
    p.add_argument("--max-images", action="append", default=[], metavar="METHOD=N")
    p.add_argument("--max-stability", action="append", default=[], metavar="METHOD=N")
    p.add_argument("--subsets", type=int, default=200)
    p.add_argument("--noise-samples", type=int, default=20)
    p.add_argument("--methods", default="all")
    p.add_argument("--run", default="bench_saliency")
    p.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    p.add_argument("--definitions", choices=("both", "source", "paper"), default="both",
                   help="metric definition sets, derived from one set of maps (default both)")
    p.add_argument("--attack-pairs", type=int, default=0, help="issue: 20")
    p.add_argument("--attack-iters", type=int, default=500)
    p.add_argument("--cost-models", nargs="*", default=["resnet50", "vgg16", "vit_b_16"])
    p.add_argument("--cost-n", type=int, default=2)
    p.add_argument("--cost-methods", default="all")
    p.add_argument("--cost-estimate", nargs="*",
                   default=["scorecam", "ablationcam", "rise", "integrated_gradients", "smoothgrad"],
                   help="methods whose 224-px cost is estimated (forwards × forward time, or gradient passes × "
                        "one gradient's time) instead of measured: minutes to an hour per image on one CPU thread")
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
