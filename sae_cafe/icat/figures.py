"""Rendered concept graphs and case-study figures (matplotlib + networkx), saved as PNG and SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import torch

from .routes import Route


def layered_layout(G: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x = layer depth (input side left, logits right), y = rank of the node within its layer by value."""
    pos = {}
    by_depth: dict[int, list[str]] = {}
    for n, d in G.nodes(data=True):
        by_depth.setdefault(int(d["depth"]), []).append(n)
    for depth, nodes in by_depth.items():
        nodes.sort(key=lambda n: -float(G.nodes[n].get("value", 0.0)))
        k = len(nodes)
        for i, n in enumerate(nodes):
            pos[n] = (float(depth), (k - 1) / 2 - i)
    return pos


def short_layer(layer: str) -> str:
    """Axis label of a layer: torchvision ViT blocks ``encoder.layers.encoder_layer_3`` → ``block 3``."""
    tail = layer.rsplit(".", 1)[-1]
    return tail.replace("encoder_layer_", "block ") if tail.startswith("encoder_layer_") else layer


def draw_graph(G: nx.DiGraph, ax, route: Route | None = None, title: str | None = None,
               label_fn=None) -> None:
    """Draw a concept graph on a matplotlib axis; the route (if any) in red."""
    pos = layered_layout(G)
    on_route = set(route.nodes) if route else set()
    route_edges = set(zip(route.nodes[1:], route.nodes[:-1])) if route else set()
    shares = [float(d.get("share", 0.0)) for _, _, d in G.edges(data=True)]
    top = max(shares + [1e-9])
    edges = list(G.edges())
    widths = [0.5 + 4.0 * max(float(G[u][v].get("share", 0.0)), 0.0) / top for u, v in edges]
    colors = ["tab:red" if (u, v) in route_edges else "0.6" for u, v in edges]
    nx.draw_networkx_edges(G, pos, edgelist=edges, width=widths, edge_color=colors, ax=ax, arrows=True,
                           arrowsize=8, node_size=300)
    ncol = ["tab:red" if n in on_route else ("tab:orange" if G.nodes[n]["kind"] == "class" else "tab:blue")
            for n in G.nodes]
    nx.draw_networkx_nodes(G, pos, node_color=ncol, node_size=300, ax=ax, alpha=0.85)
    label_fn = label_fn or (lambda n, d: str(d.get("latent")) if d["kind"] == "latent" else d.get("label", n))
    nx.draw_networkx_labels(G, pos, labels={n: label_fn(n, d) for n, d in G.nodes(data=True)}, font_size=6,
                            ax=ax)
    layers = (G.graph.get("layers") or "").split(",") + ["logits"]
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([short_layer(n) for n in layers], fontsize=6, rotation=20)
    ax.margins(x=0.12)
    ax.tick_params(left=False, labelleft=False, bottom=True, labelbottom=True)
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)


def save_figure(fig, stem: str | Path) -> list[Path]:
    """Save ``<stem>.png`` and ``<stem>.svg``; close the figure."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(out[0], dpi=130, bbox_inches="tight")
    fig.savefig(out[1], bbox_inches="tight")
    plt.close(fig)
    return out


def graph_figure(G: nx.DiGraph, stem: str | Path, route: Route | None = None, title: str | None = None,
                 label_fn=None) -> list[Path]:
    """One concept graph (route in red) → PNG + SVG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_layers = len((G.graph.get("layers") or "").split(",")) + 1
    fig, ax = plt.subplots(figsize=(2.0 + 1.8 * n_layers, 4.5))
    draw_graph(G, ax, route, title, label_fn)
    return save_figure(fig, stem)


def case_figure(images_N3HW: torch.Tensor, graphs: Sequence[nx.DiGraph], routes: Sequence[Route],
                titles: Sequence[str], stem: str | Path, label_fn=None) -> list[Path]:
    """Case study: for each case its image (pixels in [0, 1]) above its graph with the dominant route;
    ``label_fn(node, data)`` as in :func:`draw_graph` (e.g. latent id + its CAFE attribute)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = len(graphs)
    fig, axes = plt.subplots(2, k, figsize=(5.5 * k, 7.5), gridspec_kw={"height_ratios": [1, 1.6]},
                             squeeze=False)
    for i in range(k):
        img = images_N3HW[i].detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        axes[0, i].imshow(img)
        axes[0, i].set_title(titles[i], fontsize=8)
        axes[0, i].axis("off")
        draw_graph(graphs[i], axes[1, i], routes[i], None, label_fn)
    return save_figure(fig, stem)
