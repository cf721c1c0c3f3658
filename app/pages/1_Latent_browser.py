"""Latent browser: sortable, searchable latent table and concept cards of a CAFE stage."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from app import components as C  # noqa: E402
from app import data as D  # noqa: E402

COLUMNS = ("latent", "label", "label_confidence", "dissection", "dissection_iou", "agrees", "firing_frequency",
           "image_frequency", "concentration_ierf", "concentration_act", "purity_ierf", "purity_act", "max_activation",
           "n_exemplars")


def table(cafe, dis=None) -> list[dict]:
    """One row per latent; with ``dis`` (:class:`app.dissection.DissectionLabels`) also its primary dissection
    concept, best IoU and whether it agrees with the stage's own label ("yes" / "no", None when either is
    missing)."""
    from app.dissection import agree

    labels = cafe.concept_labels
    rows = []
    for r in cafe.latent_rows:
        s = int(r["latent"])
        lab = labels.get(s)
        if lab is not None:
            r = {**r, "label": lab.name or None, "label_confidence": round(lab.confidence, 3) if lab.name else None}
        if dis is not None:
            d, a = dis.label(s), agree(lab, dis.label(s))
            r = {**r, "dissection": d.name or None if d is not None else None,
                 "dissection_iou": round(float(dis.best_iou[dis.primary][s]), 4),
                 "agrees": None if a is None else ("yes" if a else "no")}
        row = {k: r.get(k) for k in COLUMNS if k in r}
        if r.get("pushes"):
            row["pushes"] = ", ".join(str(p["class"]) for p in r["pushes"])
        rows.append(row)
    return rows


def matches(rows: list[dict], q: str, labels: dict, dissection: dict | None = None) -> list[dict]:
    """Rows whose latent id, pushed classes, concept label or dissection label (``dissection``: {latent:
    ConceptLabel}) match ``q`` ("latents labelled stripes", "red", "background:";
    :func:`sae_cafe.concepts.search_labels`), label hits first by confidence, then dissection hits by IoU."""
    from sae_cafe.concepts import search_labels

    q = q.strip().lower()
    if not q:
        return list(rows)
    by_label = search_labels(labels, q) if labels else []
    by_label += [s for s in (search_labels(dissection, q) if dissection else []) if s not in by_label]
    rank = {s: i for i, s in enumerate(by_label)}
    hit = [r for r in rows if q == str(r["latent"]) or q in str(r.get("pushes", "")).lower() or r["latent"] in rank]
    return sorted(hit, key=lambda r: rank.get(r["latent"], len(rank)))


def _key(v, desc: bool):
    if isinstance(v, str):
        return v if not desc else "".join(chr(0x10FFFF - ord(ch)) for ch in v)
    return -(v or 0) if desc else (v or 0)


ctx = C.page_setup("Latent browser")
stage = C.pick_stage(ctx, "cafe", "CAFE stage (model/layer)", "lb_stage") if ctx and ctx.run else None
if stage is not None:
    try:
        cafe = D.cafe(stage)
        dis, dis_msg, dis_warn = C.stage_dissection(ctx, stage, cafe)
        rows = table(cafe, dis)
    except C.ERRORS as e:
        C.show_error(e, f"read the CAFE stage {stage.name}")
        rows = None
    if rows is not None:
        has_purity = any(r.get("purity_ierf") is not None for r in rows)
        has_labels = bool(cafe.concept_labels)
        n_dis = 0 if dis is None else sum(lab.labelled for lab in dis.labels[dis.primary].values())
        st.caption(f"{cafe!r}" + ("" if has_purity else " · purity: n/a (no ground truth for these images)")
                   + ("" if has_labels else " · labels: none (stage built without attribute maps, or before "
                      "labels existed: rebuild it; label a user's images with `sae-cafe dissect` or a labeller)")
                   + ("" if dis is None else f" · dissection: {n_dis} of {dis.n_latents} latents labelled (IoU ≥ "
                      f"{dis.meta.get('iou_min')})"))
        if dis_msg and dis_warn:  # the hint how to make dissection labels is on the card
            st.warning(dis_msg)
        q = st.text_input("search (latent id, a class it pushes, or a label or dissection concept: 'latents labelled "
                          "stripes', 'red', 'background:')", key="lb_search").strip().lower()
        shown = matches(rows, q, cafe.concept_labels, None if dis is None else dis.labels[dis.primary])
        if dis is not None:
            min_iou = st.number_input("dissection IoU at least", min_value=0.0, max_value=1.0, value=0.0, step=0.01,
                                      format="%.3f", key="lb_min_iou")
            if min_iou > 0:
                shown = [r for r in shown if r["dissection_iou"] >= min_iou]
        cols = [c for c in COLUMNS if c in rows[0]]
        sort = st.selectbox("sort by", cols, index=cols.index("firing_frequency"), key="lb_sort")
        desc = st.toggle("descending", value=True, key="lb_desc")
        if not q or sort != "firing_frequency":  # a label search keeps its confidence order unless re-sorted
            shown.sort(key=lambda r: (r.get(sort) is None, _key(r.get(sort), desc)))
        event = st.dataframe(shown, hide_index=True, key="lb_table", on_select="rerun", selection_mode="single-row",
                             height=320)
        picked = event.selection.rows if event is not None and hasattr(event, "selection") else []
        sel = shown[picked[0]]["latent"] if picked and picked[0] < len(shown) else None
        if sel is not None and st.session_state.get("lb_last_pick") != sel:
            st.session_state["lb_latent"] = int(sel)
            st.session_state["lb_last_pick"] = sel
        if "lb_latent" not in st.session_state:
            st.session_state["lb_latent"] = int(shown[0]["latent"]) if shown else 0
        latent = st.number_input("latent (or select a row)", min_value=0, max_value=cafe.n_latents - 1, step=1,
                                 key="lb_latent")
        if not shown:
            st.info(f"No latent matches {q!r}.")
        C.concept_card(ctx, stage, int(latent), key="lb_card")
