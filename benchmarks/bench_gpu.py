"""SRD saliency maps/s on CUDA beside forward + input-gradient, Grad-CAM and LRP, in one run (issue 22).

    .venv/bin/python benchmarks/bench_gpu.py [--resnet-batch 64] [--vit-batch 64] [--repeat 5] [--out FILE]

Models (random weights; the cost does not depend on the weights): torchvision ResNet-50 at batch 64 and
ViT-B/16 at ``--vit-batch``, 224×224. Methods, each timed on the same batch in the same process, best of
``--repeat`` after one warm-up, ``torch.cuda.synchronize()`` around every run:

- ``srd``: :func:`sae_cafe.srd.srd_saliency` (float32) for the predicted classes;
- ``forward+gradient``: one forward and the gradient to the input (no parameter gradients), the unit SRD's
  cost is quoted in;
- ``gradcam``: pytorch-grad-cam's Grad-CAM through :func:`sae_cafe.evaluation.baselines.explain`;
- ``lrp``: zennit LRP EpsilonPlus (``lrp_epsilon_plus``) for ResNet-50; for ViT-B/16 the registry's
  transformer LRP (``attnlrp``) when it applies, else the reason it does not is printed.

On a machine without CUDA the script exits with status 2 and says so (``--device cpu`` runs the same code on
the CPU at a small batch, to check the script, not to measure a GPU). The README keeps saying "unverified on
GPU" until a run of this script on a real GPU is recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def best_time(fn, repeat: int, device: str) -> float:
    fn()  # warm-up (cuDNN autotuning, lazy initialisation)
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def forward_gradient(model, x, target):
    """One forward and the gradient to the input only (``autograd.grad``: no parameter gradients)."""
    xg = x.clone().requires_grad_(True)
    return torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)[0]


def bench_model(name: str, batch: int, device: str, repeat: int) -> dict:
    from sae_cafe.evaluation.baselines import NotApplicable, explain
    from sae_cafe.models import load_model
    from sae_cafe.srd import srd_saliency

    adapter = load_model(name, device=device)  # no weights file: random initialisation (timing only)
    model = adapter.model.eval()
    x = torch.randn(batch, 3, 224, 224, device=device, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        target = model(x).argmax(1)
    lrp = "lrp_epsilon_plus" if adapter.family != "vit" else "attnlrp"
    methods = {"srd": lambda: srd_saliency(adapter, x, target),
               "forward+gradient": lambda: forward_gradient(model, x, target),
               "gradcam": lambda: explain("gradcam", adapter, x, target),
               lrp: lambda: explain(lrp, adapter, x, target)}
    out: dict = {"model": name, "batch": batch, "device": device, "methods": {}}
    for m, fn in methods.items():
        try:
            s = best_time(fn, repeat, device)
            out["methods"][m] = {"seconds": s, "maps_per_s": batch / s}
        except NotApplicable as e:
            out["methods"][m] = {"not_applicable": e.reason}
        except torch.cuda.OutOfMemoryError as e:
            out["methods"][m] = {"out_of_memory": str(e).splitlines()[0]}
            torch.cuda.empty_cache()
    fg = out["methods"]["forward+gradient"].get("seconds")
    for r in out["methods"].values():
        if "seconds" in r and fg:
            r["x_forward_gradient"] = r["seconds"] / fg
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resnet-batch", type=int, default=64, help="ResNet-50 images per batch")
    ap.add_argument("--vit-batch", type=int, default=64, help="ViT-B/16 images per batch")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per method (best is kept)")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check of this script)")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); this benchmark measures "
              "SRD on a GPU: run it on a machine with CUDA (or --device cpu --resnet-batch 2 --vit-batch 2 to "
              "check the script)", file=sys.stderr)
        return 2
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = [bench_model("resnet50", args.resnet_batch, args.device, args.repeat),
            bench_model("vit_b_16", args.vit_batch, args.device, args.repeat)]
    for r in rows:
        print(f"\n{r['model']} batch {r['batch']} on {r.get('gpu', r['device'])}"
              + (f" (peak {r['peak_gpu_mb']:.0f} MB)" if "peak_gpu_mb" in r else ""))
        for m, v in r["methods"].items():
            if "seconds" in v:
                print(f"  {m:18s} {v['maps_per_s']:9.1f} maps/s  {v['seconds'] * 1e3:9.1f} ms/batch  "
                      f"{v['x_forward_gradient']:6.2f}× forward+gradient")
            else:
                print(f"  {m:18s} {next(iter(v.values()))}")
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
