"""``sae-cafe`` command line. Subcommands are discovered from the ``sae_cafe.commands`` entry points.

Each plugin module exposes ``register(subparsers)`` which adds its subcommands and sets
``func=callable(args) -> int | None`` on each. User errors (:class:`SaeCafeError`) print one clear line.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .errors import SaeCafeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-cafe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="sae_cafe.commands"), key=lambda e: e.name):
        module = ep.value.split(":")[0]
        try:
            register = ep.load()
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # plugin module not present in this build
            raise
        register(sub)
    from .cli_help import HelpFormatter

    for sp in sub.choices.values():  # every subcommand shows each default once (sae_cafe.cli_help)
        sp.formatter_class = HelpFormatter
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        rc = args.func(args)
    except SaeCafeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept and a rerun resumes", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
