"""ICAT benchmark on the concept world (issue 8): numbers for the README.

1. Interlayer insertion/deletion: for each analysed layer pair (consecutive SAE layers and last → logits),
   ``--images`` held-out images × top-5 targets per image (≥ 200 (image, target) pairs), every method
   (ig, grad, grad_x_input, ablation, random) with the zero and the dataset-mean baseline.
2. Route purity: per class, the share of its dominant-route nodes whose CAFE purity names one of the class's
   defining attributes (its shape or its colour), vs random routes of the same length (one latent with a
   CAFE purity per layer, 200 per class). A CAFE stage (``build_cafe`` with the world's ground-truth maps,
   ``--cafe-k`` exemplars per latent, all anchored to SRD iERFs) is built for every analysed layer on the
   held-out scenes; a latent's purity names the dominant (attribute, value) of its iERF mass over its top
   exemplars (``purity_ierf_attr``/``_value``, read with ``sae_cafe.cafe.metrics.purity_attributes``). The
   activation-map purity of the same stages is reported alongside.
3. PGD (ε = 8/255, 40 steps of 1/255, random start): flip rate over ``--pgd-n`` correctly classified images; for each
   image the clean route (to the true class) vs the adversarial route (to the adversarial prediction):
   divergence layer and Jaccard overlap of route and graph nodes.

SAEs: quick sae-lens TopK SAEs trained here on the benchmark's own training images and saved to
``--out``/saes (``--reuse-saes`` loads them again), or with ``--run NAME`` the run's trained SAEs
(``indexes/<run>/saes/<model>/<layer>``) when present. Case studies: the first correct and the first
misclassified held-out scene (when the model makes no mistake there, the first misclassified one among
``--miss-search`` fresh scenes) and PGD on the correct one; figures under ``--out``/cases/<model>/cases/.

Run: ``.venv/bin/python benchmarks/bench_icat.py`` (writes ``--out``/results.json, tables.md, figures).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from sae_cafe.activations import layer_pfv
from sae_cafe.artifacts import is_finished, stage_path
from sae_cafe.icat import (
    METHODS,
    GraphConfig,
    ICATConfig,
    attribute_pair,
    build_graph,
    case_studies,
    compare_routes,
    dominant_route,
    insertion_deletion,
    latent_means,
    pgd,
    prepare_pair,
    write_graph,
)
from sae_cafe.icat.figures import graph_figure
from sae_cafe.models import load_model
from sae_cafe.models.mini import weights_path
from sae_cafe.world import CLASS_NAMES, COLOURS, SHAPES, generate
from sae_cafe.world.train import EVAL_SEED_BASE, world_tensor
from sae_cafe.world.vocab import BACKGROUNDS, CLASS_PAIRS, PATTERNS

LAYERS = {"mini_resnet": ["layer2", "layer3", "layer4"], "mini_vgg": ["features.9", "features.14", "features.18"],
          # not the last block: its patch tokens never reach the class token that the head reads
          "mini_vit": ["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_3",
                       "encoder.layers.encoder_layer_4"]}
ATTR_NAMES = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS, "background": BACKGROUNDS}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----- SAEs --------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_pfvs(adapter, x, layer, batch=64, max_rows=200_000, seed=0):
    out = []
    for i in range(0, len(x), batch):
        pfv = layer_pfv(adapter, x[i:i + batch], layer).pfv
        out.append(pfv.reshape(-1, pfv.shape[-1]))
    v = torch.cat(out)
    if len(v) > max_rows:
        v = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(seed))[:max_rows]]
    return v


def train_quick_sae(pfv, layer, model_name, steps, out_dir, expansion=8, k=None):
    """A sae-lens TopK SAE on in-memory PFVs with the team's sae-lens trainer wrappers."""
    from sae_cafe.saes import load_sae
    from sae_training.train import SAETrainConfig, finish_trainer, make_trainer, make_training_sae, run_training

    d = pfv.shape[1]
    cfg = SAETrainConfig(architecture="topk", expansion=expansion, k=k or max(4, d // 8), steps=steps,
                         batch_size=1024, lr=1e-3, n_checkpoints=0, dead_feature_window=200,
                         feature_sampling_window=200)
    sae = make_training_sae(cfg, d, {"hook_name": layer, "model_name": model_name})
    gen = torch.Generator().manual_seed(0)

    def provider():
        while True:
            yield pfv[torch.randint(len(pfv), (cfg.batch_size,), generator=gen)]

    prov = provider()
    trainer = make_trainer(sae, prov, cfg, steps)
    hist = run_training(trainer, prov, cfg, steps, None, progress=False)
    finish_trainer(trainer)
    trainer.sae.save_inference_model(str(out_dir))
    last = hist["history"][-1] if hist["history"] else {}
    return load_sae(out_dir), {"steps": steps, "explained_variance": last.get("explained_variance"),
                               "l0": last.get("l0"), "dead": last.get("dead"), "d_sae": expansion * d,
                               "k": cfg.k, "seconds": hist["train_seconds"]}


def get_saes(adapter, name, layers, x_train, args, work: Path):
    from sae_cafe.saes import load_sae

    saes, info = {}, {}
    for layer in layers:
        p = stage_path(args.run, "saes", name, layer, root=args.root) if args.run else None
        if p is not None and is_finished(p):
            saes[layer] = load_sae(p, adapter, layer)
            info[layer] = {"source": str(p), "d_sae": int(saes[layer].cfg.d_sae)}
            continue
        mine = work / "saes" / name / layer
        if args.reuse_saes and (mine / "cfg.json").exists():
            saes[layer] = load_sae(mine, adapter, layer)
            info[layer] = {"source": f"trained earlier by this benchmark ({mine})",
                           "d_sae": int(saes[layer].cfg.d_sae)}
            continue
        t = time.perf_counter()
        pfv = collect_pfvs(adapter, x_train, layer)
        sae, meta = train_quick_sae(pfv, layer, name, args.sae_steps, work / "saes" / name / layer)
        saes[layer] = sae
        info[layer] = {"source": "trained in benchmark (sae-lens topk)", "n_pfv": len(pfv), **meta,
                       "seconds_total": time.perf_counter() - t}
        log(f"  SAE {name}/{layer}: {info[layer]}")
    return saes, info


# ----- 1. insertion / deletion --------------------------------------------------------------------------------
def bench_protocol(adapter, saes, layers, x_eval, means, args):
    rows = []
    pairs = list(zip(layers, layers[1:])) + [(layers[-1], "logits")]
    for src, tgt in pairs:
        ctx = prepare_pair(adapter, saes, x_eval, src, tgt)
        for base_name in ("zeros", "mean"):
            base = "zeros" if base_name == "zeros" else means[src]
            per_pair = {}
            for method in METHODS:
                t = time.perf_counter()
                res = attribute_pair(ctx, method, steps=args.steps, baseline=base, top_k_targets=5,
                                     active_only=True, batch_size=128)
                t_attr = time.perf_counter() - t
                cur = insertion_deletion(ctx, res, batch_size=256)
                s = cur.summary()
                row = {"pair": f"{src}→{tgt}", "baseline": base_name, "method": method, **s,
                       "attr_seconds": t_attr, "protocol_seconds": time.perf_counter() - t - t_attr}
                if method == "ig":
                    row["completeness_error"] = res.completeness_error()
                per_pair[method] = cur.auc_ins_Q - cur.auc_del_Q
                if method != "ig" and len(per_pair[method]) == len(per_pair["ig"]) > 1:
                    d = per_pair["ig"] - per_pair[method]  # paired over the same (image, target) pairs
                    row["ig_minus_this"] = float(d.mean())
                    row["ig_minus_this_se"] = float(d.std() / len(d) ** 0.5)
                rows.append(row)
                log(f"  {src}→{tgt} {base_name:5s} {method:12s} ins {s['auc_ins']:.3f} del {s['auc_del']:.3f} "
                    f"diff {s['auc_diff']:.3f}±{s['auc_diff_se']:.3f} n={s['n_pairs']} ({t_attr:.1f}s)")
    return rows


# ----- 2. route purity ----------------------------------------------------------------------------------------
def build_cafes(adapter, name, saes, layers, x, attrs, args) -> tuple[dict, dict]:
    """CAFE stage per analysed layer on the held-out images ``x`` with their ground-truth maps ``attrs``;
    a finished stage built with the same SAE and images is reused. Returns ({layer: Cafe}, timing info)."""
    from sae_cafe.artifacts import read_manifest
    from sae_cafe.cafe import build_cafe, load_cafe
    from sae_cafe.cafe.build import sae_hash

    cafes, info = {}, {}
    for layer in layers:
        d = Path(args.cafe_dir) / name / layer
        if is_finished(d):
            m = read_manifest(d, "cafe")
            if (m.get("sae_hash") == sae_hash(saes[layer]) and m.get("n_images") == len(x)
                    and m.get("purity_attributes")):
                cafes[layer] = load_cafe(d)
                info[layer] = {"stage": str(d), "reused": True, **m["timings"]}
                continue
            import shutil

            shutil.rmtree(d)
        t = time.perf_counter()
        cafes[layer] = build_cafe(adapter, saes[layer], layer, x, out_dir=d, k=args.cafe_k, n_sample=0,
                                  attributes=attrs, progress=False)
        info[layer] = {"stage": str(d), "reused": False, "seconds": time.perf_counter() - t,
                       **cafes[layer].manifest["timings"]}
        log(f"  CAFE {name}/{layer}: {info[layer]}")
    return cafes, info


def cafe_attributes(cafe, kind: str = "ierf") -> dict[int, dict]:
    """{latent: {attr, value (name), purity}} from CAFE's purity (``kind`` "ierf": CAFE's own, iERF-based;
    "act": the activation-map comparison)."""
    from sae_cafe.cafe.metrics import purity_attributes

    return {s: {"attr": a["attribute"], "value": ATTR_NAMES[a["attribute"]][a["value"]], "purity": a["purity"]}
            for s, a in purity_attributes(cafe, kind).items()}


def class_attribute_test(lat_attr, c):
    """``names(node)``: does the node's CAFE purity name class ``c``'s shape or colour?"""
    shape, colour = SHAPES[CLASS_PAIRS[c][0]], COLOURS[CLASS_PAIRS[c][1]]

    def names(node):
        layer, k = node.rsplit(":", 1)
        a = lat_attr.get(layer, {}).get(int(k))
        return a is not None and ((a["attr"] == "shape" and a["value"] == shape)
                                  or (a["attr"] == "colour" and a["value"] == colour))
    return names


def attr_label(lat_attr):
    def label(n, d):
        if d["kind"] != "latent":
            return d.get("label", n)
        a = lat_attr.get(d["layer"], {}).get(int(d["latent"]))
        return f"{d['latent']}\n{a['value']}" if a else str(d["latent"])
    return label


def bench_routes(adapter, name, saes, layers, x_eval, y_eval, pred, lat_attr, lat_attr_act, args, out_dir):
    rng = random.Random(0)
    rows, fig_done = [], False
    cfg = GraphConfig(steps=args.steps, top_k=5, max_nodes_per_layer=8)
    mean_pur = lambda ns, la: float(np.mean([la[n.rsplit(":", 1)[0]].get(int(n.rsplit(":", 1)[1]), {})  # noqa: E731
                                             .get("purity", 0.0) for n in ns])) if ns else float("nan")
    for c in range(len(CLASS_NAMES)):
        idx = ((y_eval == c) & (pred == c)).nonzero()[:, 0][:args.per_class]
        if len(idx) == 0:
            continue
        G = build_graph(adapter, saes, x_eval[idx], layers, c, cfg)
        r = dominant_route(G)
        names, names_act = class_attribute_test(lat_attr, c), class_attribute_test(lat_attr_act, c)
        nodes = r.nodes[1:]
        share = float(np.mean([names(n) for n in nodes])) if nodes else float("nan")
        rand, rand_pur = [], []
        for _ in range(200):  # random routes: one latent with a CAFE purity per layer, same length
            rl = [f"{layer}:{rng.choice(sorted(lat_attr[layer]))}" for layer in layers[::-1][:len(nodes)]]
            rand.append(np.mean([names(n) for n in rl]) if rl else np.nan)
            rand_pur.append(mean_pur(rl, lat_attr))
        all_nodes = [n for n, d in G.nodes(data=True) if d["kind"] == "latent"]
        rows.append({"class": CLASS_NAMES[c], "n_images": len(idx), "route": r.nodes, "route_len": len(nodes),
                     "route_share": share, "random_share": float(np.nanmean(rand)),
                     "route_share_act": float(np.mean([names_act(n) for n in nodes])) if nodes else float("nan"),
                     "graph_share": float(np.mean([names(n) for n in all_nodes])) if all_nodes else float("nan"),
                     "route_purity": mean_pur(nodes, lat_attr), "random_purity": float(np.nanmean(rand_pur)),
                     "route_attrs": [lat_attr[n.rsplit(':', 1)[0]].get(int(n.rsplit(':', 1)[1])) for n in nodes]})
        write_graph(G, out_dir / "graphs", f"{name}_class_{c}")
        if not fig_done:
            graph_figure(G, out_dir / f"{name}_class_graph", r,
                         f"{name}: class {CLASS_NAMES[c]} ({len(idx)} images), dominant route in red; "
                         "labels: latent id and the attribute its CAFE (iERF) purity names", attr_label(lat_attr))
            fig_done = True
    return rows


# ----- 3. PGD ---------------------------------------------------------------------------------------------------
def bench_pgd(adapter, saes, layers, x_eval, y_eval, pred, args):
    ok = (pred == y_eval).nonzero()[:, 0][:args.pgd_n]
    xs, ys = x_eval[ok], y_eval[ok]
    t = time.perf_counter()
    xa = torch.cat([pgd(adapter, xs[i:i + 50], ys[i:i + 50], eps=8 / 255, step_size=1 / 255, steps=40)
                    for i in range(0, len(xs), 50)])
    with torch.no_grad():
        pa = adapter(xa).argmax(1)
    flipped = pa != ys
    t_attack = time.perf_counter() - t
    cfg = GraphConfig(steps=args.steps, top_k=5, max_nodes_per_layer=8)
    per = []
    for i in flipped.nonzero()[:, 0][:args.route_n].tolist():
        Gc = build_graph(adapter, saes, xs[i:i + 1], layers, int(ys[i]), cfg)
        Ga = build_graph(adapter, saes, xa[i:i + 1], layers, int(pa[i]), cfg)
        per.append(compare_routes(Gc, dominant_route(Gc), Ga, dominant_route(Ga), layers))
    div = Counter(str(p["divergence_layer"]) for p in per)
    gdiv = Counter(str(p["graph_divergence_layer"]) for p in per)
    table = {"n_images": len(xs), "flip_rate": float(flipped.float().mean()), "attack_seconds": t_attack,
             "attack": "PGD L∞ ε=8/255, 40 steps of 1/255, random start", "n_route_pairs": len(per),
             "divergence_layer_counts": dict(div), "graph_divergence_layer_counts": dict(gdiv),
             "route_jaccard": float(np.mean([p["route_jaccard"] for p in per])) if per else None,
             "graph_jaccard": float(np.mean([p["graph_jaccard"] for p in per])) if per else None,
             "graph_jaccard_per_layer": {layer: float(np.mean([p["graph_jaccard_per_layer"][layer] for p in per]))
                                         for layer in layers} if per else {}}
    return table


@torch.no_grad()
def find_misclassified(adapter, n: int, chunk: int = 500):
    """The first misclassified scene among ``n`` fresh held-out scenes: (x, y, pred) of one image, or None."""
    for s in range(0, n, chunk):
        w = generate(chunk, seed=EVAL_SEED_BASE + 900 + s // chunk)
        x = world_tensor(w.images, adapter.mean, adapter.std)
        y = torch.as_tensor(w.labels).long()
        p = adapter(x).argmax(1)
        bad = (p != y).nonzero()[:, 0]
        if len(bad):
            i = int(bad[0])
            return x[i:i + 1], y[i:i + 1], p[i:i + 1]
    return None


def md_tables(results) -> str:
    out = []
    for name, r in results["models"].items():
        if "skipped" in r:
            out.append(f"### {name}\n\nskipped: {r['skipped']}\n")
            continue
        out.append(f"### {name} (weights {Path(r.get('weights', '')).name}, accuracy {r['accuracy']:.3f} on "
                   f"{r['n_eval']} held-out scenes; layers {', '.join(r['layers'])})\n")
        out.append("| pair | baseline | method | AUC ins ↑ | AUC del ↓ | ins − del ↑ | IG − method (paired) | pairs |")
        out.append("|---|---|---|---|---|---|---|---|")
        for row in r.get("protocol", []):
            paired = (f"{row['ig_minus_this']:+.3f} ± {row['ig_minus_this_se']:.3f}" if "ig_minus_this" in row
                      else ("completeness err " + f"{row['completeness_error']:.2%}" if "completeness_error" in row
                            else ""))
            out.append(f"| {row['pair']} | {row['baseline']} | {row['method']} | {row['auc_ins']:.3f} | "
                       f"{row['auc_del']:.3f} | {row['auc_diff']:.3f} ± {row['auc_diff_se']:.3f} | {paired} | "
                       f"{row['n_pairs']} |")
        best: dict[tuple[str, str], list] = {}
        for row in r.get("protocol", []):
            if row["method"] != "random" and row["n_pairs"]:
                best.setdefault((row["pair"], row["baseline"]), []).append(row)
        if best:
            parts = []
            for (pair, base), rows in best.items():
                top = max(x["auc_diff"] for x in rows)
                tied = [x["method"] for x in rows if x["auc_diff"] >= top - 1e-6]
                parts.append(f"{pair} ({base}): **{' = '.join(tied)}**")
            out.append("\nMost faithful method (highest AUC ins − del; ties within 1e-6) per layer pair and "
                       "baseline: " + "; ".join(parts) + ".")
        if r.get("cafe"):
            out.append("\nCAFE stages of the analysed layers (k = "
                       f"{r.get('cafe_k', '?')} exemplars per latent, all anchored; {r['n_eval']} held-out scenes):\n")
            out.append("| layer | latents with a purity | purity iERF (CAFE) | purity act. map | build |")
            out.append("|---|---|---|---|---|")
            for layer, c in r["cafe"].items():
                pi, pa = c.get("purity_ierf") or [float("nan")] * 2, c.get("purity_act") or [float("nan")] * 2
                build = "reused" if c.get("reused") else f"{c.get('seconds', float('nan')):.0f} s"
                out.append(f"| {layer} | {c.get('n_latents_with_attribute')} | {pi[0]:.2f} ± {pi[1]:.2f} | "
                           f"{pa[0]:.2f} ± {pa[1]:.2f} | {build} ({c.get('n_ierf')} iERFs) |")
        out.append("\n| class | images | route nodes whose CAFE purity names a class attribute | random routes | "
                   "graph nodes | same, act.-map purity | route CAFE purity | random CAFE purity |")
        out.append("|---|---|---|---|---|---|---|---|")
        for row in r.get("routes", []):
            out.append(f"| {row['class']} | {row['n_images']} | {row['route_share']:.2f} | "
                       f"{row['random_share']:.2f} | {row['graph_share']:.2f} | {row['route_share_act']:.2f} | "
                       f"{row['route_purity']:.2f} | {row['random_purity']:.2f} |")
        rrows = r.get("routes", [])
        col = lambda k, rows=rrows: np.nanmean([x[k] for x in rows] or [float("nan")])  # noqa: E731
        n_empty = sum(row["route_len"] == 0 for row in r.get("routes", []))
        out.append(f"| **mean** | | **{col('route_share'):.2f}** | **{col('random_share'):.2f}** | "
                   f"{col('graph_share'):.2f} | {col('route_share_act'):.2f} | {col('route_purity'):.2f} | "
                   f"{col('random_purity'):.2f} |")
        if n_empty:
            out.append(f"\n{n_empty} class graph(s) had no positive parent edge (empty route, shown as nan).")
        if "pgd" not in r:
            continue
        p = r["pgd"]
        out.append(f"\nPGD ε=8/255 (40 steps of 1/255): flip rate {p['flip_rate']:.2f} over {p['n_images']} "
                   f"correctly classified images; {p['n_route_pairs']} clean (true class) vs adversarial "
                   f"(adversarial prediction) route pairs:\n")
        out.append("| measure | value |\n|---|---|")
        out.append(f"| first layer where the dominant routes differ | {p['divergence_layer_counts']} |")
        out.append(f"| first layer where graph node Jaccard < 0.5 | {p['graph_divergence_layer_counts']} |")
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        out.append(f"| route node Jaccard (mean) | {fmt(p['route_jaccard'])} |")
        out.append(f"| graph node Jaccard (mean) | {fmt(p['graph_jaccard'])} |")
        for layer, v in p["graph_jaccard_per_layer"].items():
            out.append(f"| graph node Jaccard at {layer} | {v:.3f} |")
        out.append("")
    return "\n".join(out)


SUMMARY_METHODS = ("ig", "ablation", "grad_x_input", "grad", "random")


def _short(layer: str) -> str:
    """``encoder.layers.encoder_layer_3`` → ``block 3`` (torchvision ViT); other layer ids unchanged."""
    return "block " + layer.rsplit("_", 1)[1] if layer.startswith("encoder.layers.encoder_layer_") else layer


def summary_md(results) -> str:
    """The README's compact ICAT tables (``<out>/summary.md``): AUC ins − del per layer pair and method (zero
    baseline; bold = best), and route purity / PGD per model."""
    out = ["| model | layer pair | " + " | ".join(SUMMARY_METHODS) + " |", "|---|---|" + "---|" * len(SUMMARY_METHODS)]
    for name, r in results["models"].items():
        pairs: dict[str, dict[str, float]] = {}
        for row in r.get("protocol", []):
            if row["baseline"] == "zeros":
                pairs.setdefault(row["pair"], {})[row["method"]] = row["auc_diff"]
        for pair, d in pairs.items():
            top = max(v for m, v in d.items() if m != "random")
            cells = [("**%.3f**" if m != "random" and round(d[m], 3) == round(top, 3) else "%.3f") % d[m]
                     if m in d else "—" for m in SUMMARY_METHODS]
            pair = " → ".join(_short(x) for x in pair.split("→"))
            out.append(f"| {name} | {pair} | " + " | ".join(cells) + " |")
    out += ["", "| model | accuracy (held-out) | route purity: dominant routes vs random | classes above random "
            "| PGD flip rate | routes first differ at | route node Jaccard | graph node Jaccard per layer |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        rows = r.get("routes", [])
        share = np.nanmean([x["route_share"] for x in rows]) if rows else float("nan")
        rand = np.nanmean([x["random_share"] for x in rows]) if rows else float("nan")
        above = sum(x["route_share"] > x["random_share"] for x in rows)
        p = r.get("pgd") or {}
        jac = " → ".join(f"{v:.2f}" for v in (p.get("graph_jaccard_per_layer") or {}).values()) or "—"
        rj = p.get("route_jaccard")
        counts = p.get("divergence_layer_counts") or {}
        order = [*r.get("layers", []), "logits"]
        div = ", ".join(f"{'only the logit' if k == 'logits' else _short(k)} {counts[k]}" for k in
                        sorted(counts, key=lambda k: order.index(k) if k in order else len(order))) or "—"
        out.append(f"| {name} | {r.get('accuracy', float('nan')):.3f} ({r.get('n_eval')}) | {share:.2f} vs {rand:.2f} "
                   f"| {above}/{len(rows)} | {p.get('flip_rate', float('nan')):.2f} ({p.get('n_images', 0)} images) "
                   f"| {div} | {'—' if rj is None else f'{rj:.2f}'} | {jac} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mini_resnet", "mini_vit"])
    ap.add_argument("--run", default=None, help="run whose SAEs are used when present (default: the benchmark's "
                    "own SAEs, trained into --out/saes)")
    ap.add_argument("--root", default=None)
    ap.add_argument("--n-train", type=int, default=800, help="images for SAE training / dataset means")
    ap.add_argument("--images", type=int, default=48, help="held-out images for insertion/deletion")
    ap.add_argument("--n-eval", type=int, default=600, help="held-out images for routes and PGD")
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--sae-steps", type=int, default=600)
    ap.add_argument("--pgd-n", type=int, default=100)
    ap.add_argument("--route-n", type=int, default=100, help="flipped images whose routes are compared")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", nargs="*", default=[], help="NAME=l1,l2,l3: analysed layers other than the defaults")
    ap.add_argument("--weights", nargs="*", default=[], help="NAME=PATH: weights other than the shipped ones")
    ap.add_argument("--reuse-saes", action="store_true", help="reuse SAEs this benchmark trained into --out")
    ap.add_argument("--miss-search", type=int, default=10000, help="fresh scenes searched for a misclassified one")
    ap.add_argument("--cafe-dir", default="indexes/bench_icat/cafe", help="CAFE stages of the analysed layers")
    ap.add_argument("--cafe-k", type=int, default=8, help="CAFE exemplars per latent (all anchored)")
    ap.add_argument("--out", default="benchmarks/results/icat")
    ap.add_argument("--skip", nargs="*", default=[], choices=["protocol", "routes", "pgd", "cases"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wt = generate(args.n_train, seed=EVAL_SEED_BASE + 801)
    we = generate(args.n_eval, seed=EVAL_SEED_BASE + 802)
    results = {"machine": "2-core CPU dev box, shared/noisy", "threads": args.threads, "args": vars(args),
               "models": {}}
    if (out / "results.json").exists():  # keep the other models of an earlier run into the same --out
        results["models"] = {k: v for k, v in json.loads((out / "results.json").read_text())["models"].items()
                             if k not in args.models}
    for name in args.models:
        wfile = dict(w.split("=", 1) for w in args.weights).get(name, weights_path(name))
        if not Path(wfile).exists():
            results["models"][name] = {"skipped": f"no weights at {wfile}"}
            log(f"{name}: skipped (no weights)")
            continue
        log(f"== {name} ({wfile})")
        adapter = load_model(name, wfile)
        x_train = world_tensor(wt.images, adapter.mean, adapter.std)
        x_eval = world_tensor(we.images, adapter.mean, adapter.std)
        y_eval = torch.as_tensor(we.labels).long()
        with torch.no_grad():
            pred = torch.cat([adapter(x_eval[i:i + 200]).argmax(1) for i in range(0, len(x_eval), 200)])
        layers = dict((w.split("=", 1)[0], w.split("=", 1)[1].split(",")) for w in args.layers).get(name, LAYERS[name])
        saes, sae_info = get_saes(adapter, name, layers, x_train, args, out)
        means = {layer: latent_means(adapter, saes[layer], x_train[:400], layer) for layer in layers}
        r = {"layers": layers, "weights": str(wfile), "weights_sha256": adapter.weights_hash, "saes": sae_info,
             "cafe_k": args.cafe_k,
             "accuracy": float((pred == y_eval).float().mean()), "n_eval": len(x_eval)}
        lat_attr = lat_attr_act = None
        if "routes" not in args.skip or "cases" not in args.skip:
            t = time.perf_counter()
            cafes, r["cafe"] = build_cafes(adapter, name, saes, layers, x_eval, we.attribute_maps(), args)
            r["cafe_seconds"] = time.perf_counter() - t
            lat_attr = {layer: cafe_attributes(c, "ierf") for layer, c in cafes.items()}
            lat_attr_act = {layer: cafe_attributes(c, "act") for layer, c in cafes.items()}
            from sae_cafe.cafe.metrics import purity_summary

            for layer, c in cafes.items():
                ps = purity_summary(c)
                r["cafe"][layer].update(purity_n=ps["n"], purity_ierf=ps.get("ierf"), purity_act=ps.get("act"),
                                        n_latents_with_attribute=len(lat_attr[layer]))
            r["latent_attributes"] = {layer: {str(k): v for k, v in d.items()} for layer, d in lat_attr.items()}
        if "protocol" not in args.skip:
            t = time.perf_counter()
            r["protocol"] = bench_protocol(adapter, saes, layers, x_eval[:args.images], means, args)
            r["protocol_seconds"] = time.perf_counter() - t
        if "routes" not in args.skip:
            t = time.perf_counter()
            r["routes"] = bench_routes(adapter, name, saes, layers, x_eval, y_eval, pred, lat_attr, lat_attr_act,
                                       args, out)
            r["routes_seconds"] = time.perf_counter() - t
        if "pgd" not in args.skip:
            t = time.perf_counter()
            r["pgd"] = bench_pgd(adapter, saes, layers, x_eval, y_eval, pred, args)
            r["pgd_seconds"] = time.perf_counter() - t
            log(f"  PGD: {r['pgd']}")
        if "cases" not in args.skip:
            cdir = out / "cases" / name / "cases"
            cdir.mkdir(parents=True, exist_ok=True)
            ok = (pred == y_eval).nonzero()[:, 0][:1]
            bad = (pred != y_eval).nonzero()[:, 0][:1]
            xc, yc, pc = x_eval[torch.cat([ok, bad])], y_eval[torch.cat([ok, bad])], pred[torch.cat([ok, bad])]
            if len(bad) == 0:  # the model makes no mistake on the held-out scenes: look for one on fresh scenes
                found = find_misclassified(adapter, args.miss_search)
                if found is not None:
                    xc, yc = torch.cat([xc, found[0]]), torch.cat([yc, found[1]])
                    pc = torch.cat([pc, found[2]])
                r["misclassified_search"] = {"scenes_searched": args.miss_search, "found": found is not None}
            r["cases"] = case_studies(adapter, saes, xc, yc,
                                      ICATConfig(layers=layers, graph=GraphConfig(steps=args.steps)), cdir, pc,
                                      label_fn=attr_label(lat_attr))
        results["models"][name] = r
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    tables = md_tables(results)
    (out / "tables.md").write_text(tables)
    (out / "summary.md").write_text(summary_md(results))
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
