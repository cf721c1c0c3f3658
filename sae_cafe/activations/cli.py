"""``sae-cafe extract``: PFV extraction into activation shards."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli_help import HelpFormatter, add_common

    p = subparsers.add_parser("extract", help="extract PFV activations of model layers into shards",
                              description="Run a model over images and store PFVs of one or more layers "
                                          "(one forward pass) in <root>/<run>/acts/<model>/<layer>/.",
                              formatter_class=HelpFormatter)
    add_common(p)
    p.add_argument("--images", required=True, help="image folder (flat, or ImageFolder: one sub-folder per "
                   "class) or one image file; recorded in the stage")
    p.add_argument("--layers", nargs="+", required=True, help="layer ids, e.g. layer3.1 blocks.5")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of the shards")
    p.add_argument("--shard-size", type=int, default=65536, help="PFV rows per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--tokens", default=None, choices=["patch", "all", "cls"],
                   help="ViT token rows to store: patch (grid positions; the default), all (also class/register/"
                        "distillation tokens) or cls; each row's kind is kept in the shards")
    p.add_argument("--include-cls", action="store_true", help="ViT: also store class/register tokens "
                   "(same as --tokens all)")
    p.add_argument("--outlier-k", type=float, default=10.0,
                   help="high-norm outlier tokens: norm > median + k·MAD of the image's patch-token norms "
                        "(reported in the manifest and flagged per row)")
    p.add_argument("--positions-per-image", type=int, default=None,
                   help="sample k positions per image (default: every position)")
    p.add_argument("--sampling", default="uniform", choices=["uniform", "logit"],
                   help="how --positions-per-image picks positions")
    p.add_argument("--seed", type=int, default=0, help="seed of the position sampling")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and report them")
    p.add_argument("--overwrite", action="store_true", help="re-extract finished stages")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..artifacts import run_dir
    from ..model_record import resolve_run_model
    from .extract import extract_activations
    from .shards import ShardReader

    adapter = resolve_run_model(run_dir(args.run, args.root), args.model, args.weights, args.device)
    dirs = extract_activations(adapter, args.images, args.layers, run=args.run, root=args.root, dtype=args.dtype,
                               shard_size=args.shard_size, batch_size=args.batch_size,
                               include_cls=args.include_cls, tokens=args.tokens, outlier_k=args.outlier_k,
                               positions_per_image=args.positions_per_image,
                               sampling=args.sampling, seed=args.seed, skip_bad=args.skip_bad,
                               overwrite=args.overwrite)
    table = Table(title=f"activations of {adapter.name}")
    for col in ("layer", "d_in", "grid", "images", "PFVs", "shards", "dtype", "directory"):
        table.add_column(col)
    for layer, d in dirs.items():
        r = ShardReader(d)
        table.add_row(layer, str(r.d_in), f"{r.grid[0]}×{r.grid[1]}", str(r.n_images), f"{r.n:,}",
                      str(len(r.shards)), r.manifest["dtype"], str(d))
    Console().print(table)
    for layer, d in dirs.items():
        note = (ShardReader(d).outlier_report or {}).get("note")
        if note:
            print(f"note: {layer}: {note}")
    return 0
