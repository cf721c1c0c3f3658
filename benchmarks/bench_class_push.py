"""Class push cost vs the whole CAFE stage: torchvision ResNet-50 ``layer4`` (random weights), a random TopK SAE
with 2048 latents, a few images. Prints the seconds of ``class_push`` (Jacobian of the linear head, one
backward per class), of the whole ``build_cafe`` stage on the same inputs (which includes the class push), the
ratio, and — on a subset of latents — the cost of the earlier per-latent whole-network forward, extrapolated
to all latents. Writes ``benchmarks/results/class_push.{json,md}`` (``--out``; ``--out ''`` prints only).

    .venv/bin/python benchmarks/bench_class_push.py [--n-images 4] [--d-sae 2048] [--threads 1] [--old-latents 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def random_topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.b_enc.zero_()
    return sae.eval()


def images(n: int, size: int = 256) -> list:
    """``n`` crops of skimage.data photos (no download: skimage ships them), else seeded noise images."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data

        photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    except ImportError:
        photos = [np.random.default_rng(i).integers(0, 255, (size * 2, size * 2, 3), dtype=np.uint8) for i in range(4)]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        s = min(h, w, size)
        y, x = (i * 37) % max(1, h - s + 1), (i * 53) % max(1, w - s + 1)
        out.append(Image.fromarray(p[y:y + s, x:x + s]).convert("RGB"))
    return out


@torch.no_grad()
def old_class_push(adapter, sae, layer: str, x: torch.Tensor, n: int) -> float:
    """Seconds of the earlier method (one whole-network forward per latent, 64 latents per batch) for ``n``
    latents."""
    act = adapter.capture(x, [layer], stop_early=True)[layer]
    batch = adapter.to_pfv(act)
    W = sae.W_dec.detach().float()[:n]
    t = time.perf_counter()
    for s in range(0, n, 64):
        d = W[s:s + 64]
        pf = d[:, None, :].expand(d.shape[0], batch.pfv.shape[1], d.shape[1]).contiguous()
        bb = type(batch)(pf, batch.positions, batch.grid, batch.extra)
        adapter.forward_from(layer, adapter.from_pfv(bb), x.expand(d.shape[0], *x.shape[1:]))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--sae-k", type=int, default=8, help="TopK k of the random SAE")
    ap.add_argument("--cafe-k", type=int, default=2, help="exemplars per latent in the CAFE stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-latents", type=int, default=32, help="latents timed with the earlier method (0: skip)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                    help="folder for class_push.{json,md} ('' = print only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sae_cafe.cafe import build_cafe
    from sae_cafe.cafe.build import class_push
    from sae_cafe.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights on purpose: only the cost is measured
        ad = load_model("resnet50")
    layer = "layer4"
    sae = random_topk_sae(ad.layers()[layer].channels, args.d_sae, args.sae_k)
    imgs = images(args.n_images)
    x = ad.preprocess(imgs[:1])
    t = time.perf_counter()
    push = class_push(ad, sae, layer, x)
    t_push = time.perf_counter() - t
    assert push is not None and push.shape == (args.d_sae, 1000)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        cafe = build_cafe(ad, sae, layer, imgs, out_dir=f"{d}/cafe", k=args.cafe_k, n_sample=0, progress=False)
        t_stage = time.perf_counter() - t
        n_ex = cafe.n_exemplars
    load = os.getloadavg()[0]
    res = {"model": "resnet50 (torchvision, random weights)", "layer": layer, "d_sae": args.d_sae,
           "n_images": args.n_images, "cafe_k": args.cafe_k, "exemplars_anchored": n_ex, "threads": args.threads,
           "class_push_seconds": round(t_push, 3), "cafe_stage_seconds": round(t_stage, 2),
           "class_push_percent_of_stage": round(100 * t_push / t_stage, 2), "target_percent": 10.0}
    lines = [f"ResNet-50 {layer}, {args.d_sae} latents, {args.n_images} images, {args.threads} thread(s), "
             f"{n_ex} exemplars anchored",
             f"class_push (head Jacobian):        {t_push:8.2f} s",
             f"whole CAFE stage (incl. the push): {t_stage:8.2f} s",
             f"class_push / stage:                {100 * t_push / t_stage:8.1f} %"]
    if args.old_latents:
        t_old = old_class_push(ad, sae, layer, x, args.old_latents)
        res.update(old_method_seconds=round(t_old, 2), old_method_latents=args.old_latents,
                   old_method_extrapolated_seconds=round(t_old * args.d_sae / args.old_latents, 1))
        lines.append(f"earlier per-latent forward: {t_old:.2f} s for {args.old_latents} latents → "
                     f"~{t_old * args.d_sae / args.old_latents:.0f} s for {args.d_sae} latents (extrapolated)")
    print("\n".join(lines))
    if not args.out:
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    res.update(load_average_before=round(load, 2), load_average_after=round(os.getloadavg()[0], 2),
               nice=os.nice(0), cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
               date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "class_push.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"Class push vs the CAFE stage: torchvision ResNet-50 `{layer}`, random TopK SAE with {args.d_sae} latents, "
          f"{args.n_images} images, {args.threads} torch thread(s), {res['cpus']} CPU cores (load average "
          f"{res['load_average_before']:.1f} before, {res['load_average_after']:.1f} after), {res['date']}, "
          f"commit {commit[:10]} (`benchmarks/bench_class_push.py`).", "",
          "| what | seconds |", "|---|---:|",
          f"| `class_push` (Jacobian of the part after the layer, {args.d_sae} latents) | {t_push:.2f} |",
          f"| whole `build_cafe` stage (incl. the push) | {t_stage:.2f} |",
          f"| **class push / stage** | **{100 * t_push / t_stage:.1f} %** (target ≤ 10 %) |"]
    if args.old_latents:
        md.append(f"| earlier method: whole-network forward per latent, extrapolated from {args.old_latents} "
                  f"latents | {res['old_method_extrapolated_seconds']:.0f} |")
    (out / "class_push.md").write_text("\n".join(md) + "\n")

if __name__ == "__main__":
    main()
