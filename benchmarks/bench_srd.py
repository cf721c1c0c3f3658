"""SRD cost on CPU (or CUDA with --device cuda): saliency time vs one forward + backward to the input.

Prints, for torchvision ResNet50 (batch 4), VGG16 (batch 2) and ConvNeXt-T (batch 1, ``--models
convnext_tiny``) at 224×224 with random weights:
seconds per image of SRD saliency, the ratio to forward + input-gradient of the same batch (parameters
frozen), and 64 seeds through srd_ierf_from_relevance vs 64 separate srd_ierf calls. All ratios are
measured in one process, interleaved, best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

from sae_cafe.srd import srd_ierf, srd_ierf_from_relevance, srd_saliency

warnings.filterwarnings("ignore")


def best_time(fn, repeat: int, device: str) -> float:
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


def fwd_bwd(model, x, target):
    xg = x.clone().requires_grad_(True)
    model(xg)[:, target].sum().backward()


def bench(name: str, batch: int, layer: str, repeat: int, device: str, seeds: int, separate: int) -> dict:
    model = getattr(torchvision.models, name)().eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224, device=device)
    srd_saliency(model, x, 1)  # builds and verifies the stage graph once
    t_srd = best_time(lambda: srd_saliency(model, x, 1), repeat, device)
    t_ref = best_time(lambda: fwd_bwd(model, x, 1), repeat, device)
    x1 = x[:1]
    h, w = model_grid(model, x1, layer)
    rel = torch.zeros(1, seeds, h, w, device=device)
    idx = torch.arange(seeds, device=device) % (h * w)
    rel[0, torch.arange(seeds), idx // w, idx % w] = 1.0
    t_many = best_time(lambda: srd_ierf_from_relevance(model, x1, layer, rel), repeat, device)
    t_one = best_time(lambda: [srd_ierf(model, x1, layer, (int(i) // w, int(i) % w)) for i in idx[:separate]],
                      1, device) * seeds / separate
    return dict(model=name, batch=batch, srd_s_per_img=t_srd / batch, ref_s_per_img=t_ref / batch,
                ratio=t_srd / t_ref, layer=layer, seeds=seeds, many_s=t_many, separate_s=t_one,
                seed_ratio=t_many / t_one, maps_per_s=batch / t_srd)


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
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    configs = {"resnet50": (4, "layer3.5"), "vgg16": (2, "features.22"), "convnext_tiny": (1, "features.5.4")}
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'model':13s} {'batch':>5s} {'SRD s/img':>10s} {'fwd+bwd s/img':>14s} {'ratio':>6s} {'maps/s':>8s} "
          f"{'64 seeds s':>11s} {'64 calls s':>11s} {'seed ratio':>10s}")
    for name in args.models.split(","):
        batch, layer = configs[name]
        if args.device == "cuda" and name == "resnet50":
            batch = 64
        r = bench(name, batch, layer, args.repeat, args.device, 64, args.separate)
        print(f"{r['model']:13s} {r['batch']:5d} {r['srd_s_per_img']:10.3f} {r['ref_s_per_img']:14.3f} "
              f"{r['ratio']:6.2f} {r['maps_per_s']:8.1f} {r['many_s']:11.3f} {r['separate_s']:11.3f} "
              f"{r['seed_ratio']:10.3f}")


if __name__ == "__main__":
    main()
