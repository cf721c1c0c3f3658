"""Which evidence labels SAE latents best? Label accuracy against counterfactual ground truth.

For the mini ResNet and the mini ViT, two layers each: small SAEs (the project's trainer, sae-lens BatchTopK,
trained here on the demo-size world — 400 scenes of world seed 0 — or reused from
``indexes/concept_labels/saes/`` when the model's weights are unchanged); a random sample of latents that fire
in both scene sets; per latent its top-k exemplars (one position per image)

* on **held-out** scenes (another world seed): the counterfactual ground truth
  (:mod:`sae_cafe.concepts.counterfactual`, no evidence map);
* on the **labelling** scenes (world seed 0, what the atlas is built on): four evidence maps per exemplar
  (:mod:`sae_cafe.concepts.evidence`: SRD iERF, upsampled activation map, input gradient, optimised soft
  insertion mask) and the label each gives through the shipped labeller ``sae_cafe.concepts.label_latent``.

Columns: accuracy (label (attribute, value) = ground truth, either member of a pair), attribute accuracy,
reliability (accuracy per raw-confidence bin), the smallest pixel share keeping ≥ 80 % of the activation when
only the pixels ranked highest by the evidence are kept (the rest set to 0 in normalised space = the world's
mean grey), cost per exemplar (evidence computation only, seconds, this machine's CPU, one thread).
Also fits ``sae_cafe/concepts/calibration.json`` (accuracy per raw-confidence bin per evidence type; a bin
without samples is merged into its lower neighbour, so the file holds no empty bin).

    nice -n 10 .venv/bin/python benchmarks/bench_concept_labels.py   # both models (~25 min wall, busy 2-core machine)
    nice -n 10 .venv/bin/python benchmarks/bench_concept_labels.py --models mini_vit   # rerun one model

A rerun for some models keeps the other models' rows of the results file and refits the calibration on all.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sae_cafe.concepts import RAW_CONFIDENCE, label_latent  # noqa: E402
from sae_cafe.concepts.counterfactual import (  # noqa: E402
    GroundTruthRule,
    Scenes,
    draw_scenes,
    ground_truth,
    label_correct,
)
from sae_cafe.concepts.evidence import (  # noqa: E402
    EVIDENCE_TYPES,
    FRIConfig,
    LatentProbe,
    evidence_maps,
    recovery_share,
    world_tensor,
)
from sae_cafe.concepts.label import merge_empty_bins  # noqa: E402
from sae_cafe.errors import MismatchError  # noqa: E402
from sae_cafe.world.vocab import BACKGROUNDS, COLOURS, PATTERNS, SHAPES  # noqa: E402

#: control row: a uniform map (the label then follows pixel area); not an evidence type, not calibrated
CONTROL = "uniform"
NAMES = {"ierf": "SRD iERF", "act": "activation map", "gradient": "input gradient", "mask": "optimised mask",
         CONTROL: "uniform map (control)"}
LAYERS = {"mini_resnet": ["layer2", "layer3"], "mini_vit": ["1", "3"]}
#: raw-confidence bins (fixed before the run) of the reliability table and the calibration
EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
VALUE_IDS = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS, "background": BACKGROUNDS}
RESULTS = REPO / "benchmarks" / "results"
CALIBRATION = REPO / "sae_cafe" / "concepts" / "calibration.json"


def _rel(p: Path) -> str:
    p = p.resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def get_sae(adapter, layer: str, x_train: torch.Tensor, root: Path, steps: int) -> tuple[object, dict]:
    """The layer's SAE from ``root`` when it fits the model's weights, else extracted and trained here."""
    from sae_cafe.activations import extract_activations
    from sae_cafe.saes import load_sae
    from sae_training.train import SAETrainConfig, train_sae

    name = adapter.resolve_layer(layer)
    sae_dir = root / "saes" / adapter.name / name
    info_file = sae_dir / "bench_concept_labels.json"
    note = "trained now (no stored SAE)"
    if (sae_dir / "cfg.json").exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        try:
            sae = load_sae(sae_dir, adapter, name)
            if info.get("steps_asked") == steps and info.get("n_images") == len(x_train):
                return sae, {**info, "trained_now": False, "note": "reused (same model weights hash and settings)"}
            note = f"retrained: stored SAE had {info.get('steps_asked')} steps on {info.get('n_images')} images"
        except MismatchError as e:
            note = f"retrained: the stored SAE does not fit ({e})"
    t0 = time.perf_counter()
    dirs = extract_activations(adapter, x_train, [name], out_dirs={name: root / "acts" / adapter.name / name},
                               overwrite=True, dataset="concept world seed 0", progress=False)
    cfg = SAETrainConfig(architecture="batchtopk", expansion=8, steps=steps, seconds=None, batch_size=512,
                         n_checkpoints=0)
    res = train_sae(dirs[name], sae_dir, config=cfg, overwrite=True, resume=False, progress=False)
    sae = load_sae(sae_dir, adapter, name)
    ev = res.get("eval", {})
    info = {"sae": _rel(sae_dir), "train_s": round(time.perf_counter() - t0, 1), "steps_asked": steps,
            "n_images": len(x_train), "config": f"sae-lens batchtopk, expansion 8, {steps} steps, batch 512, "
            f"{len(x_train)} scenes of world seed 0 (sae_training.train_sae)", "steps": res["training"].get("steps"),
            "explained_variance": ev.get("explained_variance"), "l0": ev.get("l0"),
            "dead_fraction": ev.get("dead_fraction"), "weights_hash": adapter.weights_hash}
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    return sae, {**info, "trained_now": True, "note": note}


def top_exemplars(lat: torch.Tensor, latents: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` (image, position) per latent, one position per image: (E,) latent, image, flat position."""
    best, arg = lat[:, :, torch.as_tensor(latents)].max(1)  # (N, L)
    vals, imgs = best.topk(k, dim=0)  # (k, L)
    ex_l = np.repeat(latents[None], k, 0).T.reshape(-1)
    ex_i = imgs.T.reshape(-1).numpy()
    ex_p = arg[imgs, torch.arange(len(latents))[None]].T.reshape(-1).numpy()
    return ex_l, ex_i, ex_p


def eligible(lat: torch.Tensor, k: int) -> torch.Tensor:
    """(S,) bool: latents whose k-th best image (max over positions) still fires."""
    best = lat.max(1).values  # (N, S)
    return best.topk(k, dim=0).values[-1] > 0


def run_layer(adapter, sae, layer: str, lab: Scenes, held: Scenes, x_lab: torch.Tensor, x_held: torch.Tensor,
              args, rule: GroundTruthRule, fri: FRIConfig) -> dict:
    probe = LatentProbe(adapter, sae, layer)
    lat_lab, lat_held = probe.maps(x_lab).cpu(), probe.maps(x_held).cpu()
    ok = (eligible(lat_lab, args.k) & eligible(lat_held, args.k)).nonzero().flatten().numpy()
    rng = np.random.default_rng(args.seed)
    latents = np.sort(rng.choice(ok, size=min(args.latents, len(ok)), replace=False))
    print(f"  {layer}: {lat_lab.shape[-1]} latents, {len(ok)} fire on ≥ {args.k} images of both sets; "
          f"sampled {len(latents)}", flush=True)

    # ground truth on the held-out scenes
    hl, hi, hp = top_exemplars(lat_held, latents, args.k)
    gt = ground_truth(probe.encode_world, held, latents, hl, hi, hp, rule)
    print(f"    ground truth: {gt.n_renders} renders, {gt.seconds:.1f} s; "
          f"{sum(g['unlabeled'] for g in gt.labels)} unlabeled, {sum(bool(g['pair']) for g in gt.labels)} pairs",
          flush=True)

    # evidence on the labelling scenes
    ll, li, lp = top_exemplars(lat_lab, latents, args.k)
    x = x_lab[torch.as_tensor(li)]
    lt, pt = torch.as_tensor(ll), torch.as_tensor(lp)
    per_kind: dict[str, dict] = {}
    for kind in [*args.evidence, CONTROL]:
        if kind == CONTROL:  # a map that says nothing: the label then follows pixel area
            maps, secs, cpu, extra = torch.ones(x.shape[0], *x.shape[-2:]), 0.0, 0.0, {}
            share = torch.full((x.shape[0],), float("nan"))
        else:
            c0 = time.process_time()
            maps, secs, extra = evidence_maps(kind, probe, x, lt, pt, fri)
            cpu = time.process_time() - c0
            share = recovery_share(probe, x, lt, pt, maps)
        rows = []
        for s, g in zip(latents, gt.labels):
            sel = np.flatnonzero(ll == s)
            lab_s = label_latent(maps[sel], lab.maps, images=torch.as_tensor(li[sel]), latent=int(s), evidence=kind)
            value = None if lab_s.value is None else VALUE_IDS[lab_s.attribute][lab_s.value]
            rows.append({"latent": int(s), "label": lab_s.name, "attribute": lab_s.attribute, "value": value,
                         "raw_confidence": round(lab_s.raw_confidence, 4),
                         "correct": label_correct(g, lab_s.attribute, value),
                         "single_gt": None if g["unlabeled"] else not g["pair"],
                         "attribute_correct": label_correct(g, lab_s.attribute, None, match="attribute")})
        fin = torch.isfinite(share)
        per_kind[kind] = {
            "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3), "cost_per_exemplar_s": round(cpu / len(x), 5),
            "wall_per_exemplar_s": round(secs / len(x), 5),
            "recovery_share_median": float(share[fin].median()) if fin.any() else None,
            "recovery_share_mean": float(share[fin].mean()) if fin.any() else None,
            "recovered_fraction": round(float(fin.float().mean()), 4),
            "latents": rows}
        if kind == "mask":
            per_kind[kind]["support_share_median"] = float(extra["support_share"].median())
            per_kind[kind]["support_recovers_fraction"] = round(
                float((extra["recovered"] >= fri.recover).float().mean()), 4)
        print(f"    {kind:8s} {secs:6.1f} s  acc {accuracy(rows):.3f}  "
              f"share80 {per_kind[kind]['recovery_share_median']}", flush=True)
    return {"layer": probe.layer, "layer_id": layer, "n_latents_sae": int(lat_lab.shape[-1]),
            "n_eligible": int(len(ok)), "latents": latents.tolist(), "n_exemplars": int(len(ll)),
            "ground_truth": gt.labels, "gt_seconds": round(gt.seconds, 2), "gt_renders": gt.n_renders,
            "evidence": per_kind}


def accuracy(rows: list[dict], key: str = "correct", single: bool = False) -> float:
    v = [r[key] for r in rows if r[key] is not None and (not single or r.get("single_gt"))]
    return float(np.mean(v)) if v else float("nan")


def bins(rows: list[dict]) -> dict:
    acc, n = [], []
    for i in range(len(EDGES) - 1):
        lo, hi = EDGES[i], EDGES[i + 1]
        inb = [r["correct"] for r in rows if r["correct"] is not None
               and lo <= r["raw_confidence"] and (r["raw_confidence"] < hi or (i == len(EDGES) - 2 and
                                                                                 r["raw_confidence"] <= hi))]
        n.append(len(inb))
        acc.append(round(float(np.mean(inb)), 4) if inb else None)
    return {"edges": list(EDGES), "accuracy": acc, "n": n}


def summarise(doc: dict) -> None:
    """Per evidence type pooled over every model/layer: accuracy and reliability; the calibration file."""
    pooled = {}
    for kind in [*EVIDENCE_TYPES, CONTROL]:
        rows = [r for m in doc["models"].values() for lay in m["layers"]
                for r in lay["evidence"].get(kind, {}).get("latents", [])]
        if rows:
            pooled[kind] = {"accuracy": round(accuracy(rows), 4),
                            "attribute_accuracy": round(accuracy(rows, "attribute_correct"), 4),
                            "single_gt_accuracy": round(accuracy(rows, single=True), 4),
                            "n_single_gt": sum(bool(r.get("single_gt")) for r in rows),
                            "n": sum(r["correct"] is not None for r in rows), "reliability": bins(rows)}
            scored = [r for r in rows if r["correct"] is not None]
            pooled[kind]["label_attributes"] = {a: sum(r["attribute"] == a for r in scored)
                                                for a in ("shape", "colour", "pattern", "background")}
            pooled[kind]["wrong_by_attribute"] = {a: sum(r["attribute"] == a and not r["correct"] for r in scored)
                                                  for a in ("shape", "colour", "pattern", "background")}
            k = sum(bool(r["correct"]) for r in scored)
            pooled[kind]["accuracy_ci95"] = wilson(k, pooled[kind]["n"])
    doc["pooled"] = pooled
    doc["paired_vs_ierf"] = paired_differences(doc)
    best = max((k for k in pooled if k != CONTROL), key=lambda k: pooled[k]["accuracy"])
    doc["best"] = {"evidence": best, "paired_vs_best": paired_differences(doc, best)}


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson interval of a proportion k / n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(c - h), 4), round(float(c + h), 4)]


def paired_differences(doc: dict, base_kind: str = "ierf", n_boot: int = 2000) -> dict:
    """Accuracy of each evidence type minus ``base_kind``'s on the same latents (pooled), with a 95 % paired
    bootstrap interval (resampling latents, seed 0)."""
    def table(kind: str) -> dict:
        return {(m, lay["layer_id"], r["latent"]): r["correct"] for m, v in doc["models"].items()
                for lay in v["layers"] for r in lay["evidence"].get(kind, {}).get("latents", [])
                if r["correct"] is not None}

    base = table(base_kind)
    rng = np.random.default_rng(0)
    out = {}
    for kind in [*EVIDENCE_TYPES, CONTROL]:
        if kind == base_kind:
            continue
        other = table(kind)
        keys = sorted(set(base) & set(other))
        if not keys:
            continue
        d = np.array([float(other[k]) - float(base[k]) for k in keys])
        boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
        out[kind] = {"difference": round(float(d.mean()), 4), "ci95": [round(float(np.quantile(boot, 0.025)), 4),
                                                                      round(float(np.quantile(boot, 0.975)), 4)],
                     "n": len(keys), "ierf_only_correct": int((d < 0).sum()), "only_this_correct": int((d > 0).sum())}
    return out


def calibration_tables(pooled: dict) -> dict:
    """The calibration tables of the pooled reliability bins: every evidence type (not the control) with its
    empty bins merged into their lower neighbour (``merge_empty_bins``: exact, the file then holds no bin without
    samples; the results file keeps the fixed ``EDGES``); a type with no sample in any bin is left out."""
    out = {}
    for k, v in pooled.items():
        r = v["reliability"]
        if k == CONTROL or not any(r["n"]):
            continue
        edges, acc, n = merge_empty_bins(r["edges"], r["accuracy"], r["n"])
        out[k] = {"edges": edges, "accuracy": acc, "n": n}
    return out


def write_calibration(doc: dict) -> None:
    src = (f"benchmarks/bench_concept_labels.py ({doc['created']}): label accuracy against counterfactual "
           f"ground truth per raw-confidence bin, pooled over {', '.join(doc['models'])} × 2 layers "
           f"({', '.join(f'{m}: ' + '/'.join(l['layer_id'] for l in v['layers']) for m, v in doc['models'].items())})"
           "; in-sample (the same latents the accuracy table reports)")
    cal = {"schema": 1, "raw_confidence": RAW_CONFIDENCE, "source": src, "rule": doc["rule"],
           "evidence": calibration_tables(doc["pooled"])}
    CALIBRATION.write_text(json.dumps(cal, indent=1) + "\n")


def statement(doc: dict) -> str:
    """The plain statement of which evidence labels best, generated from the pooled numbers."""
    best, pv = doc["best"]["evidence"], doc["best"]["paired_vs_best"]
    p = doc["pooled"]
    others = [k for k in pv if k != CONTROL]
    clear = [k for k in others if pv[k]["ci95"][1] < 0]
    unclear = [k for k in others if k not in clear]
    txt = (f"**{NAMES[best]} labels best**: {p[best]['accuracy']:.0%} of {p[best]['n']} latents (four layers pooled) "
           "get the counterfactual ground truth's (attribute, value), against " +
           ", ".join(f"{p[k]['accuracy']:.0%} ({NAMES[k]})" for k in others) +
           f" and {p[CONTROL]['accuracy']:.0%} for a uniform map.")
    if clear:
        txt += (" The paired 95 % interval of the difference excludes zero against the " +
                ", ".join(NAMES[k] for k in clear) + ".")
    if unclear:
        txt += (" It does not against the " + ", ".join(NAMES[k] for k in unclear) +
                ": on these latents that is not distinguishable from the best.")
    return txt


def markdown(doc: dict) -> str:
    out = [statement(doc), "",
           "All models and layers pooled (each latent once; 95 % intervals: Wilson for accuracy, paired bootstrap "
           "over latents for the difference to the iERF):", "",
           "| evidence | accuracy | acc. (single-attribute GT) | attribute acc. | accuracy − iERF's | "
           "pixel share for ≥ 80 % (median of layer medians) | CPU time / exemplar (mean of layers) |",
           "|---|---|---|---|---|---|---|"]
    for kind, p in doc["pooled"].items():
        lays = [lay["evidence"][kind] for v in doc["models"].values() for lay in v["layers"]
                if kind in lay["evidence"]]
        meds = [e["recovery_share_median"] for e in lays if e["recovery_share_median"] is not None]
        d = doc.get("paired_vs_ierf", {}).get(kind)
        diff = "—" if d is None else f"{d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        ci = p["accuracy_ci95"]
        share = "—" if kind == CONTROL or not meds else f"{float(np.median(meds)):.1%}"
        cost = "—" if kind == CONTROL else f"{1000 * float(np.mean([e['cost_per_exemplar_s'] for e in lays])):.1f} ms"
        out.append(f"| {NAMES[kind]} | {p['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (n={p['n']}) | "
                   f"{p['single_gt_accuracy']:.2f} (n={p['n_single_gt']}) | {p['attribute_accuracy']:.2f} | {diff} | "
                   f"{share} | {cost} |")
    out += ["", "Where the wrong labels go (pooled; wrong labels by the labelled attribute / all labels with it):", "",
            "| evidence | shape | colour | pattern | background |", "|---|---|---|---|---|"]
    for kind, p in doc["pooled"].items():
        out.append(f"| {NAMES[kind]} | " + " | ".join(
            f"{p['wrong_by_attribute'][a]} / {p['label_attributes'][a]}"
            for a in ("shape", "colour", "pattern", "background")) + " |")
    out += ["", "Per model and layer:", "",
            "| model | layer | evidence | accuracy | acc. (single-attribute GT) | attribute acc. | "
           "pixel share for ≥ 80 % | CPU time / exemplar |", "|---|---|---|---|---|---|---|---|"]
    for m, v in doc["models"].items():
        for lay in v["layers"]:
            for kind, e in lay["evidence"].items():
                sh = e["recovery_share_median"]
                rows = e["latents"]
                cost = "—" if kind == CONTROL else f"{1000 * e['cost_per_exemplar_s']:.1f} ms"
                share = "—" if kind == CONTROL else (
                    f"{'—' if sh is None else f'{sh:.1%}'} ({e['recovered_fraction']:.0%} reach)")
                out.append(f"| {m} | {lay['layer_id']} | {NAMES[kind]} | {accuracy(rows):.2f} | "
                           f"{accuracy(rows, single=True):.2f} | {accuracy(rows, 'attribute_correct'):.2f} | "
                           f"{share} | {cost} |")
    out += ["", "Ground truth per layer (latents sampled; unlabeled = largest drop < min_drop; pair = second "
            "attribute's drop ≥ pair_within × the largest):", "", "| model | layer | sampled | unlabeled | pairs | "
            "single | most common GT attribute |", "|---|---|---|---|---|---|---|"]
    for m, v in doc["models"].items():
        for lay in v["layers"]:
            gts = lay["ground_truth"]
            attrs = [g["attribute"] for g in gts if not g["unlabeled"]]
            common = max(set(attrs), key=attrs.count) if attrs else "—"
            out.append(f"| {m} | {lay['layer_id']} | {len(gts)} | {sum(g['unlabeled'] for g in gts)} | "
                       f"{sum(bool(g['pair']) for g in gts)} | "
                       f"{sum(not g['unlabeled'] and not g['pair'] for g in gts)} | {common} |")
    out += ["", "Reliability (accuracy per raw-confidence bin, all models and layers pooled; n in brackets):", "",
            "| evidence | accuracy | " + " | ".join(f"[{EDGES[i]:g}, {EDGES[i + 1]:g})" for i in range(len(EDGES) - 1))
            + " |", "|---|---|" + "---|" * (len(EDGES) - 1)]
    for kind, p in doc["pooled"].items():
        cells = [("—" if a is None else f"{a:.2f}") + f" ({n})" for a, n in
                 zip(p["reliability"]["accuracy"], p["reliability"]["n"])]
        out.append(f"| {NAMES[kind]} | {p['accuracy']:.2f} (n={p['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    centres = [(EDGES[i] + EDGES[i + 1]) / 2 for i in range(len(EDGES) - 1)]
    for kind, p in doc["pooled"].items():
        acc = [np.nan if a is None else a for a in p["reliability"]["accuracy"]]
        ax[0].plot(centres, acc, "o-" if kind != CONTROL else "x--", label=f"{NAMES[kind]} ({p['accuracy']:.2f})")
    ax[0].set(xlabel="raw confidence (margin-v1), bin centre", ylabel="label accuracy", ylim=(-0.02, 1.02),
              title="Reliability (all layers pooled)")
    ax[0].legend(fontsize=8)
    cols = [f"{m}\n{lay['layer_id']}" for m, v in doc["models"].items() for lay in v["layers"]]
    kinds = [*EVIDENCE_TYPES, CONTROL]
    w = 0.16
    for j, kind in enumerate(kinds):
        acc = [accuracy(lay["evidence"][kind]["latents"]) if kind in lay["evidence"] else np.nan
               for v in doc["models"].values() for lay in v["layers"]]
        ax[1].bar(np.arange(len(cols)) + (j - 2) * w, acc, w, label=NAMES[kind],
                  color="lightgrey" if kind == CONTROL else None)
    ax[1].set_xticks(np.arange(len(cols)), cols, fontsize=8)
    ax[1].legend(fontsize=7, ncol=3, loc="upper center")
    ax[1].set(ylabel="accuracy vs counterfactual ground truth", ylim=(0, 1.2), yticks=np.linspace(0, 1, 6),
              title="Label accuracy per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    ap.add_argument("--evidence", nargs="+", default=list(EVIDENCE_TYPES), choices=list(EVIDENCE_TYPES))
    ap.add_argument("--n-label", type=int, default=400, help="labelling scenes (world seed 0; the SAEs' data)")
    ap.add_argument("--n-heldout", type=int, default=400, help="held-out scenes for the ground truth")
    ap.add_argument("--heldout-seed", type=int, default=20261206)
    ap.add_argument("--latents", type=int, default=32, help="latents sampled per layer")
    ap.add_argument("--k", type=int, default=6, help="top exemplars per latent (one position per image)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fri-steps", type=int, default=30)
    ap.add_argument("--sae-steps", type=int, default=400, help="SAE training steps (when no stored SAE fits)")
    ap.add_argument("--sae-root", default=str(REPO / "indexes" / "concept_labels"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS), help="folder of concept_labels.{json,md,png}")
    ap.add_argument("--no-calibration", action="store_true", help="do not rewrite calibration.json")
    ap.add_argument("--summarise-only", action="store_true",
                    help="recompute the summaries, Markdown, plot and calibration from the results JSON only")
    args = ap.parse_args(argv)
    if args.summarise_only:
        out_json = Path(args.out) / "concept_labels.json"
        doc = json.loads(out_json.read_text())
        summarise(doc)
        return finish(doc, Path(args.out), args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from sae_cafe.models import get_adapter, load_model

    rule = GroundTruthRule()
    fri = FRIConfig(steps=args.fri_steps)
    t_all = time.perf_counter()
    lab = draw_scenes(args.n_label, 0)
    held = draw_scenes(args.n_heldout, args.heldout_seed)
    results = Path(args.out)
    out_json = results / "concept_labels.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"models": {}}
    for m in args.models:
        adapter = get_adapter(load_model(m))
        print(f"{m} (weights {adapter.weights_hash[:12]})", flush=True)
        x_lab, x_held = world_tensor(adapter, lab.images), world_tensor(adapter, held.images)
        layers = []
        for layer in LAYERS[m]:
            sae, sae_info = get_sae(adapter, layer, x_lab, Path(args.sae_root), args.sae_steps)
            sae = sae.float().eval()
            res = run_layer(adapter, sae, layer, lab, held, x_lab, x_held, args, rule, fri)
            res["sae"] = sae_info
            layers.append(res)
        doc["models"][m] = {"weights_hash": adapter.weights_hash, "layers": layers,
                            "seconds": round(time.perf_counter() - t_all, 1),
                            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "command": "benchmarks/bench_concept_labels.py " + " ".join(
                                argv if argv is not None else sys.argv[1:])}
    doc.update({
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "benchmarks/bench_concept_labels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "setup": {"labelling_scenes": f"{args.n_label} of world seed 0", "heldout_scenes":
                  f"{args.n_heldout} of world seed {args.heldout_seed}", "latents_per_layer": args.latents,
                  "exemplars_per_latent": args.k, "latent_sample_seed": args.seed,
                  "eligible": "latents whose k-th best image still fires, in both scene sets",
                  "labeller": "sae_cafe.concepts.label_latent (raw confidence " + RAW_CONFIDENCE + ")",
                  "accuracy": "label (attribute, value) equals the ground truth (either member of a pair); "
                              "latents with an unlabeled ground truth are left out",
                  "recovery_share": "smallest share of pixels (ranked by the evidence) keeping >= 80 % of the "
                                    "activation, the rest set to 0 in normalised space (the world's mean grey); "
                                    "median over exemplars that reach 80 % at all",
                  "cost": "CPU seconds (process time, one thread) of evidence computation per exemplar (no "
                          "labelling, no recovery test); wall_per_exemplar_s is wall time on the shared machine",
                  "fri": fri.to_json(), "reliability_edges": list(EDGES)},
        "rule": rule.to_json()})
    summarise(doc)
    finish(doc, results, args)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 0


def finish(doc: dict, results: Path, args) -> int:
    results.mkdir(parents=True, exist_ok=True)
    (results / "concept_labels.json").write_text(json.dumps(doc, indent=1) + "\n")
    (results / "concept_labels.md").write_text(markdown(doc))
    plot(doc, results / "concept_labels.png")
    if not args.no_calibration:
        write_calibration(doc)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
