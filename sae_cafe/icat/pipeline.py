"""``build_icat``: the ICAT stage ``indexes/<run>/icat/<model>/`` (class graphs, routes, case studies).

Layout::

    graphs/class_<c>.json|.graphml|.png|.svg   class graph (root = class c) over correctly classified images
    graphs/dataset.json|.graphml               all class graphs in one graph (one root per class)
    routes.json                                dominant route per class (nodes, score, layers)
    cases/<case>.json|.graphml|.png|.svg       correct / misclassified / adversarial per-image graphs
    cases.json                                 case-study summary (predictions, routes, divergence, Jaccard)
    graphs/supernodes/class_<c>.json|.graphml  class graph collapsed onto supernodes (when the CAFE stages
                                               carry concept labels; supernodes.json lists the groups)
    manifest.json                              kind "icat", config, upstream SAE/CAFE stages
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import networkx as nx
import torch
from tqdm import tqdm

from ..artifacts import atomic_write_json, stage_dir, stage_path, write_manifest
from ..concepts.supernodes import annotate_concepts, cafe_concepts, collapse_graph, concept_node_label
from ..errors import SaeCafeError
from ..model_record import KEY as MODEL_RECORD
from ..model_record import record_for
from ..models import get_adapter
from .adversarial import fgsm, pgd
from .attribute import check_patch_sae
from .figures import case_figure, graph_figure
from .graph import GraphConfig, build_graph, write_graph
from .routes import compare_routes, dominant_route


@dataclass
class ICATConfig:
    """Options of :func:`build_icat` (graph options in ``graph``)."""

    layers: list[str] = field(default_factory=list)
    graph: GraphConfig = field(default_factory=GraphConfig)
    max_images_per_class: int = 16
    attack: str = "pgd"
    eps: float = 8 / 255
    pgd_steps: int = 40
    pgd_step_size: float = 1 / 255
    cases: bool = True


def order_layers(adapter, layers) -> list[str]:
    names = adapter._pfv_layer_names()
    return sorted({adapter.resolve_layer(n) for n in layers}, key=names.index)


def _route_json(G: nx.DiGraph, route) -> dict:
    return {"nodes": route.nodes, "score": route.score,
            "layers": [G.nodes[n]["layer"] for n in route.nodes],
            "cards": [{"card": G.nodes[n]["card"], "latent": G.nodes[n]["card_latent"]} for n in route.nodes]}


@torch.no_grad()
def _predict(adapter, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([adapter(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def case_studies(adapter, saes: dict, x: torch.Tensor, labels: torch.Tensor, cfg: ICATConfig,
                 out_dir: Path | None = None, pred: torch.Tensor | None = None, label_fn=None,
                 annotate=None) -> dict:
    """Correct, misclassified and adversarial per-image graphs and routes (spec §6).

    Each case's route runs to the predicted class; the adversarial case (FGSM or PGD on the correct image)
    is compared with the clean image's route (divergence layer, Jaccard), and the misclassified case with
    the route to its true class on the same image. ``label_fn(node, data)`` labels the figures' nodes
    (default: the latent id); ``annotate(G)`` (optional) edits each graph before it is written.
    """
    layers = cfg.layers
    pred = _predict(adapter, x) if pred is None else pred
    correct = (pred == labels).nonzero()[:, 0]
    wrong = (pred != labels).nonzero()[:, 0]
    cases, figs = {}, {}

    def one(name: str, xi: torch.Tensor, root: int, title: str):
        G = build_graph(adapter, saes, xi, layers, int(root), cfg.graph)
        if annotate is not None:
            annotate(G)
        r = dominant_route(G)
        cases[name] = {"root_class": int(root), "route": _route_json(G, r), "title": title}
        figs[name] = [(xi, G, r, title)]
        if out_dir is not None:
            write_graph(G, out_dir, name)
        return G, r

    names = adapter.class_names or [str(i) for i in range(int(adapter(x[:1]).shape[1]))]
    if len(correct):
        i = int(correct[0])
        Gc, rc = one("correct", x[i:i + 1], int(pred[i]), f"correct: {names[int(labels[i])]}")
        attack = pgd if cfg.attack == "pgd" else fgsm
        kw = {"steps": cfg.pgd_steps, "step_size": cfg.pgd_step_size} if cfg.attack == "pgd" else {}
        with torch.enable_grad():
            xa = attack(adapter, x[i:i + 1], labels[i:i + 1], eps=cfg.eps, **kw)
        pa = int(_predict(adapter, xa)[0])
        Ga, ra = one("adversarial", xa, pa, f"{cfg.attack} ε={cfg.eps * 255:.0f}/255: "
                     f"{names[int(labels[i])]} → {names[pa]}")
        cmp = compare_routes(Gc, rc, Ga, ra, layers)
        cases["adversarial"].update(flipped=pa != int(labels[i]), clean_image=i, **cmp)
        figs["adversarial"].insert(0, (x[i:i + 1], Gc, rc, f"clean: {names[int(labels[i])]} (routes diverge at "
                                                       f"{cmp['divergence_layer']}, graph Jaccard "
                                                       f"{cmp['graph_jaccard']:.2f})"))
    if len(wrong):
        i = int(wrong[0])
        Gw, rw = one("misclassified", x[i:i + 1], int(pred[i]),
                     f"misclassified: {names[int(labels[i])]} → {names[int(pred[i])]}")
        Gt = build_graph(adapter, saes, x[i:i + 1], layers, int(labels[i]), cfg.graph)
        rt = dominant_route(Gt)
        cmp = compare_routes(Gt, rt, Gw, rw, layers)
        cases["misclassified"].update(true_class=int(labels[i]), true_route=_route_json(Gt, rt), **cmp)
        figs["misclassified"].append((x[i:i + 1], Gt, rt, f"same image, route to the true class "
                                                          f"{names[int(labels[i])]}"))
    if out_dir is not None:
        for name, panels in figs.items():
            case_figure(torch.cat([adapter.denormalize(p[0]) for p in panels]), [p[1] for p in panels],
                        [p[2] for p in panels], [p[3] for p in panels], out_dir / name, label_fn)
        atomic_write_json(out_dir.parent / "cases.json", cases)
    return cases


def build_icat(model, saes: dict, images, labels, run: str, root: str | Path | None = None, steps: int = 32,
               layers: Sequence[str] | None = None, config: ICATConfig | None = None,
               model_name: str | None = None, upstream: dict[str, str | Path] | None = None,
               classes: Sequence[int] | None = None, direction: torch.Tensor | None = None,
               direction_name: str = "direction") -> Path:
    """Write the ICAT stage of ``model`` with ``saes`` {layer: sae_lens.SAE} on ``images`` (anything
    ``adapter.preprocess`` takes, or an (N, 3, H, W) tensor) with class ``labels`` (N,).

    Class graphs use the correctly classified images of each class (at most
    ``config.max_images_per_class``); routes and case studies as in the module docstring. Returns the
    stage directory. ``upstream`` (e.g. SAE and CAFE stage directories) is recorded in the manifest; by
    default the run's ``saes/<model>/<layer>`` and ``cafe/<model>/<layer>`` directories that exist.

    ``direction`` (K,): a headless backbone (or any model) explained along a direction of its output: one graph
    ``graphs/class_0`` rooted at ⟨output, direction⟩ (named ``direction_name``) over the first
    ``config.max_images_per_class`` images; ``labels`` are then unused and there are no case studies (they
    need classes). The direction is saved as ``direction.safetensors``.
    """
    adapter = get_adapter(model)
    cfg = config or ICATConfig()
    cfg.graph.steps = steps
    cfg.layers = order_layers(adapter, layers if layers is not None else (cfg.layers or list(saes)))
    if len(cfg.layers) < 1:
        raise SaeCafeError("build_icat needs SAEs for at least one layer")
    for key, sae in saes.items():  # a class-token-only SAE is refused before any work (attribute.check_patch_sae)
        check_patch_sae(sae, key)
    name = model_name or adapter.name
    x = adapter.preprocess(images)
    readout = None
    if direction is not None:
        readout = torch.as_tensor(direction).detach().float().flatten()[None].to(x.device)  # (1, K)
        labels = torch.zeros(len(x), dtype=torch.long, device=x.device)  # every image explains the one root
        pred, classes, cfg.cases = labels.clone(), [0], False
    else:
        labels = torch.as_tensor(labels).long().to(x.device)
        pred = _predict(adapter, x)
    final = stage_path(run, "icat", name, root=root)
    if upstream is None:
        upstream = {}
        for layer in cfg.layers:
            for kind in ("saes", "cafe"):
                p = stage_path(run, kind, name, layer, root=root)
                if p.exists():
                    upstream[f"{kind}/{layer}"] = p
    # concept labels of the CAFE stages (nodes get "concept"; graphs/supernodes/ holds supernode-collapsed graphs)
    concepts, supers = cafe_concepts({n: stage_path(run, "cafe", name, n, root=root) for n in cfg.layers})
    with stage_dir(final) as tmp:
        gdir = tmp / "graphs"
        gdir.mkdir()
        routes, graphs = {}, []
        cls_list = sorted(set(labels.tolist())) if classes is None else list(classes)
        for c in tqdm(cls_list, desc=f"icat class graphs {name}", leave=False):
            idx = ((labels == c) & (pred == c)).nonzero()[:, 0][:cfg.max_images_per_class]
            if len(idx) == 0:
                continue
            cname = (direction_name if readout is not None
                     else adapter.class_names[c] if adapter.class_names else str(c))
            G = build_graph(adapter, saes, x[idx], cfg.layers, int(c), cfg.graph, readout=readout,
                            root_label=f"⟨output, {direction_name}⟩" if readout is not None else None)
            annotate_concepts(G, concepts)
            r = dominant_route(G)
            write_graph(G, gdir, f"class_{c}")
            if supers:
                write_graph(collapse_graph(G, supers), gdir / "supernodes", f"class_{c}")
            graph_figure(G, gdir / f"class_{c}", r, f"{name}: class {cname} ({len(idx)} images)",
                         label_fn=concept_node_label)
            routes[str(c)] = {"class_name": cname, "n_images": len(idx), **_route_json(G, r)}
            graphs.append(G)
        if graphs:
            write_graph(nx.compose_all(graphs), gdir, "dataset")
        atomic_write_json(tmp / "routes.json", routes)
        if supers:
            atomic_write_json(tmp / "supernodes.json", {k: v.to_json() for k, v in supers.items()})
        cases = {}
        if cfg.cases:
            (tmp / "cases").mkdir()
            cases = case_studies(adapter, saes, x, labels, cfg, tmp / "cases", pred,
                                 annotate=lambda G: annotate_concepts(G, concepts))
        if readout is not None:
            from safetensors.torch import save_file

            save_file({"direction": readout[0].cpu().contiguous()}, str(tmp / "direction.safetensors"))
        write_manifest(tmp, "icat", asdict(cfg), upstream, model=name, layers=cfg.layers,
                       n_images=len(x),
                       accuracy=None if readout is not None else float((pred == labels).float().mean()),
                       target=({"kind": "direction", "name": direction_name, "file": "direction.safetensors"}
                               if readout is not None else {"kind": "class"}),
                       classes=list(routes), cases=sorted(cases),
                       **{MODEL_RECORD: record_for(adapter).to_json()})
    return final
