"""Concept labels (issue 21): the label rule on hand-made maps (known answers) and against a float64 loop
reference, calibration, JSON round-trip, labels written with the CAFE stage and shown in cards / ledger,
search, supernodes on a constructed W_dec and supernode-collapsed graphs (edge-weight conservation)."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest
import torch

from sae_cafe.concepts import (
    ConceptLabel,
    label_latent,
    labels_document,
    load_calibration,
    parse_calibration,
    read_labels,
    search_labels,
)
from sae_cafe.concepts.supernodes import (
    annotate_concepts,
    collapse_graph,
    concept_node_label,
    default_threshold,
    find_supernodes,
)
from sae_cafe.errors import ArtifactError, SaeCafeError

torch.set_num_threads(1)


def scenes(shapes, colours, bg=2, size=8):
    """One object (top-left 4×4) per exemplar with the given shape / colour ids, background ``bg`` elsewhere."""
    E = len(shapes)
    shape = np.full((E, size, size), -1, np.int8)
    colour, pattern = shape.copy(), shape.copy()
    background = np.full((E, size, size), bg, np.int8)
    for e in range(E):
        shape[e, :4, :4], colour[e, :4, :4], pattern[e, :4, :4] = shapes[e], colours[e], 1
        background[e, :4, :4] = -1
    return {"shape": shape, "colour": colour, "pattern": pattern, "background": background}


def on_object(E, size=8, off=0.0):
    m = torch.full((E, size, size), off)
    m[:, :4, :4] = 1.0
    return m


def test_colour_latent_known_answer():
    # red objects of three shapes, all with stripes: colour and pattern tie at 1, each shape 1/3
    lab = label_latent(on_object(3), scenes([0, 1, 2], [0, 0, 0]), latent=7)
    assert (lab.latent, lab.attribute, lab.value, lab.name) == (7, "colour", 0, "red")
    assert lab.share == pytest.approx(1.0) and lab.runner_up == "stripes"  # tie → sorted order: colour first
    assert lab.raw_confidence == pytest.approx(0.0)  # colour vs pattern cannot be told apart here
    # give the stripes only to one exemplar: pattern drops to 1/3 → margin 2/3 over the shapes/patterns
    attrs = scenes([0, 1, 2], [0, 0, 0])
    attrs["pattern"][1:][attrs["pattern"][1:] == 1] = 2
    lab = label_latent(on_object(3), attrs)
    assert lab.name == "red" and lab.raw_confidence == pytest.approx(1 - 2 / 3)
    assert lab.masses["shape"] == {"circle": pytest.approx(1 / 3), "square": pytest.approx(1 / 3),
                                   "triangle": pytest.approx(1 / 3)}
    assert lab.masses["pattern"] == {"stripes": pytest.approx(1 / 3), "dots": pytest.approx(2 / 3)}
    assert lab.runner_up == "dots" and lab.agreement == 1.0 and lab.n_exemplars == 3
    assert lab.calibration.startswith("uncalibrated") or lab.calibration.startswith("calibration.json")


def test_background_latent_and_dead_latent_and_resizing():
    inv = 1.0 - on_object(4)  # mass on the background only, maps at 8×8 → attribute maps at 16×16 (resized)
    attrs = scenes([0, 1, 2, 3], [0, 1, 2, 3], bg=2, size=16)
    small = torch.nn.functional.interpolate(inv[:, None], size=(8, 8), mode="nearest")[:, 0]
    lab = label_latent(small, attrs, latent=3)
    assert lab.name == "grass background" and lab.attribute == "background" and lab.share > 0.7
    dead = label_latent(torch.zeros(2, 8, 8), scenes([0, 1], [0, 1]), latent=4)
    assert not dead.labelled and dead.name == "" and dead.confidence == 0 and "no exemplar" in dead.note


def test_images_index_the_attribute_maps_and_bad_shapes_are_clear():
    attrs = scenes([0, 1, 2], [3, 3, 3])
    lab = label_latent(on_object(2), attrs, images=[2, 1])
    assert lab.name == "cyan"
    with pytest.raises(SaeCafeError, match="images="):
        label_latent(on_object(2), attrs)
    with pytest.raises(SaeCafeError, match=r"\(E, H, W\)"):
        label_latent(torch.zeros(8, 8), attrs)


def reference(maps, attrs):
    """float64 loops: m(a, v) per (attribute, value), winner, margin (the rule of the module docstring)."""
    E = maps.shape[0]
    per = []
    for e in range(E):
        m = np.clip(maps[e].astype(np.float64), 0, None)
        tot = m.sum()
        if tot <= 0:
            continue
        s = {}
        for a, arr in attrs.items():
            for v in np.unique(arr[e]):
                if v >= 0:
                    s[(a, int(v))] = float(m[arr[e] == v].sum() / tot)
        per.append(s)
    keys = sorted({k for s in per for k in s})
    mean = {k: sum(s.get(k, 0.0) for s in per) / len(per) for k in keys}
    order = sorted(keys, key=lambda k: -mean[k])
    return order[0], mean[order[0]] - mean[order[1]], mean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_equals_a_float64_loop_reference(seed):
    rng = np.random.default_rng(seed)
    E, S = 5, 12
    attrs = {a: rng.integers(-1, k, (E, S, S)).astype(np.int8) for a, k in
             (("shape", 6), ("colour", 6), ("pattern", 4), ("background", 4))}
    maps = rng.normal(size=(E, S, S)) + 0.3 * (attrs["colour"] == 2)
    lab = label_latent(torch.from_numpy(maps).float(), attrs)
    (a, v), margin, mean = reference(maps.astype(np.float32), attrs)
    assert (lab.attribute, lab.value) == (a, v)
    assert lab.raw_confidence == pytest.approx(margin, abs=1e-5)
    names = {"shape": ("circle", "square", "triangle", "star", "ring", "cross"),
             "colour": ("red", "yellow", "green", "cyan", "blue", "magenta")}
    for (att, val), x in mean.items():
        if att in names:
            assert lab.masses[att][names[att][val]] == pytest.approx(x, abs=1e-5)


def test_calibration_table_binned_and_checked(tmp_path):
    cal = parse_calibration({"raw_confidence": "margin-v1", "evidence": {
        "ierf": {"edges": [0, 0.2, 0.5, 1.0], "accuracy": [0.3, None, 0.9], "n": [10, 0, 5]}}})
    assert cal.apply(0.1, "ierf") == (0.3, "calibration.json:ierf")
    assert cal.apply(1.0, "ierf") == (0.9, "calibration.json:ierf")  # the last bin includes its right edge
    assert cal.apply(0.3, "ierf") == (0.3, "calibration.json:ierf (calibrated by the [0, 0.2] bin: the [0.2, 0.5] "
                                           "bin has no samples)")  # an empty bin: its lower neighbour's
    assert cal.apply(0.3, "act") == (0.3, "uncalibrated")
    lab = label_latent(on_object(3), scenes([0, 1, 2], [0, 0, 0]), calibration=cal)
    assert lab.confidence == 0.3 and lab.raw_confidence == pytest.approx(0.0)
    with pytest.raises(ArtifactError, match="margin-v1"):
        parse_calibration({"raw_confidence": "other", "evidence": {}})
    with pytest.raises(ArtifactError, match="sorted edges"):
        parse_calibration({"raw_confidence": "margin-v1", "evidence": {"ierf": {"edges": [0, 1], "accuracy": [],
                                                                                "n": []}}})
    p = tmp_path / "cal.json"
    p.write_text(json.dumps({"raw_confidence": "margin-v1", "evidence": {}}))
    assert load_calibration(p).tables == {}
    with pytest.raises(ArtifactError, match="no calibration"):
        load_calibration(tmp_path / "missing.json")


def test_json_round_trip_document_and_search(tmp_path):
    red = label_latent(on_object(3), scenes([0, 1, 2], [0, 0, 0]), latent=0)
    assert ConceptLabel.from_json(json.loads(json.dumps(red.to_json()))) == red
    inv = 1.0 - on_object(2)
    grass = label_latent(inv, scenes([0, 1], [0, 1], bg=2), latent=1)
    brick = label_latent(inv, scenes([0, 1], [0, 1], bg=1), latent=2)
    dead = label_latent(torch.zeros(1, 8, 8), scenes([0], [0]), latent=3)
    doc = labels_document({"ierf": [red, grass, brick, dead], "act": [dead, dead, dead, dead]})
    (tmp_path / "labels.json").write_text(json.dumps(doc))
    back = read_labels(tmp_path)
    assert back == {0: red, 1: grass, 2: brick, 3: dead}
    assert read_labels(tmp_path, "act") == {3: dead}
    assert read_labels(tmp_path / "nowhere") == {}
    assert search_labels(back, "latents labelled red") == [0]
    assert sorted(search_labels(back, "background")) == [1, 2]
    assert search_labels(back, "background:") == sorted(search_labels(back, "background"),
                                                        key=lambda s: (-back[s].confidence, s))
    assert search_labels(back, "GRASS") == [1] and search_labels(back, "colour=0") == [0]
    assert search_labels(back, "stripes") == [] and search_labels(back, "") == []
    with pytest.raises(ArtifactError, match="labels document"):
        (tmp_path / "labels.json").write_text("{}")
        read_labels(tmp_path)


# ----- labels written with the CAFE stage ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from sae_cafe.cafe import build_cafe
    from sae_cafe.world import generate
    from tests.test_cafe_build import tiny_adapter, tiny_sae

    world = generate(8, seed=5, size=32)
    attrs = world.attribute_maps()
    ad = tiny_adapter()
    cafe = build_cafe(ad, tiny_sae(), "7", list(world.images), out_dir=tmp_path_factory.mktemp("lab") / "c", k=3,
                      n_anchor=3, progress=False, attributes=attrs)
    return cafe, attrs, list(world.images), ad


def test_labels_are_written_with_the_stage_and_shown(labelled):
    from sae_cafe.cafe.cards import card_data
    from sae_cafe.export.ledger import ledger_table

    cafe, attrs, _, _ = labelled
    assert cafe.manifest["has_labels"] and (cafe.path / "labels.json").exists()
    labels = cafe.concept_labels
    assert sorted(labels) == list(range(cafe.n_latents))
    doc = json.loads((cafe.path / "labels.json").read_text())
    assert doc["primary"] == "ierf" and set(doc["labels"]) == {"ierf", "act"}
    n_lab = 0
    for s, lab in labels.items():
        ids = cafe.exemplar_ids(s)
        if not ids:
            assert not lab.labelled
            continue
        # the stored label equals the label made afresh from the stage's iERFs and the world's maps
        again = label_latent(cafe.ierf(ids), attrs, images=cafe.exemplars["ex_image"][ids], latent=s)
        assert (again.name, again.attribute, again.value) == (lab.name, lab.attribute, lab.value)
        assert again.raw_confidence == pytest.approx(lab.raw_confidence, abs=1e-6)
        n_lab += lab.labelled
    assert n_lab > 0
    s = next(s for s, lab in labels.items() if lab.labelled)
    assert card_data(cafe, s)["concept"]["name"] == labels[s].name
    t = ledger_table(cafe).to_pydict()
    assert [c for c, s_ in zip(t["concept"], t["latent"]) if s_ == s][0] == labels[s].name
    hits = search_labels(labels, labels[s].name)
    assert s in hits and all(labels[h].name.lower().find(labels[s].name.lower()) >= 0 for h in hits)


def test_stage_without_attributes_has_no_labels(tmp_path):
    from sae_cafe.cafe import build_cafe
    from sae_cafe.world import generate
    from tests.test_cafe_build import tiny_adapter, tiny_sae

    world = generate(4, seed=6, size=32)
    cafe = build_cafe(tiny_adapter(), tiny_sae(), "7", list(world.images), out_dir=tmp_path / "c", k=2,
                      progress=False)
    assert not cafe.manifest["has_labels"] and cafe.concept_labels == {}
    assert not (cafe.path / "labels.json").exists()


# ----- supernodes ---------------------------------------------------------------------------------------------
def lab(s, name, attribute="colour", value=0, conf=0.5):
    return ConceptLabel(s, name, attribute, value, conf, conf, "uncalibrated", "ierf")


def constructed():
    """W_dec (8, 16): latents 0-2 'red' near e0, 3 'red' along e5, 4-5 'stripes' near e0, 6 'red' near e0 but
    low confidence, 7 unlabelled near e0."""
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(8, 16)
    for s in (0, 1, 2, 4, 5, 6, 7):
        W[s, 0] = 1.0
    W[3, 5] = 1.0
    W += 0.05 * torch.randn(8, 16, generator=g)
    labels = {0: lab(0, "red"), 1: lab(1, "red"), 2: lab(2, "red"), 3: lab(3, "red"),
              4: lab(4, "stripes", "pattern", 1), 5: lab(5, "stripes", "pattern", 1), 6: lab(6, "red", conf=0.05),
              7: ConceptLabel(7, "", None, None, 0, 0, "uncalibrated", "ierf")}
    return W, labels


def brute_components(W, labels, thr, min_conf):
    """Connected components by an explicit cosine matrix and repeated merging (no FAISS, no union-find)."""
    Wn = torch.nn.functional.normalize(W.double(), dim=1)
    cos = Wn @ Wn.T
    ok = [s for s, lb in labels.items() if lb.attribute is not None and lb.confidence >= min_conf]
    comps = [{s} for s in ok]
    changed = True
    while changed:
        changed = False
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                if any(labels[a].name == labels[b].name and cos[a, b] >= thr for a in comps[i] for b in comps[j]):
                    comps[i] |= comps.pop(j)
                    changed = True
                    break
            if changed:
                break
    return sorted(tuple(sorted(c)) for c in comps if len(c) >= 2)


def test_supernodes_group_agreeing_labels_with_close_directions():
    W, labels = constructed()
    sn = find_supernodes(W, labels, "L", threshold=0.8, min_confidence=0.1)
    got = sorted(g.members for g in sn.groups)
    assert got == [(0, 1, 2), (4, 5)] == brute_components(W, labels, 0.8, 0.1)
    red = next(g for g in sn.groups if g.label == "red")
    assert red.name == "red ×3" and red.id.startswith("L:S") and red.mean_cosine > 0.8
    # without the confidence floor latent 6 joins the red group
    assert sorted(g.members for g in find_supernodes(W, labels, "L", 0.8).groups) == [(0, 1, 2, 6), (4, 5)]
    # a threshold above every cosine: no groups; the default follows the dimension
    assert find_supernodes(W, labels, "L", threshold=0.999).groups == ()
    assert default_threshold(16) == 0.75 and default_threshold(10_000) == 0.2
    assert json.loads(json.dumps(sn.to_json()))["groups"][0]["members"]
    with pytest.raises(SaeCafeError, match="W_dec has 8 rows"):
        find_supernodes(W, {99: lab(99, "red")}, "L")


@pytest.mark.parametrize("seed", [0, 1])
def test_supernodes_equal_brute_force_components_on_random_directions(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 6, generator=g)
    labels = {s: lab(s, ["red", "blue", "grass background"][s % 3], value=s % 3) for s in range(40)}
    sn = find_supernodes(W, labels, "L", threshold=0.6)
    assert sn.groups and sorted(gr.members for gr in sn.groups) == brute_components(W, labels, 0.6, 0.0)


def toy_graph():
    """logits:0 ← a:{0,1,2} ← b:{5,6}; edge weights chosen by hand, shares = weight / child total."""
    G = nx.DiGraph(root="logits:0", layers="b,a")
    G.add_node("logits:0", kind="class", layer="logits", latent=0, depth=2, value=3.0, label="class 0", card="",
               card_latent=-1)
    for layer, depth, lats in (("a", 1, (0, 1, 2)), ("b", 0, (5, 6))):
        for k in lats:
            G.add_node(f"{layer}:{k}", kind="latent", layer=layer, latent=k, depth=depth, value=1.0 + k,
                       label=f"{layer}#{k}", card=f"cafe/m/{layer}", card_latent=k)
    tot = {"logits:0": 10.0, "a:0": 4.0, "a:1": 2.0, "a:2": 8.0}
    for u, v, w in (("a:0", "logits:0", 3.0), ("a:1", "logits:0", 2.0), ("a:2", "logits:0", 1.0),
                    ("b:5", "a:0", 1.0), ("b:6", "a:0", 2.0), ("b:5", "a:1", 0.5), ("b:6", "a:2", 4.0)):
        G.add_edge(u, v, weight=w, share=w / tot[v])
    return G, tot


def test_collapsed_graph_conserves_edge_weight_and_recomputes_shares(tmp_path):
    from sae_cafe.concepts.supernodes import Supernode, SupernodeSet
    from sae_cafe.icat import dominant_route, read_graph, write_graph

    G, tot = toy_graph()
    same = collapse_graph(G, {})
    assert sorted(same.edges(data=True)) == sorted(G.edges(data=True))
    sa = SupernodeSet("a", 0.5, 0.0, (Supernode("a:S0", "a", "red ×2", "red", (0, 1), 0.9, 0.5),))
    H = collapse_graph(G, {"a": sa})
    assert set(H.nodes) == {"logits:0", "a:S0", "a:2", "b:5", "b:6"}

    def by_layers(g):
        out = {}
        for u, v, d in g.edges(data=True):
            k = (g.nodes[u]["layer"], g.nodes[v]["layer"])
            out[k] = out.get(k, 0.0) + d["weight"]
        return out

    assert by_layers(H) == pytest.approx(by_layers(G))  # edge weight conserved per pair of layers
    assert H["a:S0"]["logits:0"]["weight"] == pytest.approx(5.0)
    assert H["a:S0"]["logits:0"]["share"] == pytest.approx(5.0 / tot["logits:0"])
    # merged children: share = Σ weight / Σ child totals (4 + 2)
    assert H["b:5"]["a:S0"]["share"] == pytest.approx(1.5 / 6.0)
    assert H["b:6"]["a:S0"]["share"] == pytest.approx(2.0 / 6.0)
    assert H["b:6"]["a:2"]["share"] == pytest.approx(G["b:6"]["a:2"]["share"])
    assert H.nodes["a:S0"]["value"] == pytest.approx(1.0 + 2.0) and H.nodes["a:S0"]["members"] == "0,1"
    assert H.nodes["a:S0"]["kind"] == "latent" and H.nodes["a:S0"]["card_latent"] == 0
    r = dominant_route(H)
    assert r.nodes[0] == "logits:0" and len(r.nodes) == 3
    annotate_concepts(G, {"a": {0: lab(0, "red")}})
    assert G.nodes["a:0"]["concept"] == "red" and G.nodes["a:0"]["label"] == "a#0 red"
    assert G.nodes["a:1"]["concept"] == "" and G.nodes["b:5"]["concept_confidence"] == 0.0
    assert concept_node_label("a:0", G.nodes["a:0"]) == "0 red" and concept_node_label("a:1", G.nodes["a:1"]) == "1"
    assert concept_node_label("logits:0", G.nodes["logits:0"]) == "class 0"
    paths = write_graph(H, tmp_path, "h")  # JSON and GraphML exports of a collapsed graph
    back = read_graph(paths["graphml"])
    assert back.nodes["a:S0"]["members"] == "0,1" and math.isclose(back["a:S0"]["logits:0"]["weight"], 5.0)


# ----- labeller interface -------------------------------------------------------------------------------------
def test_labeller_receives_masked_crops_and_the_decoder_direction(labelled):
    from sae_cafe.cafe.metrics import mass_region
    from sae_cafe.concepts.labeller import Labeller, label_with, masked_crops

    cafe, _, images, ad = labelled
    s = next(s for s in range(cafe.n_latents) if cafe.exemplar_ids(s))
    seen = {}

    def stub(crops, direction):
        seen["crops"], seen["direction"] = crops, direction
        return f"{len(crops)} crops"

    assert isinstance(stub, Labeller)
    n = len(cafe.exemplar_ids(s)[:8])
    assert label_with(stub, cafe, s, ad, images=images) == f"{n} crops"
    assert torch.equal(seen["direction"], cafe.decoder["W_dec"][s])
    crops = masked_crops(cafe, s, ad, images=images, pad=0, fill=7)
    keep = mass_region(cafe.ierf(cafe.exemplar_ids(s)[:1]), 0.5)[0].numpy()
    rows, cols = np.nonzero(keep.any(1))[0], np.nonzero(keep.any(0))[0]
    assert crops[0].shape == (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, 3)
    inside = keep[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert (crops[0][~inside] == 7).all()
    # inside the region the crop holds the model's input pixels of the exemplar image
    x = ad.denormalize(ad.preprocess([images[cafe.record(cafe.exemplar_ids(s)[0]).image]]))[0]
    pix = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert np.array_equal(crops[0][inside], pix[inside])
    with pytest.raises(SaeCafeError, match="returns text"):
        label_with(lambda c, d: 3, cafe, s, ad, images=images)


def test_clip_vocabulary_labeller_plumbing_with_random_weights():
    import open_clip

    from sae_cafe.concepts.labeller import ClipVocabularyLabeller, openclip_direction_map
    from sae_cafe.errors import MismatchError

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None, embed_dim=24,
                                   vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                               "patch_size": 16},
                                   text_cfg={"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                                             "layers": 1}).eval()
    tok = open_clip.get_tokenizer("ViT-S-32", context_length=12)
    vocab = ["stripes", "red", "circle", "grass"]
    lab = ClipVocabularyLabeller.from_open_clip(model, tok, vocab)
    d = torch.randn(32)
    ranked = lab.rank(d)
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(tok([f"a photo of {v}." for v in vocab])), dim=1)
    v = model.visual
    e = (d - d.mean()) * v.ln_post.weight @ v.proj  # the direction through ln_post's affine and the projection
    cos = t @ torch.nn.functional.normalize(e.detach(), dim=0)
    assert [w for w, _ in ranked] == [vocab[i] for i in torch.argsort(cos, descending=True).tolist()]
    assert np.allclose([c for _, c in ranked], sorted(cos.tolist(), reverse=True), atol=1e-5)
    assert lab([], d) == ranked[0][0]
    assert openclip_direction_map(v).shape == (24, 32)
    with pytest.raises(MismatchError, match="32"):
        lab.rank(torch.randn(16))
