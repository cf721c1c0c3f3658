"""CAFE benchmark on the concept world: build time, iERFs/s during the build vs SRD saliency maps/s on the
same model, and the CAFE metrics (a) label faithfulness, (b) concentration, (c) attribute purity.

For each (model, layer) — mini ResNet ``layer3`` and mini ViT block 3 — a TopK SAE is trained with the
sae-lens ``SAETrainer`` on PFVs of a training split of the world (quick: a few hundred steps); CAFE is then
built on a held-out split (other seed) with the world's per-pixel attribute maps. Uses the shipped mini
weights when present (``sae_cafe/weights``), else random initialisation (said in the output).

    .venv/bin/python benchmarks/bench_cafe.py [--n-train 400] [--n-eval 200] [--out indexes/bench_cafe]

Writes the stages under ``--out`` and the README's table to ``--results`` (``benchmarks/results/cafe.json`` and
``.md``; rendered into README.md by ``benchmarks/render_readme.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

from sae_cafe.activations import layer_pfv


def train_quick_sae(pfv: torch.Tensor, d_sae: int, k: int, steps: int, batch: int = 512, seed: int = 0):
    """A sae-lens TopK SAE trained by sae-lens's ``SAETrainer`` on in-memory PFVs (N, D)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=pfv.shape[1], d_sae=d_sae, k=k))
    g = torch.Generator().manual_seed(seed)

    def provider():
        while True:
            yield pfv[torch.randint(0, pfv.shape[0], (batch,), generator=g)]

    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=1e-3, lr_end=1e-4,
                           dead_feature_window=200, feature_sampling_window=200, n_batches_for_norm_estimate=10)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = trainer.fit()
    return sae.eval()


def pfvs(adapter, layer: str, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            p = layer_pfv(adapter, x[s:s + batch], layer).pfv
            out.append(p.reshape(-1, p.shape[-1]))
    return torch.cat(out)


def bench_one(arch: str, layer: str, args, out: Path) -> dict:
    from sae_cafe.cafe import build_cafe, concept_card
    from sae_cafe.cafe.metrics import concentration_summary, label_faithfulness, purity_summary
    from sae_cafe.models import load_model, make_adapter
    from sae_cafe.models.mini import MINI_FACTORIES, WORLD_MEAN, WORLD_STD, weights_path
    from sae_cafe.srd import srd_saliency
    from sae_cafe.world import generate

    trained = weights_path(arch).exists()
    if trained:
        adapter = load_model(arch)
    else:
        torch.manual_seed(0)
        adapter = make_adapter(MINI_FACTORIES[arch](), arch, input_size=(64, 64), resize=None, mean=WORLD_MEAN,
                               std=WORLD_STD)
    layer = adapter.resolve_layer(layer)
    train_w, eval_w = generate(args.n_train, seed=100), generate(args.n_eval, seed=200)
    x_train = adapter.preprocess(list(train_w.images))
    x_eval = adapter.preprocess(list(eval_w.images))
    t = time.perf_counter()
    p = pfvs(adapter, layer, x_train)
    D = p.shape[1]
    sae = train_quick_sae(p, d_sae=args.expansion * D, k=args.k_sae, steps=args.sae_steps)
    t_sae = time.perf_counter() - t
    with torch.no_grad():
        z = sae.encode(p[:20000])
        q = p[:20000]
        ev = 1 - (sae.decode(z) - q).pow(2).sum(-1).mean() / (q - q.mean(0)).pow(2).sum(-1).mean()
    # SRD saliency maps/s on the same model and images (batches of 8, like the anchoring calls), timed
    # before and after the build so both rates see the same (shared, noisy) machine
    srd_saliency(adapter, x_eval[:1], 0)
    sal_s = 0.0

    def time_saliency(xs: torch.Tensor) -> float:
        t0 = time.perf_counter()
        srd_saliency(adapter, xs, torch.arange(xs.shape[0]) % 12)
        return time.perf_counter() - t0

    sal_s += time_saliency(x_eval[:8])
    t = time.perf_counter()
    cafe = build_cafe(adapter, sae, layer, x_eval, out_dir=out / "cafe" / arch / layer, k=args.k,
                      n_anchor=args.n_anchor, attributes=eval_w.attribute_maps(), progress=not args.quiet)
    t_build = time.perf_counter() - t
    sal_s += time_saliency(x_eval[8:16])
    sal_per_s = 16 / sal_s
    tm = cafe.manifest["timings"]
    n_anchor_images = int(torch.unique(cafe.exemplars["ex_image"]).numel())
    fa = label_faithfulness(cafe, adapter, sae, x_eval)
    conc = concentration_summary(cafe)
    pur = purity_summary(cafe)
    # three concept cards: most frequent latents that have a purity value
    freq = cafe.latents["firing_frequency"]
    cards = []
    for s in freq.argsort(descending=True).tolist():
        if len(cards) == 3:
            break
        if len(cafe.exemplar_ids(s)) >= 4:
            c = concept_card(cafe, s, images=x_eval, model=adapter, png=out / "cards" / f"{arch}_latent_{s}.png",
                             n=4)
            cards.append(c["png"])
    return {"model": arch, "layer": layer, "trained_weights": trained,
            "weights_sha256": adapter.weights_hash, "d_in": D, "d_sae": int(sae.cfg.d_sae),
            "sae_k": args.k_sae, "sae_steps": args.sae_steps, "sae_train_s": t_sae, "sae_explained_variance": float(ev),
            "n_eval_images": args.n_eval, "build_s": t_build, "mine_s": tm["mine_s"], "anchor_s": tm["anchor_s"],
            "n_ierf": tm["n_ierf"], "ierf_per_s": tm["ierf_per_s"],
            "seeds_per_image": tm["n_ierf"] / max(n_anchor_images, 1), "srd_saliency_maps_per_s": sal_per_s,
            "ierf_vs_saliency": tm["ierf_per_s"] / sal_per_s, "faithfulness": fa, "concentration": conc,
            "purity": pur, "cards": cards, "stage": str(cafe.path)}


def fmt(v) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{v[0]:.3f} ± {v[1]:.3f}"
    return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k-sae", type=int, default=8)
    ap.add_argument("--sae-steps", type=int, default=300)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--n-anchor", type=int, default=16)
    ap.add_argument("--models", default="mini_resnet:layer3,mini_vit:3")
    ap.add_argument("--out", default="indexes/bench_cafe")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--results", default="benchmarks/results/cafe", help="results stem (STEM.json, STEM.md)")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the results of models not in --models from the existing STEM.json (same order)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for item in args.models.split(","):
        arch, layer = item.split(":")
        r = bench_one(arch, layer, args, out)
        results.append(r)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\n== {arch} {r['layer']} ({'trained' if r['trained_weights'] else 'RANDOM'} weights), "
              f"SAE {r['d_in']}→{r['d_sae']} k={r['sae_k']} EV={r['sae_explained_variance']:.3f}")
        print(f"build {r['build_s']:.1f}s (mine {r['mine_s']:.1f}s, anchor {r['anchor_s']:.1f}s); "
              f"{r['n_ierf']} iERFs ({r['seeds_per_image']:.1f} per image) at {r['ierf_per_s']:.2f}/s vs SRD "
              f"saliency {r['srd_saliency_maps_per_s']:.2f}"
              f" maps/s (×{r['ierf_vs_saliency']:.2f})")
        fa, c, p = r["faithfulness"], r["concentration"], r["purity"]
        print(f"(a) faithfulness n={fa['n']}: drop iERF-region {fmt(fa['drop_ierf'])}, act-region "
              f"{fmt(fa['drop_act'])}, paired diff {fa['diff_mean']:.3f} ± {fa['diff_se']:.3f} "
              f"(relative {fa['rel_diff_mean']:.3f} ± {fa['rel_diff_se']:.3f}); sign test "
              f"{fa['sign_test']['n_pos']}+/{fa['sign_test']['n_neg']}- p={fa['sign_test']['p']:.3g}")
        print(f"(b) top-10% mass share n={c['n']}: iERF {fmt(c['ierf'])} vs act {fmt(c['act'])}; sign test "
              f"{c['sign_test']['n_pos']}+/{c['sign_test']['n_neg']}- p={c['sign_test']['p']:.3g}")
        if p.get("n"):
            print(f"(c) attribute purity n={p['n']} latents: iERF {fmt(p['ierf'])} vs act {fmt(p['act'])}; "
                  f"sign test {p['sign_test']['n_pos']}+/{p['sign_test']['n_neg']}- p={p['sign_test']['p']:.3g}")
        print("cards:", *r["cards"])
    print(f"\nresults: {out / 'results.json'}")
    if args.results:
        keep = [{k: v for k, v in r.items() if k not in ("cards", "stage")} for r in results]
        old_file = Path(args.results + ".json")
        if args.keep_others and old_file.is_file():
            new_by_model = {r["model"]: r for r in keep}
            old = json.loads(old_file.read_text())
            keep = [new_by_model.pop(r["model"], r) for r in old] + list(new_by_model.values())
            results = keep
        Path(args.results + ".json").write_text(json.dumps(keep, indent=1) + "\n")
        Path(args.results + ".md").write_text(markdown(results, args))
        print(markdown(results, args))


def _sign(t: dict) -> str:
    return f"sign test {t['n_pos']}+/{t['n_neg']}−, p = {t['p']:.2g}"


def markdown(results: list[dict], args) -> str:
    """The README's CAFE metrics table: one column per (model, layer)."""
    head = [f"{r['model']} `{r['layer']}`" + ("" if r["trained_weights"] else " (random weights)") for r in results]
    rows = {"(a) label faithfulness: activation drop, iERF region − activation region": [],
            "(b) top-10 % mass, iERF vs activation map": [], "(c) attribute purity, iERF vs activation map": [],
            "iERFs/s during the build vs SRD saliency maps/s (iERFs per image)": []}
    for r in results:
        fa, c, p = r["faithfulness"], r["concentration"], r["purity"]
        rows[next(iter(rows))].append(f"{fa['diff_mean']:+.3f} ± {fa['diff_se']:.3f} (relative "
                                      f"{fa['rel_diff_mean']:+.2f}), {_sign(fa['sign_test'])}")
        rows[list(rows)[1]].append(f"{c['ierf'][0]:.3f} vs {c['act'][0]:.3f}, {_sign(c['sign_test'])}")
        rows[list(rows)[2]].append(f"{p['ierf'][0]:.2f} vs {p['act'][0]:.2f} ({p['n']} latents, "
                                   f"{_sign(p['sign_test'])})" if p.get("n") else "—")
        rows[list(rows)[3]].append(f"{r['ierf_vs_saliency']:.2f}× ({r['seeds_per_image']:.1f})")
    lines = ["| metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
    lines += ["", f"{args.n_eval} held-out images (world seed 200), top-{args.k}, {args.n_anchor} anchored "
              f"exemplars per latent; SAEs: sae-lens TopK, {args.expansion} × d_in latents, k = {args.k_sae}, "
              f"{args.sae_steps} steps on {args.n_train} training images (seed 100); `benchmarks/bench_cafe.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
