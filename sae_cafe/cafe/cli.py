"""``sae-cafe build-index`` and ``sae-cafe query`` (CAFE)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import run_dir, stage_path
from ..cli_help import HelpFormatter, add_common
from ..errors import SaeCafeError


def register(subparsers) -> None:
    p = subparsers.add_parser("build-index", help="CAFE: mine top-k exemplars of every SAE latent, anchor them "
                              "to SRD iERFs and index them with FAISS",
                              description="Build the CAFE stage <root>/<run>/cafe/<model>/<layer>. The stage records "
                                          "the model, its weights file and sha256, and the image folder; a run "
                                          "that already recorded other weights for this model is refused.",
                              formatter_class=HelpFormatter)
    _common(p)
    p.add_argument("--sae", required=True, help="SAE directory (sae-lens cfg.json + sae_weights.safetensors)")
    p.add_argument("--images", required=True, help="folder of images (flat, or ImageFolder: one sub-folder per "
                   "class); recorded in the stage so the viewer can show the exemplars")
    p.add_argument("--k", type=int, default=16, help="top exemplars kept per latent")
    p.add_argument("--all-positions", action="store_true",
                   help="top-k over (image, position) pairs instead of one exemplar per image")
    p.add_argument("--n-anchor", type=int, default=None,
                   help="exemplars per latent anchored to iERFs (≤ k; default: k)")
    p.add_argument("--n-sample", type=int, default=32, help="uniform-sample slots per latent (lower quantiles)")
    p.add_argument("--seed-mode", choices=("pfv", "actmap"), default="pfv",
                   help="iERF seed: one-hot at the exemplar PFV or the latent's activation map")
    p.add_argument("--index", default="Flat", help="FAISS index: Flat, IVF, IVF<nlist>,Flat, HNSW, HNSW<M>")
    p.add_argument("--batch-size", type=int, default=32, help="images per mining batch")
    p.add_argument("--cards", type=int, default=0, help="also write PNG concept cards of the N most frequent latents")
    p.set_defaults(func=_build)
    q = subparsers.add_parser("query", help="CAFE: search the concept atlas by example (image, optional box)",
                              description="Search the CAFE stage <root>/<run>/cafe/<model>/<layer> by example. The "
                                          "model runs with the weights the stage recorded; --weights must be that "
                                          "same file (another file is refused, naming both sha256 hashes).",
                              formatter_class=HelpFormatter)
    _common(q)
    q.add_argument("--sae", default=None, help="SAE directory (default: the one the CAFE stage recorded)")
    q.add_argument("--image", required=True, help="query image file (any size; preprocessed like the model's "
                   "inputs)")
    q.add_argument("--box", default=None, help="x0,y0,x1,y1 in original-image pixels (default: the whole image)")
    q.add_argument("--top", type=int, default=10, help="latents to return")
    q.add_argument("--json", default=None, help="also write the full result as JSON to this file")
    q.set_defaults(func=_query)


def _common(p) -> None:
    add_common(p)
    p.add_argument("--layer", required=True, help="layer id (module path, e.g. layer4, or ViT block index)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(args, stage_must_exist: bool):
    """The run's model (recorded weights, or ``--weights`` checked against them), layer, SAE and stage path."""
    from ..artifacts import read_manifest
    from ..model_record import ModelMismatchError, check_model, read_record, resolve_run_model
    from ..saes import load_sae
    from .build import model_hash

    adapter = resolve_run_model(run_dir(args.run, args.root), args.model, args.weights, args.device)
    layer = adapter.resolve_layer(args.layer)
    out = stage_path(args.run, "cafe", adapter.name, layer, root=args.root)
    sae_path = args.sae
    if stage_must_exist:
        m = read_manifest(out, "cafe")
        rec = read_record(m, str(out))
        if rec is not None:
            check_model(rec, adapter, f"the CAFE stage {out}")
        elif m.get("model_hash") and m["model_hash"] != model_hash(adapter):
            raise ModelMismatchError(f"the CAFE stage {out} was built with {m.get('model')} weights sha256 "
                                     f"{m['model_hash']}, but the model given has sha256 {model_hash(adapter)}; "
                                     "pass the weights file the stage was built with (--weights)")
        if sae_path is None:
            sae_path = m.get("sae_path")
            if not sae_path:
                raise SaeCafeError(f"{out} does not record its SAE; pass --sae")
    if sae_path is None:
        raise SaeCafeError("pass --sae (the SAE directory trained on this layer)")
    sae = load_sae(sae_path, adapter, layer, check_model=False)
    return adapter, layer, sae, out, sae_path


def _build(args) -> int:
    from .build import build_cafe
    from .cards import concept_card

    adapter, layer, sae, out, sae_path = _load(args, False)
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

    adapter, layer, sae, out, _ = _load(args, True)
    from ..model_record import record_for

    print(f"model: {record_for(adapter).describe()}")
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
