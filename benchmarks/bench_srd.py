"""SRD cost on CPU (or CUDA with --device cuda): saliency time vs one forward + backward to the input.

Prints, for torchvision ResNet50 (batch 4), VGG16 (batch 2) and ConvNeXt-T (batch 1, ``--models
convnext_tiny``) at 224×224 with random weights:
seconds per image of SRD saliency, the ratio to forward + input-gradient of the same batch (parameters
frozen), and 64 seeds through srd_ierf_from_relevance vs 64 separate srd_ierf calls. All ratios are
measured in one process, interleaved, best of ``--repeat`` runs.

Any registered name works too (``--models timm/resnet50,densenet121``: no seed comparison for those).
``--threads 2,1`` times each thread count in turn. ``--batches 1,4`` overrides the batch sizes;
``--post-forms triangular,sliced`` times ConvNeXt's depthwise-path rule (:mod:`sae_cafe.srd.rules_post`) in
each form on the same batch, in the same process (``sliced`` is the form used before the triangular one);
``--no-seeds`` skips the seed comparison; ``--out STEM`` also writes the rows to ``STEM.json`` and ``STEM.md``
(with the load average at each row and the machine). Besides wall-clock seconds, the ratio of process CPU seconds is
printed (``cpu ratio``): on a machine shared with other jobs it moves less than the wall-clock ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
import warnings

import torch
import torchvision

import sae_cafe.srd.rules_post as rules_post
from sae_cafe.srd import srd_ierf, srd_ierf_from_relevance, srd_saliency

warnings.filterwarnings("ignore")


def best_time(fn, repeat: int, device: str, cpu: list | None = None) -> float:
    """Best wall-clock seconds of ``repeat`` runs; the best process CPU seconds are appended to ``cpu``."""
    times, cpus = [], []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    if cpu is not None:
        cpu.append(min(cpus))
    return min(times)


@contextlib.contextmanager
def post_form(form: str | None):
    """Force the depthwise + post-matrix rule's form (``None``: the library's choice)."""
    orig = rules_post.post_branch_mu
    if form is not None:
        rules_post.post_branch_mu = functools.partial(orig, form=form)
    try:
        yield
    finally:
        rules_post.post_branch_mu = orig


def fwd_bwd(model, x, target):
    xg = x.clone().requires_grad_(True)
    model(xg)[:, target].sum().backward()


def make_model(name: str):
    """A torchvision constructor by name, else a registered name (``timm/resnet50``, ``densenet121``, …)."""
    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)()
    from sae_cafe.models import load_model
    return load_model(name).model


def bench(name: str, batch: int, layer: str, repeat: int, device: str, seeds: int, separate: int,
          form: str | None = None) -> dict:
    model = make_model(name).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224, device=device)
    srd_saliency(model, x, 1)  # builds and verifies the stage graph once
    c_srd, c_ref, w_srd, w_ref = [], [], [], []
    fwd_bwd(model, x, 1)
    for _ in range(repeat):  # interleaved: a load change on a shared machine hits both sides alike
        with post_form(form):
            w_srd.append(best_time(lambda: srd_saliency(model, x, 1), 1, device, c_srd))
        w_ref.append(best_time(lambda: fwd_bwd(model, x, 1), 1, device, c_ref))
    t_srd, t_ref = min(w_srd), min(w_ref)
    # each SRD call is timed next to its own reference call: a slow phase of a shared machine hits both
    paired = statistics.median(a / b for a, b in zip(w_srd, w_ref))
    c_srd, c_ref = [min(c_srd)], [min(c_ref)]
    out = dict(model=name, batch=batch, srd_s_per_img=t_srd / batch, ref_s_per_img=t_ref / batch,
               ratio=t_srd / t_ref, cpu_ratio=c_srd[0] / c_ref[0], paired_ratio=paired, repeat=repeat,
               maps_per_s=batch / t_srd, form=form or "-")
    if not seeds:
        return out | dict(many_s=float("nan"), separate_s=float("nan"), seed_ratio=float("nan"))
    x1 = x[:1]
    h, w = model_grid(model, x1, layer)
    rel = torch.zeros(1, seeds, h, w, device=device)
    idx = torch.arange(seeds, device=device) % (h * w)
    rel[0, torch.arange(seeds), idx // w, idx % w] = 1.0
    t_many = best_time(lambda: srd_ierf_from_relevance(model, x1, layer, rel), repeat, device)
    t_one = best_time(lambda: [srd_ierf(model, x1, layer, (int(i) // w, int(i) % w)) for i in idx[:separate]],
                      1, device) * seeds / separate
    return out | dict(many_s=t_many, separate_s=t_one, seed_ratio=t_many / t_one)


def model_grid(model, x, layer):
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["o"].shape[-2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--separate", type=int, default=8, help="separate srd_ierf calls timed (extrapolated to 64)")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes (default: per model)")
    ap.add_argument("--post-forms", default="",
                    help="ConvNeXt: comma-separated forms of the depthwise-path rule to compare (triangular, sliced)")
    ap.add_argument("--no-seeds", action="store_true", help="skip the 64 seeds vs 64 calls comparison")
    ap.add_argument("--threads", default="", help="comma-separated intra-op thread counts (default: torch's)")
    ap.add_argument("--out", default="", help="results stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    rows: list[dict] = []
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    configs = {"resnet50": (4, "layer3.5"), "vgg16": (2, "features.22"), "convnext_tiny": (1, "features.5.4")}
    threads = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    print(f"device={args.device} threads={threads} torch={torch.__version__}")
    print(f"{'model':13s} {'form':10s} {'batch':>5s} {'thr':>3s} {'SRD s/img':>10s} {'fwd+bwd s/img':>14s} "
          f"{'ratio':>6s} {'cpu ratio':>9s} {'maps/s':>8s} {'64 seeds s':>11s} {'64 calls s':>11s} {'seed ratio':>10s}")
    for name in args.models.split(","):
        batch, layer = configs.get(name, (1, ""))
        if args.device == "cuda" and name == "resnet50":
            batch = 64
        forms = [f or None for f in args.post_forms.split(",")] if "convnext" in name else [None]
        seeds = 0 if args.no_seeds or not layer else 64
        for b in [int(v) for v in args.batches.split(",") if v] or [batch]:
            for t in threads:
                torch.set_num_threads(t)
                for form in forms:
                    r = bench(name, b, layer, args.repeat, args.device, seeds, args.separate, form)
                    print(f"{r['model']:13s} {r['form']:10s} {r['batch']:5d} {t:3d} {r['srd_s_per_img']:10.3f} "
                          f"{r['ref_s_per_img']:14.3f} {r['ratio']:6.2f} {r['cpu_ratio']:9.2f} "
                          f"paired {r['paired_ratio']:5.2f} "
                          f"{r['maps_per_s']:8.1f} {r['many_s']:11.3f} {r['separate_s']:11.3f} "
                          f"{r['seed_ratio']:10.3f}  load {os.getloadavg()[0]:.2f}", flush=True)
                    rows.append(r | {"threads": t, "load": round(os.getloadavg()[0], 2)})
                    if args.out:
                        write_results(args.out, rows, args.device)


def write_results(stem: str, rows: list[dict], device: str) -> None:
    """``STEM.json`` (every row) and ``STEM.md`` (the table the README shows), written after each row."""
    import platform
    from pathlib import Path

    from sae_cafe.artifacts import atomic_write_bytes, atomic_write_json

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {device}"
    atomic_write_json(Path(f"{stem}.json"), {"machine": machine, "torch": torch.__version__, "rows": rows})
    lines = ["| model | batch | threads | SRD s/img | fwd + input-grad s/img | ratio (wall, best) "
             "| ratio (wall, paired median) | ratio (CPU s) | repeats | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['threads']} | {r['srd_s_per_img']:.3f} | {r['ref_s_per_img']:.3f} | "
              f"{r['ratio']:.2f}× | {_fmt(r.get('paired_ratio'))} | {r['cpu_ratio']:.2f}× | {r.get('repeat', '')} | "
              f"{r['load']:.1f} |" for r in rows]
    lines += ["", f"Random weights, 224 × 224, one process ({machine}, torch {torch.__version__}); "
              "`benchmarks/bench_srd.py`. Ratio = SRD saliency time / one forward + backward to the input of the "
              "same batch. Best: best SRD call over best reference call of the interleaved repeats; paired median: "
              "the median over repeats of each SRD call's time over the reference call timed right after it (a "
              "slow phase of a shared machine hits both)."]
    atomic_write_bytes(Path(f"{stem}.md"), ("\n".join(lines) + "\n").encode())


def _fmt(ratio: float | None) -> str:
    return f"{ratio:.2f}×" if ratio is not None else "–"


if __name__ == "__main__":
    main()
