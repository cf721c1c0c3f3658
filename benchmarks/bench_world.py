"""Benchmark of the embedded concept world's mini models.

Prints, for each shipped model, the accuracy on 2000 scenes generated with a fresh seed (never trained
on) and — once ``sae_cafe.srd.srd_saliency`` exists — the SRD saliency pointing-game hit rate on the target
object: a hit when the argmax pixel of the map lies in the target mask or within 15 px × H/224 of it.
The random-pixel hit rate of the same tolerance is printed as the chance level.

    .venv/bin/python benchmarks/bench_world.py [--n 2000] [--n-point 300] [--out benchmarks/results/world]

Writes ``OUT.json`` (every number, with the weights' sha256 and training record) and ``OUT.md`` (the README's
table, rendered into README.md by ``benchmarks/render_readme.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    ap.add_argument("--out", default="benchmarks/results/world",
                    help="results stem: writes STEM.json and STEM.md ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.time()
    world = generate(args.n, args.seed)
    print(f"generated {args.n} fresh scenes (seed {args.seed}) in {time.time() - t:.1f}s")
    tol = 15 * world.images.shape[1] / 224
    sub = world.instance[:args.n_point] == 1
    print(f"pointing game: tolerance {tol:.1f} px, chance level {chance_level(sub, tol):.3f} "
          f"({args.n_point} images)")
    results = {"n": args.n, "seed": args.seed, "n_point": args.n_point, "tolerance_px": tol,
               "chance": chance_level(sub, tol), "threads": args.threads, "models": {}}
    print(f"{'model':<12} {'accuracy':>9} {'eval s':>7}  SRD pointing game")
    for arch in args.arch:
        t = time.time()
        acc = evaluate(arch, world=world)["accuracy"]
        dt = time.time() - t
        rate, shown = srd_pointing(arch, world, args.n_point)
        results["models"][arch] = {"accuracy": acc, "srd_pointing_game": rate, "pointing_shown": shown,
                                   **_training_record(arch)}
        print(f"{arch:<12} {acc:>9.4f} {dt:>7.1f}  {shown}")
    if args.out:
        from sae_cafe.artifacts import atomic_write_json

        atomic_write_json(args.out + ".json", results)
        md = markdown(results)
        Path(args.out + ".md").write_text(md)
        print(md)


def _training_record(arch: str) -> dict:
    """The shipped weights' sha256, architecture and training record (from ``sae_cafe/weights/<arch>.json``)."""
    from sae_cafe.artifacts import hash_file

    root = Path(__file__).resolve().parent.parent / "sae_cafe" / "weights"
    meta = json.loads((root / f"{arch}.json").read_text())
    cpu = meta.get("cpu_time_s") or meta.get("train_time_s")
    return {"weights_sha256": hash_file(root / f"{arch}.safetensors"), "architecture": meta.get("architecture"),
            "training_cpu_s": cpu, "recipe": meta.get("recipe")}


DESCRIPTION = {"mini_resnet": "torchvision `ResNet`, BasicBlock", "mini_vgg": "torchvision `VGG`, BN"}


def markdown(results: dict) -> str:
    """The README's world table from a results dict (see ``main``)."""
    lines = [f"| model | accuracy, {results['n']} fresh scenes | SRD pointing game ({results['n_point']} scenes) "
             "| training (CPU) |", "|---|---|---|---|"]
    for arch, r in results["models"].items():
        a = r.get("architecture") or {}
        desc = DESCRIPTION.get(arch) or (f"torchvision `VisionTransformer`, {a.get('image_size')} px, patch "
                                         f"{a.get('patch_size')}, {a.get('num_layers')} layers, width "
                                         f"{a.get('hidden_dim')}" if a else arch)
        cpu = f"{r['training_cpu_s']:.0f} s" if r.get("training_cpu_s") else "—"
        lines.append(f"| `{arch}` ({desc}) | {100 * r['accuracy']:.2f} % | {r['pointing_shown']} | {cpu} |")
    lines.append("")
    lines.append(f"Pointing-game tolerance {results['tolerance_px']:.1f} px (15 px × 64/224); a random pixel hits "
                 f"{results['chance']:.3f}. Scenes: seed {results['seed']}, never trained on.")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
