"""Supernodes: groups of latents of one layer whose concept labels agree and whose decoder directions are close,
and ICAT graphs collapsed onto them.

Grouping rule: two labelled latents (label confidence ≥ ``min_confidence``) are linked when they carry the same
label (attribute and value) and the cosine of their decoder directions (rows of the SAE's ``W_dec``) is at
least ``threshold``; supernodes are the connected components (single linkage) with ≥ ``min_size`` members.
Close pairs come from a FAISS range search (``IndexFlatIP.range_search`` over L2-normalised rows, exact).
Default threshold: ``3 / sqrt(D)`` clipped to [0.2, 0.9] — three standard deviations above the cosine of
two random directions in D dimensions (whose standard deviation is ≈ 1/√D), so unrelated directions are
linked with probability ≈ 0.1 % per pair; the value used is recorded with the groups.

Collapsing a graph (:func:`collapse_graph`) maps every member node to its supernode and keeps other nodes.
Invariants (tested): edge weights are summed, so the total weight between any two layers is conserved; the
``share`` of a collapsed edge is Σ weight / Σ (positive incoming attribution of the merged children), the
latter recovered per child as ``weight / share`` from any of its edges — for groups of one node this is the
original share, and the collapsed graph equals the original.

Hand-written on networkx and FAISS (union-find over the range-search pairs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from ..errors import SaeCafeError


@dataclass(frozen=True)
class Supernode:
    """One group: ``id`` (``"<layer>:S<k>"``), ``name`` (e.g. "stripes ×3"), the shared ``label``, its
    ``members`` (latent ids, ascending), the mean pairwise decoder cosine and the mean label confidence."""

    id: str
    layer: str
    name: str
    label: str
    members: tuple[int, ...]
    mean_cosine: float
    mean_confidence: float

    def to_json(self) -> dict:
        return {**asdict(self), "members": list(self.members)}


@dataclass(frozen=True)
class SupernodeSet:
    """The supernodes of one layer and the settings that made them."""

    layer: str
    threshold: float
    min_confidence: float
    groups: tuple[Supernode, ...] = field(default_factory=tuple)

    def node_map(self) -> dict[int, Supernode]:
        """{latent: its supernode}."""
        return {m: g for g in self.groups for m in g.members}

    def to_json(self) -> dict:
        return {"layer": self.layer, "threshold": self.threshold, "min_confidence": self.min_confidence,
                "groups": [g.to_json() for g in self.groups]}


def default_threshold(d: int) -> float:
    """``3/sqrt(d)`` clipped to [0.2, 0.9] (see the module docstring)."""
    return float(min(0.9, max(0.2, 3.0 / math.sqrt(max(int(d), 1)))))


def close_pairs(W_dec: torch.Tensor | np.ndarray, ids: list[int], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine), i < j, among rows ``ids`` of ``W_dec`` (S, D) with cosine ≥ ``threshold``."""
    import faiss

    from ..cafe.index import normalize

    if not ids:
        return []
    X = normalize(torch.as_tensor(np.asarray(W_dec))[ids])
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    lims, sims, nbr = index.range_search(X, float(threshold))
    out = []
    for a in range(len(ids)):
        for b, c in zip(nbr[lims[a]:lims[a + 1]], sims[lims[a]:lims[a + 1]]):
            if a < int(b):
                out.append((ids[a], ids[int(b)], float(c)))
    return out


def _root(parent: dict[int, int], i: int) -> int:
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def find_supernodes(W_dec: torch.Tensor | np.ndarray, labels: Mapping[int, object], layer: str = "",
                    threshold: float | None = None, min_confidence: float = 0.0, min_size: int = 2) -> SupernodeSet:
    """Supernodes of one layer. ``labels``: {latent: ConceptLabel-like (``name``, ``attribute``, ``value``,
    ``confidence``)}; ``W_dec`` (S, D) the SAE's decoder rows (a CAFE stage stores them in
    ``decoder.safetensors``)."""
    W = torch.as_tensor(np.asarray(W_dec)).float()
    if W.ndim != 2:
        raise SaeCafeError(f"W_dec must be (S, D), got shape {tuple(W.shape)}")
    thr = default_threshold(W.shape[1]) if threshold is None else float(threshold)
    if not -1.0 <= thr <= 1.0:
        raise SaeCafeError(f"threshold is a cosine in [-1, 1], got {thr}")
    by_label: dict[tuple, list[int]] = {}
    for s, lab in labels.items():
        if getattr(lab, "attribute", None) is None or lab.confidence < min_confidence:
            continue
        if not 0 <= int(s) < W.shape[0]:
            raise SaeCafeError(f"label for latent {s} but W_dec has {W.shape[0]} rows; labels and SAE differ")
        by_label.setdefault((lab.attribute, lab.value, lab.name), []).append(int(s))
    groups = []
    for (_, _, name), ids in sorted(by_label.items(), key=lambda t: str(t[0])):
        parent = {i: i for i in ids}
        for i, j, _ in close_pairs(W, sorted(ids), thr):
            parent[_root(parent, i)] = _root(parent, j)
        comps: dict[int, list[int]] = {}
        for i in ids:
            comps.setdefault(_root(parent, i), []).append(i)
        big = sorted((sorted(c) for c in comps.values() if len(c) >= min_size), key=lambda c: (-len(c), c))
        for k, members in enumerate(big):
            Wn = torch.nn.functional.normalize(W[members], dim=1)
            cos = Wn @ Wn.T
            n = len(members)
            mean_cos = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
            conf = float(np.mean([labels[m].confidence for m in members]))
            suffix = f" #{k + 1}" if len(big) > 1 else ""
            groups.append(Supernode("", layer, f"{name}{suffix} ×{n}", name, tuple(members), mean_cos, conf))
    groups = [Supernode(f"{layer}:S{k}", g.layer, g.name, g.label, g.members, g.mean_cosine, g.mean_confidence)
              for k, g in enumerate(groups)]
    return SupernodeSet(layer, thr, float(min_confidence), tuple(groups))


def stage_supernodes(cafe_dir: str | Path, threshold: float | None = None,
                     min_confidence: float = 0.0) -> SupernodeSet | None:
    """Supernodes of a CAFE stage from its ``labels.json`` and ``decoder.safetensors``; None without labels."""
    from safetensors.torch import load_file

    from .label import read_labels

    cafe_dir = Path(cafe_dir)
    labels = read_labels(cafe_dir)
    if not labels:
        return None
    import json

    layer = json.loads((cafe_dir / "manifest.json").read_text()).get("layer", cafe_dir.name)
    W = load_file(str(cafe_dir / "decoder.safetensors"))["W_dec"]
    return find_supernodes(W, labels, layer, threshold, min_confidence)


# ----- graphs ---------------------------------------------------------------------------------------------
def annotate_concepts(G: nx.DiGraph, labels: Mapping[str, Mapping[int, object]]) -> nx.DiGraph:
    """Add concept labels to a concept graph's latent nodes in place (``labels``: {layer: {latent: label}}):
    node attributes ``concept`` (name, "" when unlabelled), ``concept_confidence`` (0 when unlabelled) and
    ``concept_attribute``; the display ``label`` becomes "<layer>#<latent> <name>"."""
    for _, d in G.nodes(data=True):
        if d.get("kind") != "latent" or d.get("supernode"):
            continue
        lab = labels.get(d.get("layer"), {}).get(int(d.get("latent", -1)))
        name = lab.name if lab is not None else ""
        d["concept"] = name
        d["concept_confidence"] = float(lab.confidence) if lab is not None and name else 0.0
        d["concept_attribute"] = (lab.attribute or "") if lab is not None else ""
        if name:
            d["label"] = f"{d['layer']}#{int(d['latent'])} {name}"
    return G


def concept_node_label(n: str, d: dict) -> str:
    """Figure label of a graph node: latent id and its concept ("12 red"), the node label for class nodes."""
    if d.get("kind") != "latent":
        return str(d.get("label", n))
    return f"{d.get('latent')} {d['concept']}" if d.get("concept") else str(d.get("latent"))


def collapse_graph(G: nx.DiGraph, supernodes: Mapping[str, SupernodeSet]) -> nx.DiGraph:
    """The graph with every latent node that belongs to a supernode of its layer merged into it (module doc:
    weights summed, shares recomputed). Supernode nodes keep ``kind="latent"`` (routes and viewers work on
    them) with ``supernode=True``, ``members`` ("12,40,77"), ``latent``/``card_latent`` = the first member."""
    maps = {layer: s.node_map() for layer, s in supernodes.items()}

    def target(n: str) -> str:
        d = G.nodes[n]
        g = maps.get(d.get("layer"), {}).get(int(d.get("latent", -1))) if d.get("kind") == "latent" else None
        return g.id if g is not None else n

    H = nx.DiGraph(**G.graph)
    H.graph["collapsed"] = "supernodes"
    for n, d in G.nodes(data=True):
        t = target(n)
        if t == n:
            H.add_node(n, **d)
            continue
        g = maps[d["layer"]][int(d["latent"])]
        if t not in H:
            H.add_node(t, **{**d, "latent": g.members[0], "card_latent": g.members[0], "value": 0.0,
                             "label": f"{g.layer} {g.name}", "supernode": True,
                             "members": ",".join(map(str, g.members)), "concept": g.label,
                             "concept_confidence": g.mean_confidence})
        H.nodes[t]["value"] += float(d.get("value", 0.0))
    # positive incoming attribution of each original child: weight / share of any edge with share > 0
    pos_total: dict[str, float] = {}
    for _, v, d in G.edges(data=True):
        if v not in pos_total and d.get("share", 0) > 0:
            pos_total[v] = float(d["weight"]) / float(d["share"])
    weight: dict[tuple[str, str], float] = {}
    for u, v, d in G.edges(data=True):
        key = (target(u), target(v))
        weight[key] = weight.get(key, 0.0) + float(d["weight"])
    child_total: dict[str, float] = {}
    for v, tot in pos_total.items():
        child_total[target(v)] = child_total.get(target(v), 0.0) + tot
    for (u, v), w in weight.items():
        tot = child_total.get(v, 0.0)
        H.add_edge(u, v, weight=w, share=w / tot if tot > 0 else 0.0)
    return H


def cafe_concepts(cafe_dirs: Mapping[str, str | Path], threshold: float | None = None
                  ) -> tuple[dict[str, dict], dict[str, SupernodeSet]]:
    """({layer: {latent: ConceptLabel}}, {layer: SupernodeSet}) from the CAFE stages ``{layer: dir}`` that
    carry labels (others are left out: a graph over them stays unlabelled)."""
    from .label import read_labels

    labels, sets = {}, {}
    for layer, d in cafe_dirs.items():
        lab = read_labels(d)
        if lab:
            labels[layer] = lab
            s = stage_supernodes(d, threshold)
            if s is not None and s.groups:
                sets[layer] = s
    return labels, sets


__all__ = ["Supernode", "SupernodeSet", "annotate_concepts", "cafe_concepts", "close_pairs", "collapse_graph",
           "concept_node_label", "default_threshold", "find_supernodes", "stage_supernodes"]
