"""Shared viewer pieces: page setup (root and run selection), messages, concept cards, graph figures."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from sae_cafe.errors import SaeCafeError

from . import data as D

#: errors a damaged or partial artifact can raise while being read; shown as a message, never a traceback
ERRORS = (SaeCafeError, OSError, ValueError, KeyError, RuntimeError)


@dataclass
class Ctx:
    """The page context: resolved artifact root, selected run (None when there is none)."""

    root: Path
    run: str | None

    def stages(self, kind: str) -> list[Path]:
        return D.stages(self.root, self.run, kind) if self.run else []

    def label(self, stage: Path, kind: str) -> str:
        return D.label(stage, self.root, self.run, kind)


def page_setup(title: str, icon: str = "☕") -> Ctx | None:
    """Page config, title and the sidebar run picker. Returns None (after a message) without artifacts."""
    st.set_page_config(page_title=f"sae-cafe · {title}", page_icon=icon, layout="wide")
    st.title(title)
    path = D.root_from_argv(sys.argv[1:])
    try:
        info = D.resolve_root(path)
    except ERRORS as e:
        st.warning(f"No artifacts to show: {e}")
        return None
    st.sidebar.caption(f"artifact root: `{info.root}`")
    if not info.runs:
        st.info(f"No runs under `{info.root}`. Build one, e.g. `sae-cafe make-world --run demo` and the "
                "following stages (see the README), then reload.")
        return Ctx(info.root, None)
    if info.fixed:
        run = info.runs[0]
        st.sidebar.markdown(f"run: **{run}**")
    else:
        default = st.session_state.get("run")
        idx = info.runs.index(default) if default in info.runs else 0
        run = st.sidebar.selectbox("run", info.runs, index=idx, key="run_select")
        st.session_state["run"] = run
    return Ctx(info.root, run)


def pick_stage(ctx: Ctx, kind: str, what: str, key: str) -> Path | None:
    """Sidebar choice among a run's finished stages of ``kind``; a clear message when there are none."""
    found = ctx.stages(kind)
    partial = D.partial_stages(ctx.root, ctx.run, kind) if ctx.run else []
    if partial:
        st.warning(f"Unfinished {kind} stage(s) in run `{ctx.run}`: {', '.join(partial)} — rerun the command "
                   "that builds them (they are not shown).")
    if not found:
        st.info(f"No {what} in run `{ctx.run}` (`{kind}/` has no finished stage). Build it first, e.g. "
                f"`sae-cafe {_HINTS.get(kind, '--help')}`.")
        return None
    labels = [ctx.label(s, kind) for s in found]
    choice = st.sidebar.selectbox(what, labels, key=key)
    return found[labels.index(choice)]


_HINTS = {"world": "make-world", "acts": "extract", "saes": "sae train", "cafe": "build-index",
          "icat": "icat", "saliency": "benchmark-saliency"}


def show_error(e: Exception, what: str) -> None:
    """A caught artifact/user error as a warning (never a traceback)."""
    st.warning(f"Could not {what}: {e}")


# ----- pictures ---------------------------------------------------------------------------------------------
def overlay(img: np.ndarray, heat: np.ndarray, cmap: str = "jet", signed: bool = False) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: ``img`` blended with a colour-mapped heat map (positive part, or signed
    with a diverging map)."""
    import matplotlib

    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    h = np.nan_to_num(heat.astype(np.float32))
    if signed:
        m = np.abs(h).max()
        h = 0.5 + 0.5 * (h / m if m > 0 else h)
        col = matplotlib.colormaps["bwr"](h)[..., :3]
    else:
        h = np.clip(h, 0, None)
        h = h / h.max() if h.max() > 0 else h
        col = matplotlib.colormaps[cmap](h)[..., :3]
    if img.shape[:2] != h.shape:
        from PIL import Image

        img = np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize(h.shape[::-1])) / 255.0
    return np.clip(0.45 * img + 0.55 * col, 0, 1)


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 resized to ``size`` = (H, W) (bilinear)."""
    from PIL import Image

    if img.shape[:2] == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))


def upscale(img: np.ndarray, factor: int = 3) -> np.ndarray:
    """Nearest-neighbour upscaling so small (64 px) images stay crisp in the browser."""
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.repeat(np.repeat(img, factor, 0), factor, 1)


def cafe_image(ctx: Ctx, cafe, image: int) -> np.ndarray | None:
    """The RGB image ``image`` of a CAFE stage's source folder (inside the root, or the image folder the run
    recorded), at the input size; None when it is not readable there."""
    src = cafe.manifest.get("images_source") or cafe.images.get("source")
    if not src:
        return None
    try:
        folder = D.image_folder(ctx.root, src, D.run_image_folders(ctx.root, ctx.run))
        path = D.image_file(folder, cafe.images["names"][image])
        if not path.exists():
            return None
        return resize_to(D.image_rgb(path), cafe.input_size)
    except ERRORS:
        return None


def concept_card(ctx: Ctx, cafe_stage: Path, latent: int, n: int | None = None, key: str = "card") -> None:
    """A latent's card: statistics, pushed classes, and per exemplar image / activation map / iERF side by
    side (one ``st.image`` triplet per exemplar), then the nearest latents by decoder direction (FAISS)."""
    from sae_cafe.cafe.cards import card_data

    try:
        cafe = D.cafe(cafe_stage)
        k = n or int(cafe.manifest.get("config", {}).get("k", 16))
        card = card_data(cafe, int(latent), k)
    except ERRORS as e:
        show_error(e, f"open the card of latent {latent}")
        return
    s = card["stats"]
    st.subheader(f"Latent {latent} · {cafe.manifest['model']} {cafe.layer}")
    cols = st.columns(4)
    fmt = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    cols[0].metric("firing frequency", fmt(s.get("firing_frequency"), 4))
    cols[1].metric("iERF concentration", fmt(s.get("concentration_ierf")))
    cols[2].metric("act-map concentration", fmt(s.get("concentration_act")))
    cols[3].metric("purity (iERF)", fmt(s.get("purity_ierf")) if "purity_ierf" in s else "n/a")
    lab = card.get("concept")
    if lab and lab["name"]:
        ev = "; ".join(f"{a}: " + ", ".join(f"{n} {v:.2f}" for n, v in sorted(vs.items(), key=lambda t: -t[1])[:3])
                       for a, vs in lab["masses"].items())
        st.markdown(f"**label: {lab['name']}** · confidence {lab['confidence']:.2f} ({lab['calibration']}; raw "
                    f"{lab['raw_confidence']:.2f}, runner-up {lab['runner_up']}) · evidence {lab['evidence']} over "
                    f"{lab['n_exemplars']} exemplars")
        st.caption(f"evidence-mass share per attribute value: {ev}")
    elif lab:
        st.caption(f"label: none ({lab['note']})")
    dissection_lines(ctx, cafe_stage, cafe, int(latent))
    if card["pushes"]:
        st.caption("pushes ↑ " + ", ".join(f"{p['class']} ({p['logit']:+.2f})" for p in card["pushes"]["up"])
                   + " · ↓ " + ", ".join(f"{p['class']} ({p['logit']:+.2f})" for p in card["pushes"]["down"]))
    ids = cafe.exemplar_ids(int(latent))[:k]
    if not ids:
        st.info(f"Latent {latent} has no exemplars (it never fired on the {cafe.manifest['n_images']} images).")
    else:
        missing = False
        st.markdown(f"**Top {len(ids)} exemplars** — image · SAE activation map · iERF (SRD)")
        ierf = cafe.ierf(ids).numpy()
        act = cafe.act_map(ids).numpy()
        for j, e in enumerate(ids):
            rec = cafe.record(e)
            img = cafe_image(ctx, cafe, rec.image)
            if img is None:
                missing = True
                img = np.full((*cafe.input_size, 3), 128, np.uint8)
            st.image([upscale(img), upscale(overlay(img, act[j], "viridis")), upscale(overlay(img, ierf[j], "jet"))],
                     caption=[f"#{rec.rank} {rec.image_name} · a={rec.activation:.2f} @({rec.row},{rec.col})",
                              "activation map", "iERF"], width=150)
        if missing:
            st.warning("Some exemplar images are not readable inside the artifact root or the run's recorded image "
                       f"folders (the CAFE stage records `{cafe.images.get('source')}`; moved or deleted?); grey "
                       "placeholders are shown.")
    try:
        w = cafe.decoder["W_dec"][int(latent)][None]
        sims, nn_ids = cafe.decoder_index.search(w, 6)
        rows = [{"latent": int(i), "cosine": round(float(v), 4)} for v, i in zip(sims[0], nn_ids[0])
                if i >= 0 and int(i) != int(latent)][:5]
        st.markdown("**Nearest latents** (decoder directions, FAISS)")
        st.dataframe(rows, hide_index=True, key=f"{key}_nn")
    except ERRORS as e:
        show_error(e, "search the decoder index")


def stage_dissection(ctx: Ctx, cafe_stage: Path, cafe):
    """(dissection labels or None, message or None, warn): the ``sae-cafe dissect`` output of a CAFE stage,
    checked against it (:func:`app.dissection.mismatch`); the message says how to make them (``warn`` False),
    or why they are not shown / what to be careful about (``warn`` True)."""
    from .dissection import hint, mismatch

    try:
        dis = D.dissection(ctx.root, ctx.run, cafe_stage)
    except ERRORS as e:
        return None, f"Dissection labels not shown: {e}", True
    if dis is None:
        cmd = hint(ctx.root, ctx.run, cafe.manifest.get("model", cafe_stage.parent.name), cafe.layer)
        return None, f"dissection: none for this layer — label the latents on segmentation data with `{cmd}`", False
    error, warning = mismatch(dis, cafe.manifest, cafe.n_latents)
    if error:
        return None, f"Dissection labels not shown: {error}", True
    return dis, warning, True


def dissection_lines(ctx: Ctx, cafe_stage: Path, cafe, latent: int) -> None:
    """The card's Network Dissection lines (one per method: concept, IoU, threshold, agreement with the stage's
    own label), or how to make them."""
    from .dissection import describe

    dis, msg, warn = stage_dissection(ctx, cafe_stage, cafe)
    if dis is not None:
        own = cafe.concept_labels.get(latent)
        for m in dis.methods:
            st.markdown(describe(dis, latent, own, m))
        where = dis.path.relative_to(ctx.root.resolve()) if ctx.root.resolve() in dis.path.parents else dis.path
        st.caption(f"Network Dissection (`sae-cafe dissect`) on {dis.meta.get('n_images', '?')} images of "
                   f"`{dis.meta.get('masks', '?')}`, {len(dis.meta.get('concepts', []))} concepts; read from "
                   f"`{where}`")
    if msg:
        (st.warning if warn else st.caption)(msg)


# ----- graphs -----------------------------------------------------------------------------------------------
def graph_figure(G, route_nodes: list[str] | None = None, title: str = "", height: int = 480):
    """Plotly figure of an ICAT graph: layers left→right (depth), edges width ∝ share, the dominant route red.

    The node trace (name ``nodes``) carries node ids in ``customdata`` for selection events.
    """
    import plotly.graph_objects as go

    route = list(route_nodes or [])
    route_edges = {frozenset(e) for e in zip(route, route[1:])}
    by_depth: dict[int, list[str]] = {}
    for n, d in G.nodes(data=True):
        by_depth.setdefault(int(d.get("depth", 0)), []).append(n)
    pos = {}
    for depth, nodes in by_depth.items():
        nodes.sort(key=lambda n: -float(G.nodes[n].get("value", 0.0)))
        for i, n in enumerate(nodes):
            pos[n] = (depth, (len(nodes) - 1) / 2 - i)
    fig = go.Figure()
    ex, ey, rx, ry = [], [], [], []
    for u, v in G.edges():
        xs, ys = [pos[u][0], pos[v][0], None], [pos[u][1], pos[v][1], None]
        if frozenset((u, v)) in route_edges:
            rx += xs
            ry += ys
        else:
            ex += xs
            ey += ys
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color="#9aa", width=1.2), hoverinfo="skip",
                             name="edges"))
    fig.add_trace(go.Scatter(x=rx, y=ry, mode="lines", line=dict(color="#d62728", width=4), hoverinfo="skip",
                             name="dominant route"))
    nodes = list(G.nodes)
    colors = ["#d62728" if n in route else ("#ff7f0e" if G.nodes[n].get("kind") == "class" else "#1f77b4")
              for n in nodes]
    hover = [f"{G.nodes[n].get('label', n)}<br>value {float(G.nodes[n].get('value', 0)):.3f}" for n in nodes]
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes], mode="markers+text", name="nodes",
        text=[G.nodes[n].get("label", n) for n in nodes], textposition="top center", customdata=nodes,
        hovertext=hover, hoverinfo="text", marker=dict(size=16, color=colors, line=dict(width=1, color="#333"))))
    layers = (G.graph.get("layers") or "").split(",")
    ticks = {i: name for i, name in enumerate([*layers, "logits"])} if layers != [""] else {}
    fig.update_layout(title=title, height=height, showlegend=False, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(tickvals=list(ticks), ticktext=list(ticks.values()), showgrid=False, zeroline=False),
                      yaxis=dict(visible=False), clickmode="event+select")
    return fig


def selected_nodes(event) -> list[str]:
    """Node ids from a ``st.plotly_chart(..., on_select="rerun")`` event (points of the node trace)."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return []
    out = []
    for p in points:
        cd = p.get("customdata")
        if isinstance(cd, list):
            cd = cd[0] if cd else None
        if isinstance(cd, str):
            out.append(cd)
    return out
