"""SRD saliency on the timm foundation towers vs one forward + input-gradient, same batch, same process.

    .venv/bin/python benchmarks/bench_srd_foundation.py [--models clip siglip dinov2] [--batch 2] [--reps 3]

writes benchmarks/results/srd_foundation.{json,md} (``--out`` for another folder).

Models (random weights, 224×224, built by ``load_model`` as timm constructs them; no downloads):
``vit_base_patch16_clip_224`` (CLIP ViT-B/16: norm_pre, a fresh 1000-class head, target = predicted class),
``vit_base_patch16_siglip_224`` (SigLIP ViT-B/16: attention-pool head, headless) and
``vit_small_patch14_dinov2`` (DINOv2-S/14: layer scale, headless, built at 518 px and run at 224 px with
resampled position embeddings). Headless towers are explained along a random unit direction d of their
pooled feature, the baseline back-propagates ⟨model(x), d⟩; the classifier's baseline back-propagates the
target logit. Parameters are frozen (gradient to the input only). Prints the median seconds of ``--reps``
interleaved repetitions, the ratio (target ≤ 1×; wall clock and this process's CPU seconds), the
float32 conservation error |Σmap + sink − target| / (Σ|map| + |sink| + |target|), the sink share
|sink| / (Σ|map| + |sink|), and the iERF conservation error at the middle block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from sae_cafe.models import load_model
from sae_cafe.srd import srd_ierf, srd_saliency

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"clip": "vit_base_patch16_clip_224", "siglip": "vit_base_patch16_siglip_224",
          "dinov2": "vit_small_patch14_dinov2"}


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench(key: str, batch: int, reps: int, device: str) -> dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_model(MODELS[key], device=device)
    model = adapter.model.eval().requires_grad_(False)
    x = torch.randn(batch, 3, *adapter.input_size, device=device)
    with torch.no_grad():
        out = model(x)
    if key == "clip":
        target = out.argmax(1)
        d = torch.nn.functional.one_hot(target, out.shape[1]).to(out.dtype)
    else:
        d = torch.nn.functional.normalize(torch.randn(out.shape[1], device=device), dim=0).expand(batch, -1)
        target = d
    value = (out * d).sum(1)

    def fwd_grad():
        xg = x.clone().requires_grad_(True)
        (model(xg) * d).sum().backward()
        return xg.grad

    def srd():
        return srd_saliency(adapter, x, target, return_sink=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fwd_grad(), srd(), sync()  # warm-up (and the one-time check of the recomputed forward against model(x))
    base, srd_t = [], []
    for _ in range(reps):  # interleaved so that load changes hit both alike
        base.append(_time(lambda: (fwd_grad(), sync())))
        srd_t.append(_time(lambda: (srd(), sync())))
    t_base, t_srd = (statistics.median(t[0] for t in v) for v in (base, srd_t))
    c_base, c_srd = (statistics.median(t[1] for t in v) for v in (base, srd_t))
    maps, sink = srd_saliency(adapter, x, target, contrast="none", return_sink=True)
    err = ((maps.sum((-2, -1)) + sink - value).abs()
           / (maps.abs().sum((-2, -1)) + sink.abs() + value.abs())).max().item()
    share = (sink.abs() / (maps.abs().sum((-2, -1)) + sink.abs())).mean().item()
    mid = len(adapter.block_names()) // 2
    h, w = adapter.patch_grid()
    im, isink = srd_ierf(adapter, x, mid, (h // 2, w // 2), return_sink=True)
    ierr = (im.sum((-2, -1)) + isink - 1).abs().max().item()
    return {"model": MODELS[key], "target": "class" if key == "clip" else "direction", "fwd_grad_s": t_base,
            "srd_s": t_srd, "ratio": t_srd / t_base, "cpu_ratio": c_srd / max(c_base, 1e-9),
            "cons_err": err, "sink_share": share, "ierf_err": ierr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="folder for srd_foundation.json / .md (default: benchmarks/results)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"batch {args.batch}, 224x224, random weights")
    print(f"{'model':<30} {'target':<9} {'fwd+grad s':>10} {'SRD s':>7} {'ratio':>6} {'CPU ratio':>9} "
          f"{'cons.err':>9} {'sink':>6} {'iERF err':>9}")
    rows = []
    for key in args.models:
        r = bench(key, args.batch, args.reps, args.device)
        r["load"] = round(os.getloadavg()[0], 2)
        rows.append(r)
        print(f"{r['model']:<30} {r['target']:<9} {r['fwd_grad_s']:10.3f} {r['srd_s']:7.3f} {r['ratio']:5.2f}x "
              f"{r['cpu_ratio']:8.2f}x {r['cons_err']:9.1e} {r['sink_share']:6.3f} {r['ierf_err']:9.1e}",
              flush=True)
    if args.out is not None:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                "batch": args.batch, "reps": args.reps, "input": "224 px", "weights": "random",
                "dtype": "float32", "timing": "median of interleaved repetitions"}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "srd_foundation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "srd_foundation.md").write_text(render(rows, meta))


def render(rows: list[dict], meta: dict) -> str:
    """The results as a Markdown table (ratio target ≤ 1×)."""
    lines = [f"batch {meta['batch']}, {meta['threads']} threads, {meta['device']}, 224 px, random weights, "
             f"float32, median of {meta['reps']} interleaved repetitions; load = 1-minute load average", "",
             "| model | target | fwd + input-grad s | SRD s | ratio (wall) | ratio (CPU s) | conservation err "
             "| sink share | iERF err | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']} | {r['fwd_grad_s']:.3f} | {r['srd_s']:.3f} | "
                     f"{r['ratio']:.2f}× | {r['cpu_ratio']:.2f}× | {r['cons_err']:.1e} | {r['sink_share']:.3f} | "
                     f"{r['ierf_err']:.1e} | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
