"""SRD saliency for ViTs vs one forward + backward to the input (parameters frozen), same batch, same process.

    .venv/bin/python benchmarks/bench_srd_vit.py [--models vit_b_16 deit_small_patch16_224] [--batch 4]

Random weights (no downloads); the classifier heads are re-initialised with N(0, 0.02) because torchvision
zero-initialises its head (every logit would be 0). Prints seconds (median of ``--reps``), the ratio (target
≤ 1×; wall clock and this process's CPU seconds, the latter less disturbed on a shared machine), and sink
shares |sink| / (Σ|map| + |sink|) of saliency maps and of a middle-block iERF.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from sae_cafe.models import load_model
from sae_cafe.srd.vit import vit_srd_ierf, vit_srd_saliency


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _share(maps: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    return sink.abs() / (maps.abs().sum((-2, -1)) + sink.abs())


def bench(name: str, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_model(name)
    model = adapter.model.eval().requires_grad_(False)
    head = model.heads.head if hasattr(model, "heads") else model.head
    torch.nn.init.normal_(head.weight, std=0.02)
    x = torch.randn(batch, 3, *adapter.input_size)
    with torch.no_grad():
        target = model(x).argmax(1)

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        model(xg).gather(1, target[:, None]).sum().backward()
        return xg.grad

    def srd():
        return vit_srd_saliency(adapter, x, target, return_sink=True)

    fwd_bwd(), srd()  # warm-up (also the one-time check of the recomputed forward against model(x))
    base, srd_t = [], []
    for _ in range(reps):  # interleaved so that load changes hit both alike
        base.append(_time(fwd_bwd))
        srd_t.append(_time(srd))
    t_base, t_srd = (statistics.median(t[0] for t in v) for v in (base, srd_t))
    c_base, c_srd = (statistics.median(t[1] for t in v) for v in (base, srd_t))
    maps, sink = srd()
    maps_n, sink_n = vit_srd_saliency(adapter, x, target, contrast="none", return_sink=True)
    with torch.no_grad():
        logit = model(x).gather(1, target[:, None])[:, 0]
    err = ((maps_n.sum((-2, -1)) + sink_n - logit).abs()
           / (maps_n.abs().sum((-2, -1)) + sink_n.abs() + logit.abs())).max().item()
    mid = len(adapter.block_names()) // 2
    h, w = adapter.patch_grid()
    im, isink = vit_srd_ierf(adapter, x, mid, (h // 2, w // 2), return_sink=True)
    return {"model": name, "batch": batch, "fwd_bwd_s": t_base, "srd_s": t_srd, "ratio": t_srd / t_base,
            "fwd_bwd_cpu_s": c_base, "srd_cpu_s": c_srd, "cpu_ratio": c_srd / c_base,
            "sink_share_mean": _share(maps, sink).mean().item(),
            "sink_share_none": _share(maps_n, sink_n).mean().item(),
            "sink_share_ierf": _share(im, isink).mean().item(), "ierf_block": mid,
            "conservation_rel_err_f32": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_b_16", "deit_small_patch16_224"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU")
    print(f"{'model':<24} {'fwd+bwd s':>9} {'SRD s':>7} {'ratio':>6} {'CPU ratio':>9} {'sink(mean)':>10} "
          f"{'sink(none)':>10} {'sink(iERF)':>10} {'cons.err':>9}")
    for name in args.models:
        r = bench(name, args.batch, args.reps)
        print(f"{r['model']:<24} {r['fwd_bwd_s']:9.3f} {r['srd_s']:7.3f} {r['ratio']:5.2f}x {r['cpu_ratio']:8.2f}x "
              f"{r['sink_share_mean']:10.3f} {r['sink_share_none']:10.3f} {r['sink_share_ierf']:10.2e} "
              f"{r['conservation_rel_err_f32']:9.1e}")


if __name__ == "__main__":
    main()
