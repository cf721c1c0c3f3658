"""ICAT graphs: construction, pruning, export round trip, dominant routes, the stage writer and the CLI."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest
import torch
from tiny_models import mini_resnet_32, random_sae

from sae_cafe.artifacts import read_manifest
from sae_cafe.icat import (
    GraphConfig,
    ICATConfig,
    Route,
    aggregate_graphs,
    build_graph,
    build_icat,
    compare_routes,
    dominant_route,
    pgd,
    read_graph,
    write_graph,
)
from sae_cafe.icat.graph import prune_parents

torch.set_num_threads(1)  # 2 threads on the shared, busy 2-core box is ~20x slower (spin-waits)
LAYERS = ["layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def setup():
    adapter = mini_resnet_32(class_names=[f"c{i}" for i in range(12)])
    saes = {"layer2": random_sae(32, 48, 1), "layer3": random_sae(48, 64, 2), "layer4": random_sae(64, 64, 3)}
    x = torch.randn(4, 3, 32, 32)
    return adapter, saes, x


@pytest.fixture(scope="module")
def graph(setup):
    adapter, saes, x = setup
    return build_graph(adapter, saes, x[:2], LAYERS, root_class=3,
                       config=GraphConfig(steps=4, top_k=3, max_nodes_per_layer=4))


def test_graph_structure_and_pruning(graph):
    G = graph
    assert G.graph["root"] == "logits:3" and G.nodes["logits:3"]["kind"] == "class"
    assert nx.is_directed_acyclic_graph(G)
    for layer in LAYERS:
        nodes = [n for n, d in G.nodes(data=True) if d["layer"] == layer]
        assert 0 < len(nodes) <= 4
    for u, v, d in G.edges(data=True):
        assert d["weight"] > 0 and 0 < d["share"] <= 1 + 1e-6  # positive only; shares of the child's total
        assert G.nodes[u]["depth"] == G.nodes[v]["depth"] - 1  # adjacent analysed layers only
    for n, d in G.nodes(data=True):
        if d["kind"] == "latent":
            assert d["card"] == f"cafe/mini_resnet/{d['layer']}" and d["card_latent"] == d["latent"]
        assert G.in_degree(n) <= 3 * max(1, G.out_degree(n))  # top-3 parents per child


def test_prune_parents_rules():
    s = torch.tensor([[5.0, -1.0], [1.0, 0.2], [0.04, 3.0], [-2.0, 0.0]])
    cfg = GraphConfig(top_k=2, rel_threshold=0.01, positive_only=True)
    assert prune_parents(s, cfg) == [[(0, 5.0), (1, 1.0)], [(2, 3.0), (1, pytest.approx(0.2))]]
    cfg = GraphConfig(top_k=5, threshold=0.5, rel_threshold=0.0, positive_only=False)
    assert [k for k, _ in prune_parents(s, cfg)[0]] == [0, 3, 1]


def test_export_round_trip(graph, tmp_path):
    paths = write_graph(graph, tmp_path, "g")
    data = json.loads(paths["json"].read_text())
    assert len(data["nodes"]) == graph.number_of_nodes() and len(data["links"]) == graph.number_of_edges()
    for p in paths.values():
        back = read_graph(p)
        assert set(back.nodes) == set(graph.nodes) and back.number_of_edges() == graph.number_of_edges()
    back = read_graph(paths["json"])
    assert back.graph["root"] == graph.graph["root"]
    assert dominant_route(back).nodes == dominant_route(graph).nodes


def test_dominant_route_is_max_product_path(graph):
    r = dominant_route(graph)
    G = graph
    assert r.nodes[0] == G.graph["root"] and len(r.nodes) == len(LAYERS) + 1
    prod = math.prod(G[u][v]["share"] for v, u in zip(r.nodes, r.nodes[1:]))
    assert r.score == pytest.approx(prod)
    # brute force over all root → lowest-layer paths
    low = [n for n, d in G.nodes(data=True) if d["layer"] == LAYERS[0]]
    best = max(math.prod(G[a][b]["share"] for a, b in zip(p, p[1:]))
               for n in low for p in nx.all_simple_paths(G, n, G.graph["root"]))
    assert r.score == pytest.approx(best)
    assert dominant_route(G, mode="sum").nodes[0] == G.graph["root"]


def test_aggregate_and_compare(graph):
    agg = aggregate_graphs([graph, graph])
    assert set(agg.nodes) == set(graph.nodes)
    u, v = next(iter(graph.edges))
    assert agg[u][v]["weight"] == pytest.approx(graph[u][v]["weight"])
    r = dominant_route(graph)
    same = compare_routes(graph, r, graph, r, LAYERS)
    assert same["divergence_layer"] is None and same["route_jaccard"] == 1.0 and same["graph_jaccard"] == 1.0
    assert same["graph_divergence_layer"] is None
    other = Route([r.nodes[0], r.nodes[1], "layer3:999999", r.nodes[3]], 0.0)
    G2 = graph.copy()
    G2.add_node("layer3:999999", kind="latent", layer="layer3", depth=1)
    cmp = compare_routes(graph, r, G2, other, LAYERS)
    assert cmp["divergence_layer"] == "layer3" and cmp["route_jaccard"] == pytest.approx(2 / 4)


def test_pgd_flips_and_stays_in_budget(setup):
    adapter, _, x = setup
    with torch.no_grad():
        y = adapter(x).argmax(1)
    xa = pgd(adapter, x, y, eps=8 / 255, steps=5)
    d = (adapter.denormalize(xa) - adapter.denormalize(x).clamp(0, 1)).abs().max()
    assert d <= 8 / 255 + 1e-5 and d > 1 / 255
    assert adapter.denormalize(xa).min() >= -1e-5 and adapter.denormalize(xa).max() <= 1 + 1e-5


def test_build_icat_stage_and_cli(setup, tmp_path):
    from sae_cafe.cli import main

    adapter, saes, x = setup
    with torch.no_grad():
        y = adapter(x).argmax(1)
    y[1] = (y[1] + 1) % 12  # one "misclassified" image
    cfg = ICATConfig(graph=GraphConfig(steps=3, top_k=2, max_nodes_per_layer=3), max_images_per_class=2,
                     pgd_steps=2)
    out = build_icat(adapter, saes, x, y, "t", root=tmp_path, steps=3, config=cfg, classes=[int(y[0])])
    man = read_manifest(out, "icat")
    assert man["layers"] == LAYERS and man["cases"] == ["adversarial", "correct", "misclassified"]
    routes = json.loads((out / "routes.json").read_text())
    c = str(int(y[0]))
    assert routes[c]["nodes"][0] == f"logits:{c}" and routes[c]["cards"][1]["card"].startswith("cafe/")
    g = json.loads((out / "graphs" / f"class_{c}.json").read_text())
    assert len(g["nodes"]) == read_graph(out / "graphs" / f"class_{c}.graphml").number_of_nodes()
    for f in (f"graphs/class_{c}.png", f"graphs/class_{c}.svg", "cases/correct.png", "cases/adversarial.png",
              "cases/misclassified.png", "cases.json", "graphs/dataset.json"):
        assert (out / f).exists(), f
    cases = json.loads((out / "cases.json").read_text())
    assert {"divergence_layer", "route_jaccard", "graph_jaccard"} <= set(cases["adversarial"])
    assert main(["routes", "--run", "t", "--model", "mini_resnet", "--root", str(tmp_path), "--json"]) == 0
    assert main(["routes", "--run", "t", "--model", "nope", "--root", str(tmp_path)]) == 2


def test_cli_graph_from_disk(setup, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from sae_cafe.cli import main

    adapter, saes, _ = setup
    wpath = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.model.state_dict().items()}, str(wpath))
    for layer, sae in saes.items():
        sae.save_model(tmp_path / "t" / "saes" / "mini_resnet" / layer)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    rc = main(["graph", "--run", "t", "--model", "mini_resnet", "--weights", str(wpath), "--root", str(tmp_path),
               "--layers", "layer3", "layer4", "--images", str(img_dir), "--steps", "2", "--per-class", "1",
               "--max-nodes", "2", "--no-cases"])
    assert rc == 0
    assert read_manifest(tmp_path / "t" / "icat" / "mini_resnet", "icat")["layers"] == ["layer3", "layer4"]
