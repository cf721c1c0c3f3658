"""Stage ``saliency/<model>``: the saliency benchmark (SRD against the cheap baselines) on a few dozen
images (``sae_cafe.evaluation``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .dag import Stage


@dataclass(frozen=True)
class SaliencySettings:
    """Saliency benchmark (``sae_cafe.evaluation``) on a few dozen images with the cheap baselines."""

    n: int = 12
    """images (all metrics but μ-fidelity/stability)"""
    n_fidelity: int = 4
    """of which the first N also get μ-fidelity and stability"""
    subsets: int = 32
    """μ-fidelity subsets per image"""
    noise_samples: int = 4
    """stability noise samples"""
    methods: str = "cheap"
    """comma list, 'cheap' or 'all'"""
    metrics: tuple[str, ...] | None = None
    """metrics to compute (None: all)"""
    batch_size: int = 8
    """images per explanation call"""


def stages(ctx) -> list[Stage]:
    out = []
    for m in ctx.cfg.models:
        if m.saliency:
            out.append(Stage(f"saliency/{m.name}", ctx.image_deps(),
                             {**ctx.model_key(m), "saliency": ctx.cfg.saliency, "labels": ctx.cfg.labels,
                              "class_names": ctx.cfg.class_names},
                             lambda m=m: [ctx.stage_dir("saliency", m.name)], lambda notes, m=m: build(ctx, m, notes)))
    return out


def build(ctx, m, notes: list[str]) -> dict[str, Any]:
    from sae_cafe.artifacts import publish_stage
    from sae_cafe.evaluation import BenchmarkConfig, run_saliency_benchmark, write_saliency_benchmark
    from sae_cafe.evaluation.metrics import METRICS

    ad = ctx.adapter(m)
    s = ctx.cfg.saliency
    x, labels, masks, ids = ctx.labelled_images(s.n, ad, notes=notes)
    bcfg = BenchmarkConfig(metrics=tuple(s.metrics) if s.metrics else METRICS, n_fidelity=s.n_fidelity,
                           n_subsets=s.subsets, n_noise=s.noise_samples, batch_size=s.batch_size)
    final = ctx.stage_dir("saliency", m.name)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    res = run_saliency_benchmark(ad, x.to(ctx.device), masks, labels, s.methods, bcfg,
                                 state_dir=tmp / "per_image", image_ids=ids)
    upstream = {"world": ctx.stage_dir("world")} if not ctx.cfg.images else None
    write_saliency_benchmark(res, tmp, {"model": m.name, "weights": m.weights, "n": len(ids),
                                        "methods": s.methods, "demo": True, **ctx.weights_record(m)}, upstream)
    publish_stage(tmp, final)
    ctx.console.print(res.format_table())
    rows = {r["method"]: r for r in res.table()}
    srd = rows.get("srd", {})
    loc = {k: _finite(r.get("localisation_mean")) for k, r in rows.items() if r["status"] == "ok"}
    out = {"methods": len(rows), "ok": sum(r["status"] == "ok" for r in rows.values()),
           "srd_pointing": _round(srd.get("pointing_mean")),
           "srd_localisation": _round(srd.get("localisation_mean")),
           "srd_insertion": _round(srd.get("insertion_mean")),
           "best_localisation": max(((v, k) for k, v in loc.items() if v >= 0), default=(None, None))[1],
           "table": str(final / "table.csv")}
    out["_reasons"] = reasons(out, masks is not None, set(bcfg.metrics), ctx.random_weights(m))
    return out


def reasons(out: dict[str, Any], have_masks: bool, metrics: set[str], random_weights: bool) -> dict[str, str]:
    """Why each NaN / 0 / None metric of the stage summary is what it is."""
    why = {}
    no_mask = "no masks for these images (add <folder>/masks/<stem>.png or <stem>_mask.png)"
    for key, metric in (("srd_pointing", "pointing"), ("srd_localisation", "localisation"),
                        ("srd_insertion", "insertion")):
        v = out.get(key)
        if isinstance(v, (int, float)) and not (math.isnan(v) or v == 0):
            continue
        if metric not in metrics:
            why[key] = f"{metric} not among saliency.metrics"
        elif metric in ("pointing", "localisation") and not have_masks:
            why[key] = f"{metric}: {no_mask}"
        elif metric == "insertion" and v == 0:
            why[key] = ("insertion AUC ≈ 0: the explained class keeps a near-zero probability as pixels are inserted"
                        + (" (the model runs with random weights)" if random_weights else ""))
        else:
            why[key] = f"{metric}: SRD not scored (see the method's status in the table)"
    if out.get("best_localisation") is None:
        why["best_localisation"] = no_mask if not have_masks else "no method has a finite localisation score"
    return why


def _finite(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v == v and abs(v) != float("inf") else -1.0


def _round(v: Any, nd: int = 3) -> Any:
    return round(float(v), nd) if isinstance(v, (int, float)) and v is not None else v
