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

The cost part with ``--cost-out STEM`` also writes ``STEM.json`` and ``STEM.md`` (a bare name goes under
``benchmarks/results/``): the README's 224-px cost table with the machine, threads, load before/after, date and
command it was measured with (``result_record.py``). The README's table:

    nice -n 10 .venv/bin/python benchmarks/bench_saliency.py --skip-table --cost-n 1 --threads 1 \
        --cost-estimate scorecam ablationcam rise --cost-out saliency_cost
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_record import Measure, provenance, provenance_line, render_md, stem_path, write_results  # noqa: E402
from saliency_tables import NAMES  # noqa: E402

COST_NAMES = {**NAMES, "smoothgrad": "SmoothGrad (16)"}  # its 16 noise samples, as IG's 32 steps


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


def cost_runs(args) -> dict:
    """Seconds per image of each method at 224 px per model (measured, or estimated for ``--cost-estimate``);
    prints the Markdown table and returns the record ``--cost-out`` writes."""
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
    rows, fwd, notes = {}, {}, {}
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
            notes.setdefault(name, {})[m] = str(r)
        print("  " + "  ".join(f"{m}={v}" for m, v in rows[name].items()), flush=True)
    order = list(dict.fromkeys(measure + methods))
    cost = {"n_images": args.cost_n, "threads": torch.get_num_threads(), "models": list(rows),
            "forward_seconds": {n: round(fwd[n], 4) for n in rows}, "methods": order, "estimated": estimate,
            "seconds_per_image": rows, "not_applicable_or_error": notes}
    print(f"\n### seconds per image at 224 px (random weights, n={args.cost_n}, "
          f"{torch.get_num_threads()} threads; est. = forwards × measured forward time)")
    print(cost_table(cost))
    return cost


def cost_table(cost: dict) -> str:
    """The Markdown table of :func:`cost_runs`'s record (method × model, seconds per image)."""
    models = cost["models"]
    lines = [f"| method | {' | '.join(models)} |", "|---|" + "---|" * len(models),
             "| forward (no grad) | " + " | ".join(f"{cost['forward_seconds'][n]:.3f}" for n in models) + " |"]
    for m in cost["methods"]:
        lines.append(f"| {COST_NAMES.get(m, m)} | {' | '.join(cost['seconds_per_image'][n][m] for n in models)} |")
    return "\n".join(lines)


def cost_markdown(rec: dict) -> str:
    """The README block of a ``--cost-out`` record: what was measured and how, then the table."""
    cost = rec["cost"]
    est = ", ".join(COST_NAMES.get(m, m) for m in cost["estimated"])
    how = []
    if {"rise", "scorecam", "ablationcam"} & set(cost["estimated"]):
        how.append("forwards (RISE masks, CAM channels + 1) × the measured forward time")
    if {"integrated_gradients", "smoothgrad"} & set(cost["estimated"]):
        how.append("gradient passes × the measured time of one gradient")
    est = f" Estimated, not measured ({est}): {', or '.join(how)}." if est else ""
    n, t = cost["n_images"], cost["threads"]
    return (f"Seconds per image at 224 px (torchvision, random weights; {n} image{'s' * (n != 1)}; forward: "
            f"batch of 8, no grad).{est} {provenance_line(rec, f'{t} torch thread' + 's' * (t != 1))}\n\n"
            f"{cost_table(cost)}\n")


def write_cost(stem: str, cost: dict, measure: dict) -> None:
    """``STEM.json`` / ``STEM.md``: the cost table with what it was measured under."""
    rec = {**provenance(cost["threads"]), **measure, "cost": cost}
    write_results(stem_path(stem), rec, cost_markdown)


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
    p.add_argument("--cost-out", default=None, metavar="STEM",
                   help="also write the cost table to STEM.json/.md (bare name: under benchmarks/results/)")
    p.add_argument("--cost-render", action="store_true",
                   help="only rewrite the --cost-out STEM.md from its STEM.json (nothing is measured)")
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.cost_render:
        if not args.cost_out:
            p.error("--cost-render needs --cost-out STEM")
        print(render_md(stem_path(args.cost_out), cost_markdown))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_table:
        table_runs(args)
    if not args.skip_cost:
        with Measure() as m:
            cost = cost_runs(args)
        if args.cost_out:
            write_cost(args.cost_out, cost, m.record())


if __name__ == "__main__":
    main()
