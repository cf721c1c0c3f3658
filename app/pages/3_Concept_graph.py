"""Concept graph: ICAT graphs of a class or an image (interactive; selecting a node opens its concept card),
the dominant route highlighted, and the correct / misclassified / adversarial case studies side by side."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import streamlit as st  # noqa: E402

from app import components as C  # noqa: E402
from app import data as D  # noqa: E402
from sae_cafe.errors import SaeCafeError  # noqa: E402

CASES = ("correct", "misclassified", "adversarial")


def route_of(G, nodes: list[str] | None) -> list[str]:
    if nodes:
        return [n for n in nodes if n in G]
    from sae_cafe.icat import dominant_route

    try:
        return dominant_route(G).nodes
    except (SaeCafeError, ValueError, KeyError):
        return []


def load(path: Path):
    return D.load_graph(str(path), path.stat().st_mtime if path.exists() else 0.0)


def with_concepts(G, path: Path, collapse: bool):
    """The graph with concept labels on its nodes (from the run's CAFE stages when the stored graph predates
    them) and, with ``collapse``, merged onto supernodes: the stored ``graphs/supernodes/<name>`` when the ICAT
    stage wrote it, else collapsed here from the CAFE stages' labels and decoder directions."""
    from sae_cafe.concepts.supernodes import annotate_concepts, collapse_graph

    dirs = {}
    for _, d in G.nodes(data=True):
        if d.get("kind") == "latent" and d.get("card"):
            try:
                dirs[d["layer"]] = D.confine(ctx.root, f"{ctx.run}/{d['card']}")
            except C.ERRORS:
                continue
    labels, supers = D.concepts(dirs)
    stored = path.parent / "supernodes" / path.name
    if collapse and stored.exists():
        return load(stored), "stored"
    if not any("concept" in d for _, d in G.nodes(data=True)):
        G = annotate_concepts(G.copy(), labels)
    if collapse:
        return (collapse_graph(G, supers), "computed") if supers else (G, "none")
    return G, ""


ctx = C.page_setup("Concept graph")
stage = C.pick_stage(ctx, "icat", "ICAT stage (model)", "cg_stage") if ctx and ctx.run else None
if stage is not None:
    try:
        routes = D.json_file(stage / "routes.json") if (stage / "routes.json").exists() else {}
        cases = D.json_file(stage / "cases.json") if (stage / "cases.json").exists() else {}
    except C.ERRORS as e:
        C.show_error(e, "read routes/cases")
        routes, cases = {}, {}
    options = {}
    for p in sorted((stage / "graphs").glob("class_*.json"), key=lambda q: int(q.stem.split("_")[1])
                    if q.stem.split("_")[1].isdigit() else 0):
        c = p.stem.split("_", 1)[1]
        name = routes.get(c, {}).get("class_name", c)
        options[f"class {name}"] = (D.confine(stage, p.relative_to(stage)), routes.get(c, {}).get("nodes"))
    for case in CASES:
        p = stage / "cases" / f"{case}.json"
        if p.exists():
            title = cases.get(case, {}).get("title", case)
            options[f"image: {title}"] = (D.confine(stage, p.relative_to(stage)),
                                          cases.get(case, {}).get("route", {}).get("nodes"))
    if not options:
        st.info(f"The ICAT stage {stage.name} has no graphs (graphs/class_*.json or cases/*.json); rebuild it "
                "with `sae-cafe icat`.")
    else:
        choice = st.selectbox("graph", list(options), key="cg_choice")
        path, rnodes = options[choice]
        try:
            G = load(path)
        except C.ERRORS as e:
            C.show_error(e, f"read {path.name}")
            G = None
        collapse = st.toggle("collapse onto supernodes (latents with the same label and close decoder directions)",
                             value=False, key="cg_collapse")
        if G is not None:
            try:
                G, how = with_concepts(G, path, collapse)
            except C.ERRORS as e:
                C.show_error(e, "read the concept labels")
                how = ""
            if collapse:
                st.caption({"stored": "supernode-collapsed graph written by the ICAT stage",
                            "computed": "collapsed here from the CAFE stages' labels",
                            "none": "no supernodes (no labels, or no two latents with one label and close "
                                    "decoder directions): graph shown uncollapsed"}.get(how, ""))
                rnodes = None
            route = route_of(G, rnodes)
            st.caption(f"{G.number_of_nodes()} nodes, {G.number_of_edges()} edges · method "
                       f"{G.graph.get('method', '?')}, {G.graph.get('n_images', '?')} image(s) · dominant route "
                       f"(red): {' → '.join(route) if route else 'n/a'}")
            event = st.plotly_chart(C.graph_figure(G, route, choice), key="cg_graph", on_select="rerun",
                                    selection_mode="points")
            latent_nodes = [n for n in G.nodes if G.nodes[n].get("kind") == "latent"]
            picked = [n for n in C.selected_nodes(event) if n in latent_nodes]
            if picked and st.session_state.get("cg_last_pick") != picked[0]:
                st.session_state["cg_node"] = picked[0]
                st.session_state["cg_last_pick"] = picked[0]
            if st.session_state.get("cg_node") not in latent_nodes:
                st.session_state["cg_node"] = next((n for n in route if n in latent_nodes),
                                                   latent_nodes[0] if latent_nodes else None)
            if latent_nodes:
                node = st.selectbox("node (click one in the graph, or pick it here)", latent_nodes, key="cg_node")
                d = G.nodes[node]
                card = d.get("card")
                try:
                    cstage = D.confine(ctx.root, f"{ctx.run}/{card}") if card else None
                except C.ERRORS as e:
                    C.show_error(e, f"open the card of {node}")
                    cstage = None
                if cstage is None or not (cstage / "manifest.json").exists():
                    st.info(f"No concept card for {node}: the CAFE stage `{card}` is not in run `{ctx.run}`; "
                            "build it with `sae-cafe build-index`.")
                else:
                    C.concept_card(ctx, cstage, int(d.get("card_latent", d.get("latent"))), n=4, key="cg_card")
            else:
                st.info("This graph has no latent nodes (nothing passed the pruning thresholds).")
    present = [c for c in CASES if (stage / "cases" / f"{c}.json").exists()]
    st.subheader("Case studies: correct · misclassified · adversarial")
    if not present:
        st.info("No case studies in this ICAT stage (built with cases off, or no such image was found).")
    cols = st.columns(3)
    for col, case in zip(cols, CASES):
        with col:
            if case not in present:
                st.info(f"No {case} case in this stage.")
                continue
            info = cases.get(case, {})
            try:
                Gc = load(stage / "cases" / f"{case}.json")
            except C.ERRORS as e:
                C.show_error(e, f"read the {case} case")
                continue
            r = route_of(Gc, info.get("route", {}).get("nodes"))
            st.plotly_chart(C.graph_figure(Gc, r, info.get("title", case), height=360),
                            key=f"cg_case_{case}")
            extra = []
            if "divergence_layer" in info:
                extra.append(f"routes diverge at {info['divergence_layer']}")
            if "graph_jaccard" in info:
                extra.append(f"graph Jaccard {info['graph_jaccard']:.2f}")
            if extra:
                st.caption(" · ".join(extra))
            png = stage / "cases" / f"{case}.png"
            if png.exists():
                with st.expander("figure"):
                    st.image(str(png))
