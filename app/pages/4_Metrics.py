"""Metrics: SAE training/evaluation metrics, CAFE concentration and purity, saliency benchmark tables and
curves."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from app import components as C  # noqa: E402
from app import data as D  # noqa: E402

SAE_KEYS = ("explained_variance", "l0", "dead_latents", "dead_fraction", "dense_latents", "mse_per_pfv",
            "accuracy", "accuracy_spliced", "logit_kl", "n_pfvs")


def sae_rows(ctx) -> tuple[list[dict], list[tuple[str, Path]]]:
    rows, pngs = [], []
    for s in ctx.stages("saes"):
        name = ctx.label(s, "saes")
        try:
            m = D.manifest(s)
            row = {"sae": name, "architecture": m.get("architecture"), "d_in": m.get("d_in"),
                   "d_sae": m.get("d_sae"), "steps": (m.get("training") or {}).get("steps")}
            ev = s / "eval" / "metrics.json"
            if ev.exists():
                e = D.json_file(ev)
                row.update({k: e[k] for k in SAE_KEYS if k in e and not isinstance(e[k], (list, dict))})
            rows.append(row)
            if (s / "eval" / "firing_frequency.png").exists():
                pngs.append((name, s / "eval" / "firing_frequency.png"))
        except C.ERRORS as e:
            rows.append({"sae": name, "architecture": f"unreadable: {e}"})
    return rows, pngs


def cafe_rows(ctx) -> list[dict]:
    from sae_cafe.cafe.metrics import concentration_summary, purity_summary

    rows = []
    for s in ctx.stages("cafe"):
        name = ctx.label(s, "cafe")
        try:
            cafe = D.cafe(s)
            c, p = concentration_summary(cafe), purity_summary(cafe)
            row = {"cafe": name, "latents": cafe.n_latents, "exemplars": cafe.n_exemplars,
                   "conc. iERF": c["ierf"][0] if c["n"] else None, "conc. act": c["act"][0] if c["n"] else None,
                   "purity iERF": p["ierf"][0] if p.get("n") else None,
                   "purity act": p["act"][0] if p.get("n") else None,
                   "iERF/s": cafe.manifest.get("timings", {}).get("ierf_per_s")}
        except (*C.ERRORS, IndexError, TypeError) as e:
            row = {"cafe": name, "latents": f"unreadable: {e}"}
        rows.append(row)
    return rows


def curves_figure(mean_curves: dict, kind: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, c in mean_curves.items():
        ys = c.get(kind) or []
        if ys:
            fig.add_trace(go.Scatter(x=[i / max(1, len(ys) - 1) for i in range(len(ys))], y=ys, mode="lines",
                                     name=method))
    fig.update_layout(title=kind.replace("_", " "), xaxis_title="fraction of pixels", yaxis_title="score",
                      height=320, margin=dict(l=10, r=10, t=40, b=10))
    return fig


ctx = C.page_setup("Metrics")
if ctx and ctx.run:
    st.header("SAEs")
    rows, pngs = sae_rows(ctx)
    if rows:
        st.dataframe(rows, hide_index=True, key="m_saes")
        if pngs:
            st.image([str(p) for _, p in pngs], caption=[f"firing frequency · {n}" for n, _ in pngs], width=360)
    else:
        st.info(f"No SAE in run `{ctx.run}` (saes/ is empty); train one with `sae-cafe sae train`.")
    st.header("CAFE")
    crow = cafe_rows(ctx)
    if crow:
        st.dataframe(crow, hide_index=True, key="m_cafe")
    else:
        st.info(f"No CAFE stage in run `{ctx.run}`; build one with `sae-cafe build-index`.")
    st.header("Saliency benchmark")
    sal = ctx.stages("saliency")
    if not sal:
        st.info(f"No saliency benchmark in run `{ctx.run}`; run `sae-cafe benchmark-saliency`.")
    for s in sal:
        st.subheader(ctx.label(s, "saliency"))
        try:
            res = D.json_file(s / "results.json")
        except C.ERRORS as e:
            C.show_error(e, f"read the benchmark {s.name}")
            continue
        table = [{"method": r.get("method"), "status": r.get("status"),
                  **{k: v for k, v in r.items() if k not in ("method", "status")}} for r in res.get("table", [])]
        st.dataframe(table, hide_index=True, key=f"m_sal_{s.name}")
        mc = res.get("mean_curves") or {}
        if mc:
            cols = st.columns(2)
            for col, kind in zip(cols, ("insertion_curve", "deletion_curve")):
                col.plotly_chart(curves_figure(mc, kind), key=f"m_curve_{s.name}_{kind}")
        if res.get("not_applicable"):
            st.caption("not applicable: " + "; ".join(f"{k}: {v}" for k, v in res["not_applicable"].items()))
        if (s / "examples.png").exists():
            st.image(str(s / "examples.png"), caption="example maps")
