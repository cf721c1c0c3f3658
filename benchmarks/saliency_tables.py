"""Render `sae-cafe benchmark-saliency` results as the README's markdown tables, one per model and metric
definition set (``table_source.csv`` and ``table_paper.csv``, docs/metrics.md; a stage written before the
definition sets has only ``table.csv``, rendered as "definitions not recorded").

    .venv/bin/python benchmarks/saliency_tables.py indexes/bench_saliency500/saliency mini_resnet mini_vgg mini_vit

Mean ± s.e. per metric; **bold** = best in the column at the shown precision; "(n=…)" where a method was
scored on fewer images than the column's usual count; methods that do not apply show their "n/a (reason)".
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

NAMES = {"srd": "SRD (contrastive)", "srd_none": "SRD (no contrast)", "saliency": "Gradient (Saliency)",
         "input_x_gradient": "Gradient×Input", "integrated_gradients": "Integrated Gradients (32)",
         "smoothgrad": "SmoothGrad", "guided_backprop": "Guided Backprop", "deeplift": "DeepLift",
         "gradcam": "Grad-CAM", "gradcam_pp": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "Layer-CAM",
         "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM", "fullgrad": "FullGrad",
         "lrp_epsilon_plus": "LRP ε+ (zennit)", "rise": "RISE", "attention_rollout": "Attention rollout",
         "chefer2021": "Chefer et al. 2021", "attnlrp": "AttnLRP (lxt)"}
DEFINITIONS = ("source", "paper")
# (column, header, higher is better, decimals)
METRICS = [("pointing", "Poi ↑", True, 2), ("localisation", "Att ↑", True, 3), ("sparseness", "Spa ↑", True, 3),
           ("fidelity", "Fid ↑", True, 3), ("stability", "Sta ↓", False, 3), ("insertion", "Ins ↑", True, 3),
           ("deletion", "Del ↓", False, 3)]


def _float(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return None if f != f else f


def tables(stage: Path) -> list[tuple[str, Path]]:
    """[(label, table csv)] of a model's stage: each definition set it holds, else its table.csv."""
    found = [(f"{d} definitions", stage / f"table_{d}.csv") for d in DEFINITIONS
             if (stage / f"table_{d}.csv").is_file()]
    if found:
        return found
    table = stage / "table.csv"
    if not table.is_file():
        sys.exit(f"{table} not found: run `sae-cafe benchmark-saliency --model {stage.name} --run <run>` first, "
                 "or pass the saliency folder of that run")
    recorded = {r.get("definitions") for r in csv.DictReader(table.open())} - {None, ""}
    return [(f"{recorded.pop()} definitions" if len(recorded) == 1 else "definitions not recorded", table)]


def render(table_csv: Path) -> str:
    rows = list(csv.DictReader(table_csv.open()))
    order = {m: i for i, m in enumerate(NAMES)}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["| method | " + " | ".join(h for _, h, _, _ in METRICS) + " | s/img |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    best, usual = {}, {}
    for key, _, higher, dec in METRICS:
        vals = [round(v, dec) for r in ok if (v := _float(r[f"{key}_mean"])) is not None]
        best[key] = (max(vals) if higher else min(vals)) if vals else None
        counts = Counter(r[f"{key}_n"] for r in ok if _float(r[f"{key}_mean"]) is not None)
        usual[key] = counts.most_common(1)[0][0] if counts else None
    for r in rows:
        name = NAMES.get(r["method"], r["method"])
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} |" + " |" * len(METRICS))
            continue
        cells = []
        for key, _, _, dec in METRICS:
            mean, se = _float(r[f"{key}_mean"]), _float(r[f"{key}_se"])
            if mean is None:
                cells.append("—")
                continue
            text = f"{mean:.{dec}f} ± {se or 0:.{dec}f}"
            if round(mean, dec) == best[key]:
                text = f"**{text}**"
            if r[f"{key}_n"] != usual[key]:
                text += f" (n={r[f'{key}_n']})"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {float(r['sec_per_image']):.3f} |")
    return "\n".join(lines)


ATTACK_NAMES = NAMES | {"integrated_gradients": "IG", "lrp_epsilon_plus": "LRP ε+"}


def render_attack(rows_by_model: dict[str, list[dict]]) -> str:
    """One markdown table of the manipulation attack (``attack.csv``) of every model: before → after."""
    lines = ["| model | method | SSIM→target before → after | PCC→target before → after | MSE→target after | "
             "SSIM→orig after | PCC→orig after | max Δp | same class | s/pair |", "|---|" + "---|" * 9]
    for model, rows in rows_by_model.items():
        for r in rows:
            name = ATTACK_NAMES.get(r["method"], r["method"])
            if r["status"] != "ok":
                if "not differentiable" not in r["status"]:
                    lines.append(f"| {model} | {name} | {r['status']} |" + " |" * 7)
                continue
            f = {k: _float(v) for k, v in r.items() if k not in ("method", "status")}
            lines.append(
                f"| {model} | {name} | {f['ssim_orig_to_target_mean']:.3f} → {f['ssim_to_target_mean']:.3f} ± "
                f"{f['ssim_to_target_se']:.3f} | {f['pearson_orig_to_target_mean']:.3f} → "
                f"{f['pearson_to_target_mean']:.3f} ± {f['pearson_to_target_se']:.3f} | "
                f"{f['mse_to_target_mean']:.4f} | "
                f"{f['ssim_to_orig_mean']:.3f} ± {f['ssim_to_orig_se']:.3f} | {f['pearson_to_orig_mean']:.3f} ± "
                f"{f['pearson_to_orig_se']:.3f} | {f['max_prob_change_mean']:.3f} | {f['same_class_mean']:.2f} | "
                f"{f['sec_per_pair']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: saliency_tables.py SALIENCY_DIR MODEL [MODEL ...]  (e.g. indexes/<run>/saliency mini_resnet)")
    root = Path(sys.argv[1])
    for model in sys.argv[2:]:
        for label, table in tables(root / model):
            print(f"\n{model}, {label}:\n\n{render(table)}")
    attacks = {m: list(csv.DictReader((root / m / "attack.csv").open())) for m in sys.argv[2:]
               if (root / m / "attack.csv").is_file()}
    if attacks:
        print(f"\nmanipulation attack ({', '.join(attacks)}):\n\n{render_attack(attacks)}")


if __name__ == "__main__":
    main()
