"""The claims statement: does each claim of the SRD / CAFE / ICAT paper hold on the concept world, under the
source metric definitions, under the paper protocol, both or neither — with the numbers.

Reads only committed results files:
``benchmarks/results/saliency/<model>/table_source.csv`` and ``table_paper.csv`` (saliency metrics),
``saliency/<model>/attack.csv`` (manipulation), ``cafe.json`` (iERF labels vs activation maps),
``icat/results.json`` and ``icat_vit/results.json`` (ICAT faithfulness). Writes
``benchmarks/results/claims.md`` and ``claims.json`` (rendered into README.md by ``render_readme.py``).

Rules, fixed before looking at the numbers:

* A saliency claim "SRD is best at metric M" holds for a model and definition set when SRD (contrastive) is
  the best method on M, or its gap to the best other method is within 1.96 · √(se_SRD² + se_best²) (not
  significantly worse). Methods scored on fewer images than SRD (e.g. RISE) take part with their own s.e.
* Manipulation robustness holds for a model when the attack raises SRD's SSIM to the target map by less than
  it raises the SSIM of every gradient method attacked (Gradient, Gradient×Input, IG, Grad-CAM); it does not
  depend on the definition set.
* iERF labels beat activation-map labels when both CAFE metrics (a) the activation drop (iERF region −
  activation region) and (c) attribute purity favour the iERF with a sign-test p < 0.05.
* IG is the most faithful ICAT method when its AUC ins − del (zero baseline) is the highest, ties included,
  on every layer pair of the model.

    .venv/bin/python benchmarks/claims.py
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("mini_resnet", "mini_vgg", "mini_vit")
SALIENCY_CLAIMS = [("pointing", True, "SRD localises the target best (pointing game)"),
                   ("localisation", True, "SRD localises the target best (attribution localisation)"),
                   ("sparseness", True, "SRD maps are the sparsest (Gini)"),
                   ("fidelity", True, "SRD is the most faithful (μ-fidelity)"),
                   ("stability", False, "SRD is the most stable under input noise")]
GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "gradcam")


def _rows(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in csv.DictReader(path.open())} if path.is_file() else {}


def _num(r: dict, key: str) -> float | None:
    try:
        v = float(r.get(key, "nan"))
    except ValueError:
        return None
    return None if math.isnan(v) else v


def saliency_claim(rows: dict[str, dict], metric: str, higher: bool) -> dict | None:
    """{holds, srd, best_other, best_method, margin} for one metric of one table, None without SRD."""
    srd = rows.get("srd")
    if not srd or _num(srd, f"{metric}_mean") is None:
        return None
    sign = 1 if higher else -1
    s_mean, s_se = _num(srd, f"{metric}_mean"), _num(srd, f"{metric}_se") or 0.0
    others = [(m, _num(r, f"{metric}_mean"), _num(r, f"{metric}_se") or 0.0) for m, r in rows.items()
              if m not in ("srd", "srd_none") and r.get("status", "ok") == "ok"
              and _num(r, f"{metric}_mean") is not None]
    if not others:
        return None
    best = max(others, key=lambda o: sign * o[1])
    gap = sign * (best[1] - s_mean)  # > 0: the best other method is better than SRD
    margin = 1.96 * math.sqrt(s_se ** 2 + best[2] ** 2)
    return {"holds": gap <= margin, "srd": s_mean, "srd_se": s_se, "best_method": best[0], "best_other": best[1],
            "best_se": best[2], "gap": gap, "margin": margin}


def stale_weights(model: str) -> bool:
    """True when the committed saliency results of ``model`` were made with other weights than the shipped ones."""
    from sae_cafe.artifacts import hash_file
    from sae_cafe.models.mini import weights_path

    manifest = RESULTS / "saliency" / model / "manifest.json"
    if not manifest.is_file() or not weights_path(model).is_file():
        return False
    recorded = json.loads(manifest.read_text()).get("config", {}).get("weights_hash")
    return bool(recorded) and recorded != hash_file(weights_path(model))


def attack_claim(model: str) -> dict | None:
    path = RESULTS / "saliency" / model / "attack.csv"
    if not path.is_file():
        return None
    rows = {r["method"]: r for r in csv.DictReader(path.open())}
    rise = {m: _num(r, "ssim_to_target_mean") - _num(r, "ssim_orig_to_target_mean") for m, r in rows.items()
            if r.get("status", "ok") == "ok" and _num(r, "ssim_to_target_mean") is not None
            and _num(r, "ssim_orig_to_target_mean") is not None}
    srd = rise.get("srd")
    grads = {m: v for m, v in rise.items() if m in GRADIENT_METHODS}
    if srd is None or not grads:
        return None
    return {"holds": all(srd < v for v in grads.values()), "srd_ssim_rise": srd, "gradient_ssim_rise": grads,
            "stale_weights": stale_weights(model)}


def cafe_claim() -> dict[str, dict]:
    path = RESULTS / "cafe.json"
    out = {}
    for r in json.loads(path.read_text()) if path.is_file() else []:
        fa, p = r["faithfulness"], r["purity"]
        a_ok = fa["diff_mean"] > 0 and fa["sign_test"]["p"] < 0.05
        c_ok = bool(p.get("n")) and p["ierf"][0] > p["act"][0] and p["sign_test"]["p"] < 0.05
        out[r["model"]] = {"holds": a_ok and c_ok, "drop_diff": fa["diff_mean"], "drop_p": fa["sign_test"]["p"],
                           "purity_ierf": p["ierf"][0] if p.get("n") else None,
                           "purity_act": p["act"][0] if p.get("n") else None,
                           "purity_p": p["sign_test"]["p"] if p.get("n") else None}
    return out


def icat_claim() -> dict[str, dict]:
    out = {}
    for folder in ("icat", "icat_vit"):
        path = RESULTS / folder / "results.json"
        if not path.is_file():
            continue
        for name, r in json.loads(path.read_text())["models"].items():
            pairs: dict[str, dict[str, float]] = {}
            for row in r.get("protocol", []):
                if row["baseline"] == "zeros" and row["method"] != "random":
                    pairs.setdefault(row["pair"], {})[row["method"]] = row["auc_diff"]
            wins = {p: d["ig"] >= max(d.values()) - 1e-6 for p, d in pairs.items() if "ig" in d}
            out[name] = {"holds": bool(wins) and all(wins.values()), "pairs": len(wins),
                         "ig_best_pairs": sum(wins.values())}
    return out


def verdict(src: bool | None, pap: bool | None) -> str:
    if src is None and pap is None:
        return "not measured"
    if src is None or pap is None:
        return ("holds" if (src or pap) else "does not hold") + " (one definition set measured)"
    return {(True, True): "both", (True, False): "source only", (False, True): "paper protocol only",
            (False, False): "neither"}[(src, pap)]


def main() -> int:
    out: dict = {"saliency": {}, "attack": {}, "cafe": cafe_claim(), "icat": icat_claim()}
    lines = ["| claim | model | holds under | numbers (source; paper) |", "|---|---|---|---|"]
    for metric, higher, text in SALIENCY_CLAIMS:
        for model in MODELS:
            d = RESULTS / "saliency" / model
            src = saliency_claim(_rows(d / "table_source.csv"), metric, higher)
            pap = saliency_claim(_rows(d / "table_paper.csv"), metric, higher)
            out["saliency"].setdefault(metric, {})[model] = {"source": src, "paper": pap}
            if src is None and pap is None:
                continue
            nums = "; ".join("—" if c is None else
                             f"SRD {c['srd']:.3f} vs {c['best_method']} {c['best_other']:.3f}" for c in (src, pap))
            lines.append(f"| {text} | {model} | {verdict(src and src['holds'], pap and pap['holds'])} | {nums} |")
    for model in MODELS:
        a = attack_claim(model)
        out["attack"][model] = a
        if a:
            g = ", ".join(f"{m} {v:+.3f}" for m, v in a["gradient_ssim_rise"].items())
            stale = " (earlier weights, not the shipped ones)" if a["stale_weights"] else ""
            lines.append(f"| SRD resists the manipulation attack better than gradient methods | {model}{stale} | "
                         f"{'holds' if a['holds'] else 'does not hold'} (definition-independent) | SSIM→target rise: "
                         f"SRD {a['srd_ssim_rise']:+.3f}; {g} |")
    for model, c in out["cafe"].items():
        pur = ("—" if c["purity_ierf"] is None
               else f"{c['purity_ierf']:.2f} vs {c['purity_act']:.2f} (p = {c['purity_p']:.2g})")
        lines.append(f"| iERF labels beat activation-map labels (CAFE) | {model} | "
                     f"{'holds' if c['holds'] else 'does not hold'} (definition-independent) | activation drop "
                     f"iERF − act. region {c['drop_diff']:+.3f} (p = {c['drop_p']:.2g}); purity {pur} |")
    for model, c in out["icat"].items():
        lines.append(f"| IG is the most faithful ICAT attribution | {model} | "
                     f"{'holds' if c['holds'] else 'does not hold'} (definition-independent) | IG best on "
                     f"{c['ig_best_pairs']}/{c['pairs']} layer pairs (AUC ins − del, zero baseline) |")
    lines += ["", "Rules fixed before the numbers were read: `benchmarks/claims.py` (docstring). \"source\" and "
              "\"paper protocol\" are the two metric definition sets of docs/metrics.md."]
    (RESULTS / "claims.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    (RESULTS / "claims.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
