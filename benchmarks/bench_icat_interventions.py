"""ICAT against interventions (issue 22): do IG edge weights predict what ablating the source latent does?

On ``--images`` concept-world scenes (seed ``--seed``), the mini ResNet with its shipped weights and random
sae-lens TopK SAEs on one layer pair (``--source`` → ``--target``):

1. ICAT (IG, zero baseline, ``--steps`` steps) from the source SAE's latents to each image's top-3 target
   latents (the target SAE's encoder pre-activation at its argmax position n*, as ICAT defines it);
2. the top ``--edges`` edges per image by |IG weight| (active source latents only);
3. per edge, the measured change of the target: T(clean) − T(source latent zeroed at every position), with
   ``run_with_saes(..., interventions=[Intervention(source, k, "zero")], return_activations=[target])``
   (error term kept, so only the latent's decoder contribution is removed);
4. the Spearman correlation between IG weight and measured drop over all edges (and the Pearson one).

Prints the numbers and writes ``benchmarks/results/icat_interventions.json`` and ``.md`` (``--out STEM``; the
README's block), with the machine, threads, load before/after, date and command (``result_record.py``).
``--render`` only rewrites ``STEM.md`` from an existing ``STEM.json`` (nothing is measured).

    nice -n 10 .venv/bin/python benchmarks/bench_icat_interventions.py [--out icat_interventions]
    .venv/bin/python benchmarks/bench_icat_interventions.py --render
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_record import Measure, provenance, provenance_line, render_md, stem_path, write_results  # noqa: E402

OUT = "icat_interventions"  # results STEM: benchmarks/results/icat_interventions.{json,md}


def random_topk_sae(d_in: int, d_sae: int, k: int, hook: str, model: str, seed: int):
    """A sae-lens TopK SAE with encoder weights N(0, 1/d_in), zero encoder bias and its default decoder."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hook, model_name=model)))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.b_enc.zero_()
    return sae.eval()


def icat_vs_interventions(n_images: int = 60, edges_per_image: int = 4, source: str = "layer3",
                          target: str = "layer4", d_sae: int = 96, k: int = 8, steps: int = 16, seed: int = 0
                          ) -> dict:
    """The measurement described in the module docstring; returns the numbers and the per-edge table."""
    from scipy.stats import pearsonr, spearmanr

    from sae_cafe.icat.attribute import attribute_pair, prepare_pair, sae_encode_with_pre
    from sae_cafe.interventions import Intervention
    from sae_cafe.models import load_model
    from sae_cafe.saes import run_with_saes
    from sae_cafe.world import generate

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load_model("mini_resnet")
    w = generate(n_images, seed=seed)
    x = ad.preprocess(list(w.images))
    saes = {source: random_topk_sae(ad.layer(source).channels, d_sae, k, source, ad.name, seed + 1),
            target: random_topk_sae(ad.layer(target).channels, d_sae, k, target, ad.name, seed + 2)}
    ctx = prepare_pair(ad, saes, x, source, target)
    res = attribute_pair(ctx, "ig", steps, "zeros", top_k_targets=3)
    active = (ctx.a_BNS > 0).any(1)  # (B, S)
    ig_w, drop, rows = [], [], []
    with torch.no_grad():
        for b in range(n_images):
            sc = res.scores_BSJ[b] * active[b][:, None]  # (S, J)
            flat = sc.abs().flatten().topk(min(edges_per_image, int((sc != 0).sum()))).indices.tolist()
            xb = x[b:b + 1]
            for f in flat:
                s, j = divmod(f, sc.shape[1])
                tj = int(res.targets_BJ[b, j])
                n = int(ctx.n_star_BT[b, tj])
                _, acts = run_with_saes(ad, xb, {source: saes[source]}, check=False,
                                        interventions=[Intervention(source, s, "zero")], return_activations=[target])
                pre = sae_encode_with_pre(saes[target], ad.to_pfv(acts[target]).pfv)[1]
                t_abl = float(pre[0, n, tj])
                t_full = float(ctx.t_full_BT[b, tj])
                ig_w.append(float(sc[s, j]))
                drop.append(t_full - t_abl)
                rows.append({"image": b, "source": s, "target": tj, "ig": ig_w[-1], "drop": drop[-1]})
    rho, p = spearmanr(ig_w, drop)
    r, _ = pearsonr(ig_w, drop)
    sign = sum((a > 0) == (d > 0) for a, d in zip(ig_w, drop)) / len(ig_w)
    return {"model": "mini_resnet (shipped weights)", "layer_pair": [source, target], "n_images": n_images,
            "n_edges": len(ig_w), "edges_per_image": edges_per_image, "sae": f"random TopK d_sae={d_sae} k={k}",
            "ig_steps": steps, "ig_completeness_error": res.completeness_error(), "spearman": float(rho),
            "spearman_p": float(p), "pearson": float(r), "sign_agreement": float(sign),
            "seconds": round(time.perf_counter() - t0, 1), "edges": rows}


def markdown(out: dict) -> str:
    """The README block: the setting, the correlations and how the numbers were measured (when recorded)."""
    src, dst = out["layer_pair"]
    how = (provenance_line(out, f"{out['threads']} torch thread(s)") if "command" in out else
           "Machine, threads, load and command not recorded (file written before they were).")
    return (f"ICAT (IG, {out['ig_steps']} steps, zero baseline) against ablation: {out['model']}, {src} → {dst}, "
            f"{out['sae']} SAEs, {out['n_images']} concept-world images, the top {out['edges_per_image']} edges "
            f"per image by |IG weight|; {out['seconds']} s. {how}\n\n"
            "| edges | Spearman (IG weight vs measured drop) | p | Pearson | sign agreement | IG completeness error |\n"
            "|---:|---:|---:|---:|---:|---:|\n"
            f"| {out['n_edges']} | **{out['spearman']:.3f}** | {out['spearman_p']:.1g} | {out['pearson']:.3f} | "
            f"{out['sign_agreement']:.2f} | {out['ig_completeness_error']:.3f} |\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--edges", type=int, default=4)
    ap.add_argument("--source", default="layer3")
    ap.add_argument("--target", default="layer4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT, help="results STEM (bare name: under benchmarks/results/; a trailing "
                    ".json is dropped)")
    ap.add_argument("--render", action="store_true", help="only rewrite STEM.md from the existing STEM.json")
    a = ap.parse_args()
    stem = stem_path(a.out)
    if a.render:
        print(render_md(stem, markdown))
        return
    torch.set_num_threads(1)
    with Measure() as m:
        out = icat_vs_interventions(a.images, a.edges, a.source, a.target, steps=a.steps, seed=a.seed)
    out = {**out, **provenance(1), **{k: v for k, v in m.record().items() if k != "wall_seconds"}}
    print(f"ICAT (IG) vs ablation on {out['n_images']} images, {out['n_edges']} edges, {a.source}→{a.target}: "
          f"Spearman {out['spearman']:.3f} (p={out['spearman_p']:.2g}), Pearson {out['pearson']:.3f}, sign agreement "
          f"{out['sign_agreement']:.2f}, IG completeness error {out['ig_completeness_error']:.3f}, "
          f"{out['seconds']} s")
    write_results(stem, out, markdown)


if __name__ == "__main__":
    main()
