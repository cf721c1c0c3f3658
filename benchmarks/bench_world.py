"""Benchmark of the embedded concept world's mini models.

Prints, for each shipped model, the accuracy on 2000 scenes generated with a fresh seed (never trained
on) and — once ``sae_cafe.srd.srd_saliency`` exists — the SRD saliency pointing-game hit rate on the target
object: a hit when the argmax pixel of the map lies in the target mask or within 15 px × H/224 of it.
The random-pixel hit rate of the same tolerance is printed as the chance level.

    .venv/bin/python benchmarks/bench_world.py [--n 2000] [--n-point 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from sae_cafe.models import load_model
from sae_cafe.models.mini import MINI_ARCHS
from sae_cafe.world import generate
from sae_cafe.world.train import EVAL_SEED_BASE, evaluate, world_tensor


def pointing_game(maps_NHW: np.ndarray, masks_NHW: np.ndarray, tol: float) -> np.ndarray:
    """(N,) bool: argmax pixel of each map within ``tol`` pixels of its mask (distance 0 inside)."""
    hits = np.zeros(len(maps_NHW), bool)
    for i, (m, mask) in enumerate(zip(maps_NHW, masks_NHW)):
        y, x = np.unravel_index(np.argmax(m), m.shape)
        hits[i] = distance_transform_edt(~mask)[y, x] <= tol
    return hits


def chance_level(masks_NHW: np.ndarray, tol: float) -> float:
    """Hit rate of a uniformly random pixel: mean fraction of pixels within ``tol`` of the mask."""
    return float(np.mean([(distance_transform_edt(~m) <= tol).mean() for m in masks_NHW]))


def srd_pointing(arch: str, world, n_point: int, batch: int = 50) -> tuple[float | None, str]:
    try:
        from sae_cafe.srd import srd_saliency
    except ImportError:
        return None, "n/a (sae_cafe.srd.srd_saliency not available yet)"
    ad = load_model(arch)
    H = world.images.shape[1]
    tol = 15 * H / 224
    hits = []
    try:
        for s in range(0, n_point, batch):
            x = world_tensor(world.images[s:s + batch], ad.mean, ad.std)
            target = torch.from_numpy(world.labels[s:s + batch])
            maps = srd_saliency(ad, x, target).detach().float().cpu().numpy()
            hits.append(pointing_game(maps, world.instance[s:s + batch] == 1, tol))
    except Exception as e:  # noqa: BLE001 - report an engine that does not support a family yet
        return None, f"n/a ({type(e).__name__}: {str(e)[:80]})"
    rate = float(np.concatenate(hits).mean())
    return rate, f"{rate:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-point", type=int, default=300, help="images for the pointing game")
    ap.add_argument("--seed", type=int, default=EVAL_SEED_BASE + 2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", nargs="*", default=list(MINI_ARCHS), help="models (default: all three)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.time()
    world = generate(args.n, args.seed)
    print(f"generated {args.n} fresh scenes (seed {args.seed}) in {time.time() - t:.1f}s")
    tol = 15 * world.images.shape[1] / 224
    sub = world.instance[:args.n_point] == 1
    print(f"pointing game: tolerance {tol:.1f} px, chance level {chance_level(sub, tol):.3f} "
          f"({args.n_point} images)")
    results = {}
    print(f"{'model':<12} {'accuracy':>9} {'eval s':>7}  SRD pointing game")
    for arch in args.arch:
        t = time.time()
        acc = evaluate(arch, world=world)["accuracy"]
        dt = time.time() - t
        rate, shown = srd_pointing(arch, world, args.n_point)
        results[arch] = {"accuracy": acc, "n": args.n, "seed": args.seed, "srd_pointing_game": rate}
        print(f"{arch:<12} {acc:>9.4f} {dt:>7.1f}  {shown}")
    if args.json:
        from sae_cafe.artifacts import atomic_write_json

        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
