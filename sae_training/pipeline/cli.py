"""``sae-cafe demo``: one command from nothing to a browsable concept atlas (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_CONFIG_NAME, config_files, load_config
from .runner import Run


def register(subparsers: argparse._SubParsersAction) -> None:
    shipped = ", ".join(sorted(config_files()))
    p = subparsers.add_parser(
        "demo", help="build a complete concept atlas in one command (world, SRD, SAEs, CAFE, ICAT, "
                     "benchmark)",
        description="Generate the concept world (or reuse it), extract activations of the shipped mini "
                    "models, train small SAEs, build CAFE, ICAT graphs and the saliency benchmark into "
                    "<root>/<run>/, then print a per-stage timing table. Finished stages are skipped "
                    "unless their inputs or settings changed. With --config FILE the same pipeline runs on "
                    f"your model and images. Shipped configs (copies in configs/): {shipped}.")
    p.add_argument("--config", default=None, help="run TOML: model, weights, images, layers, SAE sizes… "
                   f"(default: the packaged {DEFAULT_CONFIG_NAME}, same as configs/{DEFAULT_CONFIG_NAME})")
    p.add_argument("--root", default=None, help="artifact root (default from the config: indexes)")
    p.add_argument("--run", default=None, help="run name (default from the config: demo)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default from the config: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fresh", action="store_true", help="rebuild every stage")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, {"root": args.root, "run": args.run, "device": args.device,
                                    "threads": args.threads})
    return Run(cfg, fresh=args.fresh).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m sae_training.pipeline`` (same as ``sae-cafe demo``)."""
    parser = argparse.ArgumentParser(prog="sae-cafe")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
