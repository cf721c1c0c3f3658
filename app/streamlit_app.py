"""sae-cafe viewer: overview of an artifact root (runs, stages). Pages: latents, images, graphs, metrics."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package's parent when run by streamlit

import streamlit as st  # noqa: E402

from app import components as C  # noqa: E402
from app import data as D  # noqa: E402
from sae_cafe.artifacts import STAGE_KINDS  # noqa: E402

ctx = C.page_setup("sae-cafe viewer")
if ctx is not None and ctx.run:
    st.markdown("Explain vision models from pixels to concepts to decisions. Pages: **Latent browser** "
                "(concept cards), **Image explorer** (saliency, latents on an image, query by example), "
                "**Concept graph** (ICAT) and **Metrics**.")
    rows = []
    for kind in STAGE_KINDS:
        for s in ctx.stages(kind):
            try:
                m = D.manifest(s)
                rows.append({"stage": kind, "path": ctx.label(s, kind) if kind != "world" else "world",
                             "created": m.get("created_at"), "version": m.get("package_version")})
            except C.ERRORS as e:
                rows.append({"stage": kind, "path": str(s), "created": f"unreadable: {e}", "version": None})
        for p in D.partial_stages(ctx.root, ctx.run, kind):
            rows.append({"stage": kind, "path": p, "created": "unfinished (rerun its command)", "version": None})
    st.subheader(f"Run `{ctx.run}`")
    if rows:
        st.dataframe(rows, hide_index=True, key="overview")
    else:
        st.info("This run has no finished stage yet.")
    world = ctx.stages("world")
    if world and (world[0] / "examples.png").exists():
        st.image(str(world[0] / "examples.png"), caption="concept world: example scenes (targets outlined)")
    report = D.confine(ctx.root, f"{ctx.run}/demo_report.json")
    if report.exists():
        try:
            rep = D.json_file(report)
            st.subheader("Last `sae-cafe demo` run")
            st.dataframe([{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rep["stages"]],
                         hide_index=True, key="demo_report")
        except C.ERRORS as e:
            C.show_error(e, "read demo_report.json")
    srd = D.confine(ctx.root, f"{ctx.run}/srd")
    for model_dir in sorted(q for q in srd.iterdir() if q.is_dir()) if srd.is_dir() else []:
        try:
            png = D.confine(ctx.root, f"{ctx.run}/srd/{model_dir.name}/maps.png")
        except C.ERRORS as e:
            C.show_error(e, f"show the SRD maps of {model_dir.name}")
            continue
        if png.exists():
            st.image(str(png), caption=f"SRD saliency maps · {model_dir.name}")
