"""Stage ``icat/<model>``: ICAT concept graphs, routes and the correct / misclassified / adversarial case
studies (``sae_cafe.icat.build_icat``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .dag import Stage


@dataclass(frozen=True)
class ICATSettings:
    """ICAT graphs on a few dozen images with reduced IG steps, plus the three case studies."""

    n_images: int = 160
    """images loaded; class graphs use per_class × max_classes of them, the cases search all"""
    steps: int = 8
    """integrated-gradients steps"""
    per_class: int = 4
    """images per class graph"""
    max_classes: int | None = 6
    """class graphs of the first N classes present (None: all)"""
    top_k: int = 5
    """parents kept per node"""
    max_nodes: int = 8
    """nodes kept per layer"""
    attack: str = "pgd"
    """attack of the adversarial case: pgd | fgsm"""
    eps: float = 8.0
    """attack ε in grey levels (/255)"""
    cases: bool = True
    """build the correct / misclassified / adversarial case studies"""


def stages(ctx) -> list[Stage]:
    out = []
    for m in ctx.cfg.models:
        if m.icat:
            deps = [f"saes/{m.name}/{n}" for n in m.layers] + [f"cafe/{m.name}/{n}" for n in m.layers
                                                               if m.cafe] + ctx.image_deps()
            key = {"icat": ctx.cfg.icat, "labels": ctx.cfg.labels, "class_names": ctx.cfg.class_names,
                   "target": m.target}
            out.append(Stage(f"icat/{m.name}", deps, key,
                             lambda m=m: [ctx.stage_dir("icat", m.name)], lambda notes, m=m: build(ctx, m, notes)))
    return out


def build(ctx, m, notes: list[str]) -> dict[str, Any]:
    from sae_cafe.icat import GraphConfig, ICATConfig, build_icat
    from sae_cafe.saes import load_sae

    ad = ctx.adapter(m)
    layers = ctx.layers(m)
    saes = {n: load_sae(ctx.stage_dir("saes", m.name, n), ad, n, device=ctx.device) for n in layers}
    s = ctx.cfg.icat
    direction = ctx.direction(m) if m.target == "mean_direction" else None
    x, labels, _, _ = ctx.labelled_images(s.per_class if direction else s.n_images, ad, notes=notes,
                                          spread=direction is not None, label=direction is None)
    cfg = ICATConfig(layers=layers, graph=GraphConfig(steps=s.steps, top_k=s.top_k, max_nodes_per_layer=s.max_nodes),
                     max_images_per_class=s.per_class, attack=s.attack, eps=s.eps / 255, cases=s.cases)
    if direction is not None:
        notes.append(f"ICAT's last edge explains ⟨output, d⟩, d = the unit mean output over {direction['images']} "
                     f"images (mean norm {direction['norm']:.3g}); one graph over {len(x)} images spread over the "
                     "folders, no class graphs or case studies (they need classes)")
        out = build_icat(ad, saes, x.to(ctx.device), None, ctx.cfg.run, root=ctx.root, steps=s.steps, config=cfg,
                         model_name=m.name, direction=direction["d"], direction_name=direction["name"])
    else:
        classes = sorted(set(labels.tolist()))[: s.max_classes] if s.max_classes else None
        out = build_icat(ad, saes, x.to(ctx.device), labels, ctx.cfg.run, root=ctx.root, steps=s.steps,
                         config=cfg, model_name=m.name, classes=classes)
    man = json.loads((out / "manifest.json").read_text())
    cases = json.loads((out / "cases.json").read_text()) if (out / "cases.json").exists() else {}
    acc = man.get("accuracy")
    res = {"images": man.get("n_images"), "accuracy": round(float(acc), 3) if isinstance(acc, (int, float)) else acc,
           "class_graphs": len(man.get("classes", [])), "cases": sorted(cases),
           "adversarial_flipped": cases.get("adversarial", {}).get("flipped")}
    reasons = {}
    if res["accuracy"] in (0, 0.0):
        reasons["accuracy"] = (f"no prediction matches the labels (labels = {ctx.cfg.labels!r}"
                               + (f", {m.name} runs with random weights" if ctx.random_weights(m) else "")
                               + "); check that the labels are the model's classes, or use labels = 'predicted'")
    if not res["class_graphs"]:
        reasons["class_graphs"] = "no class had images to build a graph from (see the notes)"
    if s.cases and not cases and direction is None:
        reasons["cases"] = "no case found (a misclassified case needs a wrong prediction among the images)"
    if reasons:
        res["_reasons"] = reasons
    return res
