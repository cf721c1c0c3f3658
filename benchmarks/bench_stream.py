"""Streamed SAE training vs shards vs separate runs (issue 22).

Mini ViT (shipped weights), blocks 0–2 × two sae-lens architectures (BatchTopK and Standard/ReLU+L1) = 6 SAEs,
the same number of PFVs per SAE in every configuration:

- ``stream``: one ``train_saes_streaming`` run trains all 6 SAEs from one stream of forward passes;
- ``shards``: ``extract_activations`` writes the 3 layers' PFVs to shards (one forward pass), then 6
  ``train_sae`` runs read them;
- ``separate``: 6 streamed runs of one SAE each (6 forward passes over the images).

Each configuration runs in its own process (peak RSS = that process's ``ru_maxrss``; the images and model it
loads first are given as the baseline). Wall and CPU seconds cover extraction + training, not evaluation.
Every SAE is then evaluated on held-out concept-world scenes (explained variance, L0). ViT-B/16 with random
weights (torchvision ``vit_b_16``, blocks 0–1, BatchTopK, activation normalisation off so no norm-estimation
pass) is timed for streamed tokens/s and memory only.

    .venv/bin/python benchmarks/bench_stream.py [--tokens 2000000] [--batch-size 4096] [--expansion 8]

Writes ``benchmarks/results/stream.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
ARCHS = ("batchtopk", "standard")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _current_rss_mb() -> float:
    with open("/proc/self/status") as fd:
        return next(int(x.split()[1]) for x in fd if x.startswith("VmRSS")) / 1024


def _world(n: int, seed: int, adapter):
    from sae_cafe.world.generator import generate
    from sae_cafe.world.train import world_tensor

    return world_tensor(generate(n, seed=seed, size=64).images, adapter.mean, adapter.std)


def _sae_cfg(args, arch: str):
    from sae_training.train import SAETrainConfig

    return SAETrainConfig(architecture=arch, expansion=args.expansion, batch_size=args.batch_size,
                          steps=args.steps, holdout=0.0)


def part_mini(args) -> dict:
    """One configuration of the mini-ViT comparison, in this process."""
    import sae_lens.training.multi_sae_trainer  # noqa: F401 - imported before the baseline in every part

    from sae_cafe.artifacts import stage_path
    from sae_cafe.models import load_model
    from sae_training.evaluate import evaluate_sae
    from sae_training.stream import StreamConfig, StreamSAE, train_saes_streaming
    from sae_training.train import train_sae

    adapter = load_model("mini_vit")
    train_x, eval_x = _world(args.train_images, 11, adapter), _world(args.eval_images, 12, adapter)
    base_rss, cpu0 = _current_rss_mb(), _cpu()
    root = Path(args.root)
    scfg = StreamConfig(steps=args.steps, batch_size=args.batch_size)
    dirs: dict[str, Path] = {}
    extra: dict = {}
    t0 = time.perf_counter()
    if args.part == "stream":
        specs = [StreamSAE(n, _sae_cfg(args, a), None if a == "batchtopk" else a) for n in LAYERS for a in ARCHS]
        res = train_saes_streaming(adapter, train_x, specs, scfg, run="stream", root=root, progress=False)
        dirs = {f"{n}|{a}": Path(res["saes"][n if a == "batchtopk" else f"{n}@{a}"]["sae_dir"])
                for n in LAYERS for a in ARCHS}
        extra = {"forward_seconds": res["training"]["forward_seconds"], "images_seen": res["training"]["images_seen"]}
    elif args.part == "separate":
        fwd = 0.0
        for n in LAYERS:
            for a in ARCHS:
                res = train_saes_streaming(adapter, train_x, [StreamSAE(n, _sae_cfg(args, a))], scfg,
                                           run=f"sep-{a}", root=root, progress=False)
                dirs[f"{n}|{a}"] = Path(res["saes"][n]["sae_dir"])
                fwd += res["training"]["forward_seconds"]
        extra = {"forward_seconds": fwd}
    else:  # shards
        from sae_cafe.activations import extract_activations

        te = time.perf_counter()
        acts = extract_activations(adapter, train_x, LAYERS, run="shards", root=root, progress=False)
        extra["extract_seconds"] = time.perf_counter() - te
        extra["shard_bytes"] = sum(f.stat().st_size for d in acts.values() for f in Path(d).glob("shard_*"))
        for n in LAYERS:
            for a in ARCHS:
                out = stage_path("shards" if a == "batchtopk" else f"shards-{a}", "saes", "mini_vit", n, root=root)
                res = train_sae(acts[n], out, config=_sae_cfg(args, a), evaluate=False, progress=False)
                dirs[f"{n}|{a}"] = Path(res["sae_dir"])
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    peak = _rss_mb()
    saes = {}
    for key, d in dirs.items():
        ev = evaluate_sae(d, model=adapter, images=eval_x, progress=False)
        tr = json.loads((d / "training.json").read_text())
        saes[key] = {"explained_variance": ev["explained_variance"], "l0": ev.get("l0"),
                     "samples": tr.get("samples_per_sae", tr.get("samples")), "d_sae": tr["d_sae"]}
    return {"part": args.part, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak, "baseline_rss_mb": base_rss,
            "saes": saes, **extra}


def part_vitb(args) -> dict:
    """ViT-B/16 (random weights): streamed tokens/s and memory for two blocks' SAEs."""
    import sae_lens.training.multi_sae_trainer  # noqa: F401 - imported before the baseline

    from sae_cafe.models import load_model
    from sae_training.stream import StreamConfig, StreamSAE, train_saes_streaming
    from sae_training.train import SAETrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_model("vit_b_16")  # no weights file: random initialisation (timing only)
    x = torch.randn(args.vitb_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    layers = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    bs = 1024
    steps = max(1, args.vitb_tokens // bs)
    cfg = SAETrainConfig(architecture="batchtopk", expansion=4, normalize="none")
    base_rss, cpu0, t0 = _current_rss_mb(), _cpu(), time.perf_counter()
    res = train_saes_streaming(adapter, x, [StreamSAE(n, cfg) for n in layers],
                               StreamConfig(steps=steps, batch_size=bs, buffer_rows=4 * bs, image_batch_size=16,
                                            n_checkpoints=1),
                               run="vitb", root=Path(args.root), progress=False)
    wall = time.perf_counter() - t0
    tr = res["training"]
    return {"part": "vitb", "layers": layers, "d_in": 768, "d_sae": 3072, "batch_size": bs, "steps": steps,
            "buffer_rows": 4 * bs, "pfvs_per_s": tr["images_seen"] * 196 / wall,
            "tokens_per_sae": steps * bs, "images_seen": tr["images_seen"], "wall_s": wall,
            "cpu_s": _cpu() - cpu0, "forward_seconds": tr["forward_seconds"],
            "tokens_per_s": steps * bs / wall, "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base_rss}


# ----- driver ----------------------------------------------------------------------------------------------
def _run_part(part: str, args, root: Path) -> dict:
    out = root / f"{part}.json"
    cmd = [sys.executable, __file__, "--part", part, "--json", str(out), "--root", str(root / part),
           "--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--expansion", str(args.expansion),
           "--train-images", str(args.train_images), "--eval-images", str(args.eval_images),
           "--vitb-images", str(args.vitb_images), "--vitb-tokens", str(args.vitb_tokens),
           "--threads", str(args.threads)]
    print(f"[{time.strftime('%H:%M:%S')}] {part} …", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    res = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in res.items() if k != "saes"}), flush=True)
    return res


def _md(r: dict) -> str:
    a = r["setup"]
    lines = [f"Mini ViT blocks 0–2 × {{BatchTopK, Standard}} = 6 SAEs (d_in 96, d_sae {a['d_sae']}), "
             f"{a['tokens_per_sae']:,} PFVs per SAE (batch {a['batch_size']}, {a['steps']} steps), "
             f"{a['train_images']} concept-world scenes; {a['threads']} thread(s), load average "
             f"{a['load_before']:.1f} → {a['load_after']:.1f} on a shared 2-core machine.", "",
             "| configuration | wall s | CPU s | peak RSS MB (baseline) | disk MB | mean EV "
             "| EV per SAE (blocks 0 1 2 × BatchTopK, Standard) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in (n for n in ("stream", "shards", "separate") if n in r["mini"]):
        p = r["mini"][name]
        evs = [p["saes"][f"{n}|{x}"]["explained_variance"] for x in ARCHS for n in LAYERS]
        disk = p.get("shard_bytes", 0) / 1e6
        lines.append(f"| {p['label']} | {p['wall_s']:.0f} | {p['cpu_s']:.0f} | {p['peak_rss_mb']:.0f} "
                     f"({p['baseline_rss_mb']:.0f}) | {disk:.0f} | {sum(evs) / len(evs):.3f} | "
                     + " ".join(f"{e:.3f}" for e in evs) + " |")
    d = r["ev_max_abs_diff_stream_vs_shards"]
    lines += ["", f"Largest |EV(stream) − EV(shards)| over the 6 SAEs at equal tokens: {d:.4f}; per architecture:"]
    for x in ARCHS:
        diff = {o: max(abs(r["mini"]["stream"]["saes"][f"{n}|{x}"]["explained_variance"]
                           - r["mini"][o]["saes"][f"{n}|{x}"]["explained_variance"]) for n in LAYERS)
                for o in ("shards", "separate") if o in r["mini"]}
        lines.append(f"{x}: " + ", ".join(f"stream vs {'shards' if o == 'shards' else 'separate streamed runs'} "
                                          f"{v:.4f}" for o, v in diff.items()) + ".")
    for note in r.get("notes", []):
        lines += ["", note]
    if r.get("vitb"):
        v = r["vitb"]
        lines += ["", f"ViT-B/16 (random weights), blocks 0–1, BatchTopK d_sae 3072, {v['tokens_per_sae']:,} "
                  f"tokens per SAE (buffer {v['buffer_rows']} rows, {v['images_seen']} images forwarded): "
                  f"{v['tokens_per_s']:.0f} training tokens/s per SAE, {v['pfvs_per_s']:.0f} PFVs/s produced per "
                  f"layer (wall {v['wall_s']:.0f} s, CPU {v['cpu_s']:.0f} s, forward {v['forward_seconds']:.0f} s "
                  f"wall), peak RSS {v['peak_rss_mb']:.0f} MB "
                  f"(baseline {v['baseline_rss_mb']:.0f} MB)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_000_000, help="PFVs per SAE")
    ap.add_argument("--batch-size", type=int, default=4096, help="PFVs per training step")
    ap.add_argument("--expansion", type=int, default=8, help="d_sae = expansion × 96")
    ap.add_argument("--train-images", type=int, default=4096, help="concept-world training scenes (re-read)")
    ap.add_argument("--eval-images", type=int, default=512, help="held-out scenes for the explained variance")
    ap.add_argument("--vitb-images", type=int, default=32, help="ViT-B/16 images")
    ap.add_argument("--vitb-tokens", type=int, default=4096, help="ViT-B/16 tokens per SAE")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--parts", nargs="+", default=["stream", "shards", "separate", "vitb"])
    ap.add_argument("--render", action="store_true", help="only re-render the .md from the results .json")
    ap.add_argument("--parts-dir", type=Path, default=None,
                    help="reuse the finished parts' <part>.json in this folder instead of rerunning them")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream"), help="results path stem")
    args = ap.parse_args()
    args.steps = math.ceil(args.tokens / args.batch_size)
    torch.set_num_threads(args.threads)
    if args.render:  # rewrite the Markdown from the JSON (e.g. after adding notes to it)
        r = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(_md(r))
        print(_md(r))
        return 0
    if args.part:
        res = part_vitb(args) if args.part == "vitb" else part_mini(args)
        Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    labels = {"stream": "streamed, 6 SAEs in one run", "shards": "shards: extract 3 layers + 6 shard runs",
              "separate": "6 separate streamed runs"}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        mini = {}
        for p in (q for q in args.parts if q != "vitb"):
            done = args.parts_dir / f"{p}.json" if args.parts_dir else None
            res = json.loads(done.read_text()) if done and done.is_file() else _run_part(p, args, Path(tmp))
            mini[p] = {**res, "label": labels[p]}
        vitb = _run_part("vitb", args, Path(tmp)) if "vitb" in args.parts else None
    r = {"setup": {"model": "mini_vit", "layers": LAYERS, "architectures": list(ARCHS), "d_sae": 96 * args.expansion,
                   "batch_size": args.batch_size, "steps": args.steps, "tokens_per_sae": args.steps * args.batch_size,
                   "train_images": args.train_images, "eval_images": args.eval_images, "threads": args.threads,
                   "load_before": load0, "load_after": os.getloadavg()[0],
                   "command": "python benchmarks/bench_stream.py " + " ".join(sys.argv[1:])},
         "mini": mini, "vitb": vitb}
    if "stream" in mini and "shards" in mini:
        r["ev_max_abs_diff_stream_vs_shards"] = max(
            abs(mini["stream"]["saes"][k]["explained_variance"] - mini["shards"]["saes"][k]["explained_variance"])
            for k in mini["stream"]["saes"])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    if {"stream", "shards"} <= set(mini):
        out.with_suffix(".md").write_text(_md(r))
        print(_md(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
