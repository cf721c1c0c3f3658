"""Dominant routes through a concept graph and route comparisons (spec §4.3, §6).

A route runs from the root class node down to the lowest analysed layer present in the graph, one node per
layer. The dominant route maximises the product of edge ``share``s (``mode="product"``, the fraction of the
root's positive attribution carried) or their sum (``mode="sum"``); dynamic programming over the layered
DAG, written by hand.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from ..errors import SaeCafeError


@dataclass
class Route:
    """``nodes``: root first, then one node per layer going down; ``score``: product (or sum) of shares."""

    nodes: list[str]
    score: float

    def by_layer(self, G: nx.DiGraph) -> dict[str, str]:
        return {G.nodes[n]["layer"]: n for n in self.nodes}


def dominant_route(G: nx.DiGraph, mode: str = "product", weight: str = "share") -> Route:
    """Max-product (or max-sum) path from the root down to the lowest layer reached."""
    if mode not in ("product", "sum"):
        raise SaeCafeError(f"mode must be 'product' or 'sum', got {mode!r}")
    root = G.graph.get("root")
    if root is None or root not in G:
        raise SaeCafeError("graph has no root node (graph attribute 'root'); build it with build_graph")
    best: dict[str, float] = {root: 1.0 if mode == "product" else 0.0}
    nxt: dict[str, str] = {}
    # children have larger depth; visit nodes from the top (root) down
    for v in sorted(G.nodes, key=lambda n: -int(G.nodes[n]["depth"])):
        if v not in best:
            continue
        for u in G.predecessors(v):
            w = float(G[u][v][weight])
            s = best[v] * w if mode == "product" else best[v] + w
            if u not in best or s > best[u]:
                best[u], nxt[u] = s, v
    reached = [n for n in best if n != root]
    if not reached:
        return Route([root], best[root])
    low = min(int(G.nodes[n]["depth"]) for n in reached)
    end = max((n for n in reached if int(G.nodes[n]["depth"]) == low), key=lambda n: best[n])
    path = [end]
    while path[-1] != root:
        path.append(nxt[path[-1]])
    return Route(path[::-1], best[end])


def random_route(layer_latents: dict[str, Sequence[int]], layers: Sequence[str], root: str,
                 rng: random.Random) -> list[str]:
    """A random route of the same length: the root and one random latent per layer (from ``layer_latents``)."""
    return [root] + [f"{layer}:{rng.choice(list(layer_latents[layer]))}" for layer in reversed(layers)]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


def compare_routes(G_a: nx.DiGraph, r_a: Route, G_b: nx.DiGraph, r_b: Route,
                   layers: Sequence[str], min_overlap: float = 0.5) -> dict:
    """Where two routes diverge and how much they (and their graphs) overlap.

    ``divergence_layer``: the first analysed layer in forward order whose route nodes differ ("logits" when
    the routes agree on every layer but not on the class, ``None`` when identical).
    ``route_jaccard`` / ``graph_jaccard``: Jaccard overlap of the route / graph latent nodes; per layer too.
    ``graph_divergence_layer``: the first layer whose graph node sets overlap less than ``min_overlap``
    (Jaccard), ``None`` if none does.
    """
    la, lb = r_a.by_layer(G_a), r_b.by_layer(G_b)
    div = None
    for layer in [*layers, "logits"]:
        if la.get(layer) != lb.get(layer):
            div = layer
            break
    lat = lambda G: {n for n, d in G.nodes(data=True) if d["kind"] == "latent"}  # noqa: E731
    per_layer = {}
    for layer in layers:
        na = {n for n in lat(G_a) if G_a.nodes[n]["layer"] == layer}
        nb = {n for n in lat(G_b) if G_b.nodes[n]["layer"] == layer}
        per_layer[layer] = jaccard(na, nb)
    gdiv = next((layer for layer in layers if per_layer[layer] < min_overlap), None)
    return {"divergence_layer": div, "graph_divergence_layer": gdiv,
            "route_jaccard": jaccard(set(r_a.nodes[1:]), set(r_b.nodes[1:])),
            "graph_jaccard": jaccard(lat(G_a), lat(G_b)), "graph_jaccard_per_layer": per_layer}
