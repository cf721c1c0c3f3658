"""SAE benchmarks (issue 6).

``throughput``: extraction throughput vs the model's bare forward throughput (target ≥ 0.8×), and SAE
training samples/s through our shard provider vs sae-lens ``SAETrainer.fit`` on an in-memory tensor
(target ≥ 0.8×).
``quality``: the "Done when" numbers on the concept world's mini models (one mid layer each): dictionary
8 × d_in, L0 ≤ min(32, d_in / 8): explained variance, dead latents, spliced-in accuracy.

    .venv/bin/python benchmarks/bench_sae.py throughput
    .venv/bin/python benchmarks/bench_sae.py quality [--models mini_resnet mini_vit] [--seconds 240]

Results are printed and written to ``benchmarks/results/sae_<section>.json`` and ``.md`` (the README's table,
rendered into README.md by ``benchmarks/render_readme.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

MID_LAYER = {"mini_resnet": "layer3", "mini_vgg": "features.13", "mini_vit": "encoder.layers.encoder_layer_3"}


def _adapter(name: str):
    """The model to measure. A mini model whose shipped weights are missing (or any model that would run
    with random weights) is an error: a benchmark of a random stand-in would report numbers of the wrong
    model."""
    from sae_cafe.errors import SaeCafeError
    from sae_cafe.models import load_model, mini

    if name in mini.MINI_ARCHS and not mini.weights_path(name).exists():
        raise SaeCafeError(f"{name}: the shipped weights {mini.weights_path(name)} are missing; train them with "
                           f"`sae-cafe train-model --arch {name}` (or reinstall sae-cafe) before benchmarking")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_model(name)
    random = [str(w.message) for w in caught if "no weights file given" in str(w.message)]
    if random:
        raise SaeCafeError(f"{name}: {random[0]}; benchmark a model with weights (the mini models ship theirs)")
    return adapter


def bench_throughput(n_images: int = 512, batch_size: int = 64, model: str = "mini_resnet",
                     steps: int = 200, train_batch: int = 4096, repeats: int = 3) -> dict:
    from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401 - the reference trainer

    from sae_cafe.activations import extract_activations
    from sae_training.data import ShardDataProvider
    from sae_training.train import SAETrainConfig, make_trainer, make_training_sae, run_training

    adapter = _adapter(model)
    layer = MID_LAYER.get(adapter.name, "layer3")
    x = torch.randn(n_images, 3, *adapter.input_size, generator=torch.Generator().manual_seed(0))
    adapter.layers()

    def bare_rate() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            for a in range(0, n_images, batch_size):
                adapter.model(x[a:a + batch_size])
            return n_images / (time.perf_counter() - t)

    bare_rate()  # warm-up
    out = {"model": adapter.name, "layer": layer, "n_images": n_images, "repeats": repeats}
    bares, exts = [], {"float16": [], "float32": []}  # float32 last: its shards feed the training bench
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):  # interleaved, median of each: the shared box is noisy
            bares.append(bare_rate())
            for dtype in exts:
                t = time.perf_counter()
                d = extract_activations(adapter, x, layer, root=tmp, run=f"{dtype}{rep}", dtype=dtype,
                                        batch_size=batch_size, progress=False)[layer]
                exts[dtype].append(n_images / (time.perf_counter() - t))
        bare = statistics.median(bares)
        out["bare_forward_img_s"] = bare
        for dtype, v in exts.items():
            out[f"extract_{dtype}_img_s"] = statistics.median(v)
            out[f"extract_{dtype}_ratio"] = statistics.median(v) / bare
        # training: ours (shard provider) vs SAETrainer.fit on an in-memory tensor, same SAE and steps
        from sae_cafe.activations import ShardReader

        reader = ShardReader(d)
        acts = reader[torch.arange(reader.n)].float()
        cfg = SAETrainConfig(architecture="batchtopk", k=max(1, min(32, reader.d_in // 8)), steps=steps,
                             batch_size=train_batch, normalize="none", n_checkpoints=0)
        prov = ShardDataProvider(reader, train_batch, seed=0)
        for _ in range(3):
            next(prov)
        trainer = make_trainer(make_training_sae(cfg, reader.d_in), prov, cfg, steps)
        ours = run_training(trainer, prov, cfg, steps, None, progress=False)["samples_per_second"]

        def in_memory():
            g = torch.Generator().manual_seed(0)
            while True:
                yield acts[torch.randint(0, acts.shape[0], (train_batch,), generator=g)]

        ref_trainer = make_trainer(make_training_sae(cfg, reader.d_in), in_memory(), cfg, steps)
        t = time.perf_counter()
        ref_trainer.fit()
        ref = steps * train_batch / (time.perf_counter() - t)
    out.update({"train_arch": "batchtopk", "train_d_in": reader.d_in, "train_d_sae": 8 * reader.d_in,
                "train_batch": train_batch, "train_steps": steps, "ours_samples_s": ours,
                "saetrainer_in_memory_samples_s": ref, "train_ratio": ours / ref,
                "torch_threads": torch.get_num_threads()})
    return out


def bench_quality(models: list[str], n_train: int = 2000, n_eval: int = 1600, seconds: float | None = None,
                  steps: int = 1200, arch: str = "topk", root: str | None = None) -> dict:
    from sae_cafe.activations import extract_activations
    from sae_cafe.world import generate
    from sae_cafe.world.train import EVAL_SEED_BASE
    from sae_training.train import train_sae

    root = root or tempfile.mkdtemp(prefix="bench_sae_")
    train_world = generate(n_train, EVAL_SEED_BASE + 101)
    eval_world = generate(n_eval, EVAL_SEED_BASE + 202)
    results = {}
    for name in models:
        adapter = _adapter(name)
        if adapter.name != name:
            results[name] = {"skipped": f"{name} not available"}
            continue
        layer = MID_LAYER[name]
        d_in = adapter.layer(layer).channels
        k = max(1, min(32, d_in // 8))
        t = time.perf_counter()
        acts = extract_activations(adapter, list(train_world.images), layer, run="quality", root=root,
                                   batch_size=128, progress=False)[layer]
        t_extract = time.perf_counter() - t
        t = time.perf_counter()
        res = train_sae(acts, architecture=arch, expansion=8, k=k, steps=steps, seconds=seconds,
                        batch_size=2048, holdout=0.0, model=adapter,
                        eval_images=list(eval_world.images), eval_labels=list(eval_world.labels),
                        progress=False)
        ev = res["eval"]
        results[name] = {
            "layer": layer, "d_in": d_in, "d_sae": res["training"]["d_sae"], "k": k, "architecture": arch,
            "train_pfvs": n_train * adapter.layer(layer).grid[0] * adapter.layer(layer).grid[1],
            "extract_seconds": t_extract, "train_seconds": res["training"]["train_seconds"],
            "total_seconds": time.perf_counter() - t, "steps": res["training"]["steps"],
            "explained_variance": ev["explained_variance"], "l0": ev["l0"],
            "dead_fraction": ev["dead_fraction"], "dense_latents": ev["dense_latents"],
            "accuracy": ev["accuracy"], "spliced_accuracy": ev["spliced_accuracy"],
            "accuracy_drop_points": 100 * ev["accuracy_drop"], "logit_kl": ev["logit_kl"],
            "eval_pfvs": ev["n_pfvs"], "sae_dir": res["sae_dir"], "weights_sha256": adapter.weights_hash,
        }
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=["throughput", "quality"])
    p.add_argument("--models", nargs="+", default=["mini_resnet", "mini_vit"])
    p.add_argument("--seconds", type=float, default=None, help="training time budget per SAE")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--arch", default="topk")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a busy shared box)")
    p.add_argument("--out", default="benchmarks/results", help="folder for sae_<section>.json/.md")
    p.add_argument("--keep-others", action="store_true",
                   help="quality: keep the results of models not in --models from the existing sae_quality.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.section == "throughput":
        res = bench_throughput()
    else:
        res = bench_quality(args.models, seconds=args.seconds, steps=args.steps, arch=args.arch)
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    old_file = out / f"sae_{args.section}.json"
    if args.section == "quality" and args.keep_others and old_file.is_file():
        old = json.loads(old_file.read_text())
        res = {name: res.get(name, old.get(name)) for name in [*old, *(m for m in res if m not in old)]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sae_{args.section}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = (markdown_quality if args.section == "quality" else markdown_throughput)(res)
    (out / f"sae_{args.section}.md").write_text(md)
    print(md)


def markdown_quality(res: dict) -> str:
    """The README's SAE quality table."""
    lines = ["| model / layer | d_in → d_sae, k | explained variance | L0 | dead | accuracy → spliced | logit KL "
             "| train |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | | | |")
            continue
        lines.append(f"| {name} `{r['layer']}` | {r['d_in']} → {r['d_sae']}, {r['k']} | {r['explained_variance']:.3f} "
                     f"| {r['l0']:.1f} | {100 * r['dead_fraction']:.1f} % | {100 * r['accuracy']:.2f} % → "
                     f"{100 * r['spliced_accuracy']:.2f} % | {r['logit_kl']:.4f} | {r['train_seconds']:.0f} s |")
    n = {r.get("eval_pfvs") for r in res.values() if "eval_pfvs" in r}
    lines += ["", f"Held-out concept-world images ({', '.join(str(v) for v in sorted(n))} PFVs), SAEs reloaded from "
              "disk, 8 × d_in latents, k = min(32, d_in/8), TopK, 1 thread."]
    return "\n".join(lines) + "\n"


def markdown_throughput(res: dict) -> str:
    """The README's throughput line as a table."""
    rows = [(f"extraction ({k.split('_')[1]}) vs bare forward", v, "≥ 0.8×") for k, v in res.items()
            if k.startswith("extract_") and k.endswith("_ratio")]
    rows += [
             ("training through the shard provider vs sae-lens SAETrainer on an in-memory tensor",
              res.get("train_ratio"), "≥ 0.8×")]
    lines = ["| measure | ratio | target |", "|---|---|---|"]
    lines += [f"| {m} | {v:.2f}× | {t} |" if v is not None else f"| {m} | — | {t} |" for m, v, t in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
