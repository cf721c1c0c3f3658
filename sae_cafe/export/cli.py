"""``sae-cafe export parquet`` (exemplar ledgers of a run's CAFE stages), ``sae-cafe export html`` (the
self-contained HTML atlas of a run) and ``sae-cafe export all`` (both, e.g. after ``make demo``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli_help import HelpFormatter, add_common

    p = subparsers.add_parser("export", help="portable exports of a run: Parquet exemplar ledgers, HTML atlas",
                              formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="export_kind", metavar="KIND", required=True)
    q = sub.add_parser("parquet", help="one Parquet ledger per CAFE stage (one row per exemplar) → "
                                       "<root>/<run>/export/ledger_<model>_<layer>.parquet",
                       formatter_class=HelpFormatter)
    add_common(q, model_required=False, weights=False, device=False)
    q.add_argument("--out-dir", default=None, help="output folder (default: <root>/<run>/export)")
    q.set_defaults(func=_parquet)
    h = sub.add_parser("html", help="static self-contained HTML atlas (cards, labels, class graphs; no server, "
                                    "no network) → <root>/<run>/export/atlas.html", formatter_class=HelpFormatter)
    add_common(h, model_required=False, weights=False, device=False)
    h.add_argument("--out", default=None, help="output file (default: <root>/<run>/export/atlas.html)")
    h.add_argument("--max-mb", type=float, default=25.0,
                   help="size cap in MB; exemplars per card are thinned to stay under it")
    h.add_argument("--exemplars", type=int, default=6, help="exemplars per card (before thinning)")
    h.set_defaults(func=_html)
    a = sub.add_parser("all", help="both: the Parquet ledgers and the HTML atlas → <root>/<run>/export/",
                       formatter_class=HelpFormatter)
    add_common(a, model_required=False, weights=False, device=False)
    a.add_argument("--max-mb", type=float, default=25.0, help="size cap of the atlas in MB")
    a.set_defaults(func=_all, out_dir=None, out=None, exemplars=6)


def _parquet(args) -> int:
    from .ledger import export_run_ledgers

    for path in export_run_ledgers(args.run, args.root, args.out_dir):
        print(path)
    return 0


def _html(args) -> int:
    from .html_atlas import export_html

    path = export_html(args.run, args.root, args.out, max_bytes=int(args.max_mb * 2**20), n_exemplars=args.exemplars)
    print(f"{path} ({path.stat().st_size / 2**20:.2f} MB)")
    return 0


def _all(args) -> int:
    return _parquet(args) or _html(args)
