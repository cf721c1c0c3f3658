"""``sae-cafe graph`` (build the ICAT stage) and ``sae-cafe routes`` (print dominant routes and cases)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser("graph", help="ICAT concept graphs, dominant routes and case studies "
                                            "→ indexes/<run>/icat/<model>/")
    g.add_argument("--run", default="demo", help="run name (default: demo)")
    g.add_argument("--model", required=True, help="registered model name (e.g. mini_resnet)")
    g.add_argument("--weights", default=None, help="local weights file (default: the model's shipped weights)")
    g.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    g.add_argument("--layers", nargs="*", default=None,
                   help="analysed layers (default: every SAE under <run>/saes/<model>/)")
    g.add_argument("--images", default=None,
                   help="image folder (ImageFolder class names = labels); default: the run's concept world")
    g.add_argument("--n-images", type=int, default=240, help="images to use (default 240)")
    g.add_argument("--per-class", type=int, default=16, help="images per class graph (default 16)")
    g.add_argument("--classes", type=int, nargs="*", default=None, help="class graphs to build (default all)")
    g.add_argument("--method", default="ig", choices=("ig", "grad", "grad_x_input", "ablation", "random"))
    g.add_argument("--steps", type=int, default=32, help="IG steps (default 32)")
    g.add_argument("--baseline", default="zeros", choices=("zeros", "mean"))
    g.add_argument("--top-k", type=int, default=5, help="parents kept per node (default 5)")
    g.add_argument("--max-nodes", type=int, default=8, help="nodes kept per layer (default 8)")
    g.add_argument("--attack", default="pgd", choices=("pgd", "fgsm"))
    g.add_argument("--eps", type=float, default=8.0, help="attack ε in grey levels /255 (default 8)")
    g.add_argument("--no-cases", action="store_true", help="skip the case studies")
    g.set_defaults(func=_graph)

    r = subparsers.add_parser("routes", help="print the dominant routes and case studies of an ICAT stage")
    r.add_argument("--run", default="demo")
    r.add_argument("--model", required=True)
    r.add_argument("--root", default=None)
    r.add_argument("--class", dest="cls", type=int, default=None, help="only this class")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=_routes)


def _load_images(args, adapter):
    import torch

    from ..artifacts import run_dir
    from ..errors import SaeCafeError
    from ..images import iter_image_files, load_image

    if args.images is None:
        from ..world import load_world

        world = load_world(run_dir(args.run, args.root))
        n = min(args.n_images, len(world))
        imgs = [world.world.images[i] for i in range(n)]
        labels = torch.as_tensor(world.world.labels[:n]).long()
        return adapter.preprocess(imgs), labels
    files = iter_image_files(args.images)[:args.n_images]
    x = adapter.preprocess([load_image(p) for p, _ in files])
    names = adapter.class_names or []
    if all(c in names for _, c in files):
        labels = torch.tensor([names.index(c) for _, c in files])
    else:
        if any(c is not None for _, c in files):
            raise SaeCafeError(f"{args.images}: class folders {sorted({c for _, c in files})[:5]}… are not "
                               f"classes of {adapter.name}; use a flat folder (predictions become labels)")
        with torch.no_grad():
            labels = adapter(x).argmax(1)
    return x, labels


def _graph(args) -> int:
    from ..artifacts import is_finished, stage_path
    from ..errors import ArtifactError
    from ..models import load_model
    from ..saes import load_sae
    from .graph import GraphConfig
    from .pipeline import ICATConfig, build_icat, order_layers

    adapter = load_model(args.model, args.weights)
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
