"""ICAT benchmark on the concept world (issue 8): numbers for the README.

1. Interlayer insertion/deletion: for each analysed layer pair (consecutive SAE layers and last → logits),
   ``--images`` held-out images × top-5 targets per image (≥ 200 (image, target) pairs), every method
   (ig, grad, grad_x_input, ablation, random) with the zero and the dataset-mean baseline.
2. Route purity: per class, the share of its dominant-route nodes whose dominant ground-truth attribute
   (shape/colour/pattern/background, from the latent's top exemplars) is one of the class's defining
   attributes (its shape or its colour), vs random routes of the same length (alive latents, 200 per class).
3. PGD (ε = 8/255, 10 steps of 2/255): flip rate over ``--pgd-n`` correctly classified images; for each
   image the clean route (to the true class) vs the adversarial route (to the adversarial prediction):
   divergence layer and Jaccard overlap of route and graph nodes.

SAEs: the run's trained SAEs (``indexes/<run>/saes/<model>/<layer>``) when present, else quick sae-lens
TopK SAEs trained here on the benchmark's own training images (reported in the output). Attribute purity: the
concept-world ground truth scored with CAFE's ``attribute_mass`` on the latents' *activation maps* (CAFE's
own purity uses iERF maps and does not store the dominant attribute, so it is not used here).

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
        act = adapter.capture(x[i:i + batch], [layer], stop_early=True)[layer]
        out.append(adapter.to_pfv(act).pfv.reshape(-1, adapter.to_pfv(act).pfv.shape[-1]))
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
        p = stage_path(args.run, "saes", name, layer, root=args.root)
        if is_finished(p):
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
@torch.no_grad()
def latent_attributes(adapter, sae, layer, x, attr_maps, n_ex=10):
    """Per latent: dominant (attribute, value) of its activation maps over its top exemplar images (picked on
    even ranks) and its purity (mass share on odd ranks), via CAFE's ``attribute_mass``."""
    from sae_cafe.cafe.metrics import attribute_mass

    maps, best = [], []
    for i in range(0, len(x), 64):
        b = adapter.to_pfv(adapter.capture(x[i:i + 64], [layer], stop_early=True)[layer])
        a = sae.encode(b.pfv)  # (B, N, S)
        maps.append(a.transpose(1, 2).reshape(a.shape[0], a.shape[2], *b.grid))
        best.append(a.amax(1))
    maps, best = torch.cat(maps), torch.cat(best)  # (N, S, h, w), (N, S)
    S = best.shape[1]
    H = x.shape[-1]
    out = {}
    for s in range(S):
        top = best[:, s].argsort(descending=True)[:n_ex]
        top = top[best[top, s] > 0]
        if len(top) < 2:
            continue
        m = torch.nn.functional.interpolate(maps[top, s][:, None], size=(H, H), mode="bilinear",
                                            align_corners=False)[:, 0]
        shares = attribute_mass(m, top, attr_maps)
        tot = Counter()
        for sh in shares[0::2]:
            tot.update(sh)
        if not tot:
            continue
        key = max(sorted(tot), key=lambda k: tot[k])
        odd = shares[1::2]
        out[s] = {"attr": key[0], "value": ATTR_NAMES[key[0]][key[1]],
                  "purity": float(np.mean([sh.get(key, 0.0) for sh in odd])) if odd else float("nan")}
    return out


def bench_routes(adapter, name, saes, layers, x_eval, y_eval, pred, attr_maps, args, out_dir):
    lat_attr = {layer: latent_attributes(adapter, saes[layer], layer, x_eval, attr_maps) for layer in layers}
    rng = random.Random(0)
    rows, fig_done = [], False
    cfg = GraphConfig(steps=args.steps, top_k=5, max_nodes_per_layer=8)
    for c in range(len(CLASS_NAMES)):
        idx = ((y_eval == c) & (pred == c)).nonzero()[:, 0][:args.per_class]
        if len(idx) == 0:
            continue
        G = build_graph(adapter, saes, x_eval[idx], layers, c, cfg)
        r = dominant_route(G)
        shape, colour = SHAPES[CLASS_PAIRS[c][0]], COLOURS[CLASS_PAIRS[c][1]]

        def names(node, shape=shape, colour=colour):
            layer, k = node.rsplit(":", 1)
            a = lat_attr[layer].get(int(k))
            return a is not None and ((a["attr"] == "shape" and a["value"] == shape)
                                      or (a["attr"] == "colour" and a["value"] == colour))

        nodes = r.nodes[1:]
        share = float(np.mean([names(n) for n in nodes])) if nodes else float("nan")
        rand = []
        for _ in range(200):
            rl = [f"{layer}:{rng.choice(list(lat_attr[layer]))}" for layer in layers[::-1][:len(nodes)]]
            rand.append(np.mean([names(n) for n in rl]) if rl else np.nan)
        all_nodes = [n for n, d in G.nodes(data=True) if d["kind"] == "latent"]
        rows.append({"class": CLASS_NAMES[c], "n_images": len(idx), "route": r.nodes, "route_len": len(nodes),
                     "route_share": share, "random_share": float(np.nanmean(rand)),
                     "graph_share": float(np.mean([names(n) for n in all_nodes])) if all_nodes else float("nan"),
                     "route_attrs": [lat_attr[n.rsplit(':', 1)[0]].get(int(n.rsplit(':', 1)[1])) for n in nodes]})
        write_graph(G, out_dir / "graphs", f"{name}_class_{c}")
        if not fig_done:
            def label(n, d):
                if d["kind"] != "latent":
                    return d.get("label", n)
                a = lat_attr[d["layer"]].get(int(d["latent"]))
                return f"{d['latent']}\n{a['value']}" if a else str(d["latent"])

            graph_figure(G, out_dir / f"{name}_class_graph", r,
                         f"{name}: class {CLASS_NAMES[c]} ({len(idx)} images), dominant route in red", label)
            fig_done = True
    return rows, {k: {str(s): v for s, v in d.items()} for k, d in lat_attr.items()}


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
        out.append("\n| class | images | route nodes naming a class attribute | random routes | graph nodes |")
        out.append("|---|---|---|---|---|")
        for row in r.get("routes", []):
            out.append(f"| {row['class']} | {row['n_images']} | {row['route_share']:.2f} | "
                       f"{row['random_share']:.2f} | {row['graph_share']:.2f} |")
        rs = [row["route_share"] for row in r.get("routes", [])] or [float("nan")]
        rr = [row["random_share"] for row in r.get("routes", [])] or [float("nan")]
        n_empty = sum(row["route_len"] == 0 for row in r.get("routes", []))
        out.append(f"| **mean** | | **{np.nanmean(rs):.2f}** | **{np.nanmean(rr):.2f}** | |")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mini_resnet", "mini_vit"])
    ap.add_argument("--run", default="demo", help="run whose SAEs are used when present")
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
    ap.add_argument("--out", default="benchmarks/results/icat")
    ap.add_argument("--skip", nargs="*", default=[], choices=["protocol", "routes", "pgd", "cases"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wt = generate(args.n_train, seed=EVAL_SEED_BASE + 801)
    we = generate(args.n_eval, seed=EVAL_SEED_BASE + 802)
    attr_maps = {"shape": we.shape_map, "colour": we.colour_map, "pattern": we.pattern_map,
                 "background": we.background_map}
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
        r = {"layers": layers, "weights": str(wfile), "saes": sae_info,
             "accuracy": float((pred == y_eval).float().mean()), "n_eval": len(x_eval)}
        if "protocol" not in args.skip:
            t = time.perf_counter()
            r["protocol"] = bench_protocol(adapter, saes, layers, x_eval[:args.images], means, args)
            r["protocol_seconds"] = time.perf_counter() - t
        if "routes" not in args.skip:
            t = time.perf_counter()
            r["routes"], r["latent_attributes"] = bench_routes(adapter, name, saes, layers, x_eval, y_eval, pred,
                                                               attr_maps, args, out)
            r["routes_seconds"] = time.perf_counter() - t
        if "pgd" not in args.skip:
            t = time.perf_counter()
            r["pgd"] = bench_pgd(adapter, saes, layers, x_eval, y_eval, pred, args)
            r["pgd_seconds"] = time.perf_counter() - t
            log(f"  PGD: {r['pgd']}")
        if "cases" not in args.skip:
            cdir = out / "cases" / name / "cases"
            cdir.mkdir(parents=True, exist_ok=True)
            xc, yc, pc = x_eval[:8], y_eval[:8], pred[:8]
            if bool((pred == y_eval).all()):  # the model makes no mistake here: look for one on fresh scenes
                found = find_misclassified(adapter, args.miss_search)
                if found is not None:
                    xc, yc = torch.cat([xc, found[0]]), torch.cat([yc, found[1]])
                    pc = torch.cat([pc, found[2]])
                r["misclassified_search"] = {"scenes_searched": args.miss_search, "found": found is not None}
            r["cases"] = case_studies(adapter, saes, xc, yc,
                                      ICATConfig(layers=layers, graph=GraphConfig(steps=args.steps)), cdir, pc)
        results["models"][name] = r
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    tables = md_tables(results)
    (out / "tables.md").write_text(tables)
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
