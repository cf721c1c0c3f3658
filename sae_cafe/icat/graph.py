"""Interlayer concept graphs (spec §4.3): nodes (layer, latent) and class logits, edges from ICAT scores.

The graph is grown backwards from a root class logit: attribute the last analysed layer's latents to the
root, keep the best parents (positive only, above a threshold, top-k per child, at most
``max_nodes_per_layer`` per layer), then attribute the layer below to the kept nodes, and so on. Edge
weight = the signed mean ICAT score over the images (one image: a per-image graph; many: a dataset or
class graph). ``share`` = weight / the child's total positive incoming attribution (over *all* source
latents, not only kept ones), so a product of shares along a path is the fraction of the root's positive
attribution that the path carries. Nodes link to their CAFE concept cards (``cafe/<model>/<layer>/`` +
latent id).

Export: JSON node-link (networkx ``node_link_data``) and GraphML. Written by hand on top of networkx.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch

from ..artifacts import atomic_write_bytes, atomic_write_json
from ..errors import ArtifactError, SaeCafeError
from ..models import get_adapter
from .attribute import LOGITS, attribute_pair, prepare_pair


@dataclass
class GraphConfig:
    """Graph construction and pruning (defaults: spec G18)."""

    method: str = "ig"
    steps: int = 32
    baseline: str = "zeros"
    top_k: int = 5
    threshold: float = 0.0
    rel_threshold: float = 0.01
    positive_only: bool = True
    max_nodes_per_layer: int = 8
    batch_size: int = 64


def node_id(layer: str, latent: int) -> str:
    return f"{layer}:{int(latent)}"


def class_node(c: int) -> str:
    return f"{LOGITS}:{int(c)}"


def card_path(model_name: str, layer: str) -> str:
    """Relative path of a layer's CAFE stage (concept cards) inside a run."""
    return f"cafe/{model_name}/{layer.replace('/', '_')}"


def _add_latent_node(G: nx.DiGraph, model_name: str, layer: str, depth: int, k: int, value: float) -> str:
    n = node_id(layer, k)
    if n not in G:
        G.add_node(n, kind="latent", layer=layer, latent=int(k), depth=depth, value=float(value),
                   label=f"{layer}#{int(k)}", card=card_path(model_name, layer), card_latent=int(k))
    return n


def prune_parents(scores_SJ: torch.Tensor, cfg: GraphConfig) -> list[list[tuple[int, float]]]:
    """Per child j: the kept parents [(latent, score)] by top-k, threshold and sign (best first)."""
    kept = []
    for j in range(scores_SJ.shape[1]):
        s = scores_SJ[:, j]
        ref = s.clamp_min(0).max() if cfg.positive_only else s.abs().max()
        order = s.argsort(descending=True) if cfg.positive_only else s.abs().argsort(descending=True)
        out = []
        for k in order.tolist():
            v = float(s[k])
            if len(out) >= cfg.top_k:
                break
            if cfg.positive_only and v <= 0:
                break
            if abs(v) <= cfg.threshold or abs(v) < cfg.rel_threshold * float(ref):
                break
            out.append((k, v))
        kept.append(out)
    return kept


def build_graph(model, saes: dict, x: torch.Tensor, layers: Sequence[str | int], root_class: int | None = None,
                config: GraphConfig | None = None, baseline_values: dict | None = None,
                readout: torch.Tensor | None = None, root_label: str | None = None) -> nx.DiGraph:
    """Concept graph of images ``x`` (N, 3, H, W) rooted at class ``root_class`` (default: the class most
    often predicted on ``x``), over the analysed ``layers`` (forward order) and the logits.

    ``readout`` (C, K): the root is ⟨output, readout[root_class]⟩ instead of an output (a direction target of
    a headless backbone: ``readout = d[None]``, ``root_class = 0``); ``root_label`` names the root node.

    ``baseline_values`` {layer: (S,) tensor} is used when ``config.baseline == "mean"`` (dataset means);
    without it the mean code of ``x`` is used.
    """
    cfg = config or GraphConfig()
    adapter = get_adapter(model)
    layers = [adapter.resolve_layer(layer) for layer in layers]
    names = adapter._pfv_layer_names()
    if [names.index(n) for n in layers] != sorted(names.index(n) for n in layers):
        raise SaeCafeError(f"layers must be given in forward order, got {layers}")
    with torch.no_grad():
        logits = adapter(x.to(adapter.device))
        if readout is not None:
            logits = logits @ readout.T.to(logits)
    pred = logits.argmax(1)
    if root_class is None:
        root_class = int(pred.mode().values)
    G = nx.DiGraph(model=adapter.name, layers=",".join(layers), root=class_node(root_class),
                   root_class=int(root_class), method=cfg.method, steps=cfg.steps, baseline=cfg.baseline,
                   n_images=len(x), top_k=cfg.top_k)
    root = class_node(root_class)
    cname = adapter.class_names[root_class] if adapter.class_names else str(root_class)
    G.add_node(root, kind="class", layer=LOGITS, latent=int(root_class), depth=len(layers),
               value=float(logits[:, root_class].mean()), label=root_label or f"class {cname}", card="",
               card_latent=-1)
    frontier = [int(root_class)]
    child_layer = LOGITS
    for depth in range(len(layers) - 1, -1, -1):
        if not frontier:
            break
        src = layers[depth]
        ctx = prepare_pair(adapter, saes, x, src, child_layer, readout=readout if child_layer == LOGITS else None)
        base = cfg.baseline
        if base == "mean" and baseline_values is not None and src in baseline_values:
            base = baseline_values[src]
        res = attribute_pair(ctx, cfg.method, cfg.steps, base, targets=frontier, batch_size=cfg.batch_size)
        scores = res.scores_BSJ.mean(0)  # (S, J)
        pos_total = scores.clamp_min(0).sum(0)  # (J,)
        src_value = ctx.a_BNS.amax(1).mean(0)  # (S,) mean over images of the max code
        kept = prune_parents(scores, cfg)
        # limit the layer: rank candidate parents by their summed kept edge weight
        total: dict[int, float] = {}
        for j_edges in kept:
            for k, v in j_edges:
                total[k] = total.get(k, 0.0) + abs(v)
        keep = set(sorted(total, key=total.get, reverse=True)[:cfg.max_nodes_per_layer])
        for j, j_edges in enumerate(kept):
            child = root if child_layer == LOGITS else node_id(child_layer, frontier[j])
            for k, v in j_edges:
                if k not in keep:
                    continue
                parent = _add_latent_node(G, adapter.name, src, depth, k, float(src_value[k]))
                share = v / float(pos_total[j]) if float(pos_total[j]) > 0 else 0.0
                G.add_edge(parent, child, weight=float(v), share=float(share))
        if not keep and child_layer == LOGITS:
            G.graph["note"] = (f"no positive attribution from {src!r} to the class logit; with a class-token ViT "
                               "the patch tokens of the last block never reach the class token: analyse an "
                               "earlier block")
        frontier = sorted(keep)
        child_layer = src
    return G


def aggregate_graphs(graphs: Sequence[nx.DiGraph]) -> nx.DiGraph:
    """Mean of per-image graphs: union of nodes, edge weight/share averaged over all graphs (0 if absent)."""
    if not graphs:
        raise SaeCafeError("aggregate_graphs needs at least one graph")
    out = nx.DiGraph(**graphs[0].graph)
    out.graph["n_images"] = sum(int(g.graph.get("n_images", 1)) for g in graphs)
    n = len(graphs)
    for g in graphs:
        for v, d in g.nodes(data=True):
            if v not in out:
                out.add_node(v, **{**d, "value": 0.0})
            out.nodes[v]["value"] += d.get("value", 0.0) / n
        for u, v, d in g.edges(data=True):
            if not out.has_edge(u, v):
                out.add_edge(u, v, weight=0.0, share=0.0)
            out[u][v]["weight"] += d["weight"] / n
            out[u][v]["share"] += d["share"] / n
    return out


# ----- export ---------------------------------------------------------------------------------------------
def graph_to_json(G: nx.DiGraph) -> dict:
    return nx.node_link_data(G, edges="links")


def graph_from_json(data: dict) -> nx.DiGraph:
    return nx.node_link_graph(data, directed=True, edges="links")


def write_graph(G: nx.DiGraph, directory: str | Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json`` (node-link) and ``<stem>.graphml`` atomically; return their paths."""
    directory = Path(directory)
    js, gml = directory / f"{stem}.json", directory / f"{stem}.graphml"
    atomic_write_json(js, graph_to_json(G))
    atomic_write_bytes(gml, "\n".join(nx.generate_graphml(G)).encode())
    return {"json": js, "graphml": gml}


def read_graph(path: str | Path) -> nx.DiGraph:
    """Read a graph written by :func:`write_graph` (``.json`` or ``.graphml``)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no graph at {path}; build it with `sae-cafe graph`")
    if path.suffix == ".graphml":
        return nx.read_graphml(path)
    try:
        return graph_from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ArtifactError(f"{path} is not a node-link graph JSON ({e}); rebuild it with `sae-cafe graph`"
                            ) from e
