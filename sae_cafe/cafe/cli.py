"""``sae-cafe build-index`` and ``sae-cafe query`` (CAFE)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts import stage_path
from ..errors import SaeCafeError


def register(subparsers) -> None:
    p = subparsers.add_parser("build-index", help="CAFE: mine top-k exemplars of every SAE latent, anchor them "
                              "to SRD iERFs and index them with FAISS",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.add_argument("--sae", required=True, help="SAE directory (sae-lens cfg.json + sae_weights.safetensors)")
    p.add_argument("--images", required=True, help="folder of images (flat or ImageFolder)")
    p.add_argument("--k", type=int, default=16, help="top exemplars kept per latent")
    p.add_argument("--all-positions", action="store_true",
                   help="top-k over (image, position) pairs instead of one exemplar per image")
    p.add_argument("--n-anchor", type=int, default=None, help="exemplars per latent anchored to iERFs (≤ k)")
    p.add_argument("--n-sample", type=int, default=32, help="uniform-sample slots per latent (lower quantiles)")
    p.add_argument("--seed-mode", choices=("pfv", "actmap"), default="pfv",
                   help="iERF seed: one-hot at the exemplar PFV or the latent's activation map")
    p.add_argument("--index", default="Flat", help="FAISS index: Flat, IVF, IVF<nlist>,Flat, HNSW, HNSW<M>")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cards", type=int, default=0, help="also write PNG concept cards of the N most frequent latents")
    p.set_defaults(func=_build)
    q = subparsers.add_parser("query", help="CAFE: search the concept atlas by example (image, optional box)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(q)
    q.add_argument("--sae", default=None, help="SAE directory (default: the one recorded by build-index)")
    q.add_argument("--image", required=True, help="query image file")
    q.add_argument("--box", default=None, help="x0,y0,x1,y1 in original-image pixels")
    q.add_argument("--top", type=int, default=10, help="latents to return")
    q.add_argument("--json", default=None, help="write the full result as JSON here")
    q.set_defaults(func=_query)


def _common(p) -> None:
    p.add_argument("--run", required=True, help="run name (artifacts under <root>/<run>/cafe/<model>/<layer>)")
    p.add_argument("--root", default=None, help="artifact root (default indexes/ or $SAE_CAFE_ROOT)")
    p.add_argument("--model", required=True, help="model name (see load_model)")
    p.add_argument("--weights", default=None, help="local weights file (default: the model's shipped weights)")
    p.add_argument("--layer", required=True, help="layer id (module path or ViT block index)")
    p.add_argument("--no-progress", action="store_true")


def _load(args):
    from ..models import load_model
    from ..saes import load_sae

    adapter = load_model(args.model, weights=args.weights)
    layer = adapter.resolve_layer(args.layer)
    out = stage_path(args.run, "cafe", adapter.name, layer, root=args.root)
    sae_path = args.sae
    if sae_path is None:
        from ..artifacts import read_manifest

        sae_path = read_manifest(out, "cafe").get("sae_path")
        if not sae_path:
            raise SaeCafeError(f"{out} does not record its SAE; pass --sae")
    sae = load_sae(sae_path, adapter, layer, check_model=False)
    return adapter, layer, sae, out, sae_path


def _build(args) -> int:
    from .build import build_cafe
    from .cards import concept_card

    adapter, layer, sae, out, sae_path = _load(args)
    cafe = build_cafe(adapter, sae, layer, args.images, out_dir=out, k=args.k, n_anchor=args.n_anchor,
                      distinct_images=not args.all_positions,
                      n_sample=args.n_sample, seed_mode=args.seed_mode, index=args.index,
                      batch_size=args.batch_size, progress=not args.no_progress,
                      upstream={"sae": sae_path}, extra_manifest={"sae_path": str(sae_path)})
    t = cafe.manifest["timings"]
    print(f"{cafe}\n  written to {out}\n  iERFs: {t['n_ierf']} at {t['ierf_per_s']:.1f}/s; "
          f"mining {t['mine_s']:.1f}s, anchoring {t['anchor_s']:.1f}s")
    if args.cards:
        freq = cafe.latents["firing_frequency"]
        for s in freq.argsort(descending=True)[:args.cards].tolist():
            c = concept_card(cafe, s, model=adapter, png=out / "cards" / f"latent_{s:05d}.png")
            print(f"  card {c['png']}")
    return 0


def _query(args) -> int:
    from .query import query

    adapter, layer, sae, out, _ = _load(args)
    res = query(out, adapter, sae, Path(args.image), box=args.box, k_latents=args.top)
    print(f"{len(res.positions)} PFV(s) selected at {layer}" + (f" (box {args.box})" if args.box else ""))
    print("matching latents (nearest exemplars):")
    for m in res.matches:
        ex = ", ".join(f"{e['image_name']}@({e['row']},{e['col']})" for e in m["exemplars"][:3])
        print(f"  latent {m['latent']:6d}  cos {m['score']:.3f}  hits {m['hits']:4d}  exemplars: {ex}")
    print("the image's own top latents:")
    for o in res.own_latents:
        print(f"  latent {o['latent']:6d}  activation {o['activation']:.3f} at {tuple(o['position'])}")
    if args.json:
        from ..artifacts import atomic_write_json

        atomic_write_json(args.json, res.to_json())
        print(f"written {args.json}")
    return 0
