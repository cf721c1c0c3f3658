"""``sae-cafe graph`` (build the ICAT stage) and ``sae-cafe routes`` (print dominant routes and cases)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli_help import HelpFormatter, add_common

    g = subparsers.add_parser("graph", help="ICAT concept graphs, dominant routes and case studies "
                                            "→ <root>/<run>/icat/<model>/", formatter_class=HelpFormatter)
    add_common(g)
    g.add_argument("--layers", nargs="*", default=None,
                   help="analysed layers (default: every SAE under <root>/<run>/saes/<model>/)")
    g.add_argument("--images", default=None,
                   help="image folder (ImageFolder class names = labels, or flat: the model's predictions "
                        "become labels); default: the run's concept world <root>/<run>/world")
    g.add_argument("--n-images", type=int, default=240, help="images to use (the first N)")
    g.add_argument("--per-class", type=int, default=16, help="images per class graph")
    g.add_argument("--classes", type=int, nargs="*", default=None, help="class graphs to build (default: all)")
    g.add_argument("--method", default="ig", choices=("ig", "grad", "grad_x_input", "ablation", "random"),
                   help="attribution method of the graph edges")
    g.add_argument("--steps", type=int, default=32, help="IG steps")
    g.add_argument("--baseline", default="zeros", choices=("zeros", "mean"), help="IG baseline")
    g.add_argument("--top-k", type=int, default=5, help="parents kept per node")
    g.add_argument("--max-nodes", type=int, default=8, help="nodes kept per layer")
    g.add_argument("--attack", default="pgd", choices=("pgd", "fgsm"), help="attack of the adversarial case")
    g.add_argument("--eps", type=float, default=8.0, help="attack ε in grey levels /255")
    g.add_argument("--no-cases", action="store_true", help="skip the case studies")
    g.set_defaults(func=_graph)

    r = subparsers.add_parser("routes", help="print the dominant routes and case studies of an ICAT stage",
                              formatter_class=HelpFormatter)
    add_common(r, weights=False, device=False)
    r.add_argument("--class", dest="cls", type=int, default=None, help="only this class (default: all)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=_routes)


def _load_images(args, adapter):
    import torch

    from ..artifacts import run_dir
    from ..images import iter_image_files, load_image
    from ..labels import class_names_for, resolve_labels

    if args.images is None:
        from ..world import load_world

        world = load_world(run_dir(args.run, args.root))
        n = min(args.n_images, len(world))
        imgs = [world.world.images[i] for i in range(n)]
        labels = torch.as_tensor(world.world.labels[:n]).long()
        return adapter.preprocess(imgs), labels
    files = iter_image_files(args.images)[:args.n_images]
    x = adapter.preprocess([load_image(p) for p, _ in files])
    classes = [c for _, c in files]
    mode = "predicted" if all(c is None for c in classes) else "class_names"
    with torch.no_grad():  # the one label policy: class folders must be the model's class names
        lab = resolve_labels(mode, classes, class_names_for(adapter), predict=lambda: adapter(x).argmax(1),
                             model=adapter.name, where=str(args.images), num_classes=adapter.num_classes)
    print(f"note: {lab.decision.note}")
    return x, torch.tensor(lab.ids)


def _graph(args) -> int:
    from ..artifacts import is_finished, run_dir, stage_path
    from ..errors import ArtifactError
    from ..model_record import resolve_run_model
    from ..saes import load_sae
    from .graph import GraphConfig
    from .pipeline import ICATConfig, build_icat, order_layers

    adapter = resolve_run_model(run_dir(args.run, args.root), args.model, args.weights, args.device)
    sae_root = stage_path(args.run, "saes", args.model, root=args.root)
    if args.layers:
        layers = [adapter.resolve_layer(n) for n in args.layers]
    else:
        layers = [p.name for p in sorted(sae_root.iterdir())] if sae_root.is_dir() else []
        layers = [n for n in layers if not n.startswith(".") and is_finished(sae_root / n)]
    if not layers:
        raise ArtifactError(f"no SAEs under {sae_root}; train them first (`sae-cafe train-sae`) or pass "
                            "--layers for layers that have one")
    layers = order_layers(adapter, layers)
    saes = {n: load_sae(stage_path(args.run, "saes", args.model, n, root=args.root), adapter, n)
            for n in layers}
    x, labels = _load_images(args, adapter)
    cfg = ICATConfig(layers=layers, graph=GraphConfig(method=args.method, steps=args.steps,
                                                      baseline=args.baseline, top_k=args.top_k,
                                                      max_nodes_per_layer=args.max_nodes),
                     max_images_per_class=args.per_class, attack=args.attack, eps=args.eps / 255,
                     cases=not args.no_cases)
    out = build_icat(adapter, saes, x, labels, args.run, root=args.root, steps=args.steps, config=cfg,
                     model_name=args.model, classes=args.classes)
    print(f"wrote ICAT graphs, routes and case studies to {out}")
    return _print_routes(out, None, False)


def _print_routes(stage: Path, cls: int | None, as_json: bool) -> int:
    routes = json.loads((stage / "routes.json").read_text())
    cases_p = stage / "cases.json"
    cases = json.loads(cases_p.read_text()) if cases_p.exists() else {}
    if cls is not None:
        routes = {k: v for k, v in routes.items() if int(k) == cls}
    if as_json:
        print(json.dumps({"routes": routes, "cases": cases}, indent=2))
        return 0
    for c, r in routes.items():
        print(f"class {c} ({r['class_name']}, {r['n_images']} images): " + " ← ".join(r["nodes"])
              + f"  (share product {r['score']:.3g})")
    for name, case in cases.items():
        extra = ""
        if "divergence_layer" in case:
            extra = (f"; diverges at {case['divergence_layer']}, route Jaccard {case['route_jaccard']:.2f}, "
                     f"graph Jaccard {case['graph_jaccard']:.2f}")
        print(f"{name}: {case['title']}: " + " ← ".join(case["route"]["nodes"]) + extra)
    return 0


def _routes(args) -> int:
    from ..artifacts import read_manifest, stage_path

    stage = stage_path(args.run, "icat", args.model, root=args.root)
    read_manifest(stage, "icat")
    return _print_routes(stage, args.cls, args.json)
