"""Render the README's result tables from the committed results under ``benchmarks/results/``.

A table in README.md that comes from a results file stands between two markers::

    <!-- results: saliency mini_resnet -->
    ...generated...
    <!-- /results -->

Kinds of block (the words after ``results:``):

- ``saliency MODEL``: the saliency table of ``benchmarks/results/saliency/MODEL/table.csv`` (the newest
  definition set the folder holds first: ``table_source.csv``, ``table_paper.csv``, else ``table.csv``);
- ``attack MODEL [MODEL …]``: the manipulation-attack table from each model's ``attack.csv``;
- ``file PATH``: the verbatim contents of a committed Markdown file (``PATH`` relative to the repository).

    .venv/bin/python benchmarks/render_readme.py            # rewrite README.md in place
    .venv/bin/python benchmarks/render_readme.py --check    # exit 1 (and name the blocks) when README is stale

``tests/test_readme_results.py`` runs the check, so a README number that disagrees with its results file fails
``make test``.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saliency_tables import render, render_attack, tables  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


class StaleReadme(Exception):
    """A README block that does not match what its results file renders to."""


def render_block(spec: str) -> str:
    """The Markdown a block's spec renders to (ending with a newline)."""
    kind, *args = spec.split()
    if kind == "saliency" and len(args) == 1:
        found = tables(RESULTS / "saliency" / args[0])
        return render(found[0][1]) + "\n"
    if kind == "attack" and args:
        rows = {m: list(csv.DictReader((RESULTS / "saliency" / m / "attack.csv").open())) for m in args}
        return render_attack(rows) + "\n"
    if kind == "file" and len(args) == 1:
        path = (REPO / args[0]).resolve()
        if REPO not in path.parents:
            raise ValueError(f"results block {spec!r}: {args[0]} lies outside the repository")
        text = path.read_text()
        return text if text.endswith("\n") else text + "\n"
    raise ValueError(f"unknown results block {spec!r}: expected 'saliency MODEL', 'attack MODEL…' or 'file PATH'")


def render_readme(text: str) -> tuple[str, list[str]]:
    """(README text with every block re-rendered, specs of the blocks that changed)."""
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        body = render_block(m["spec"])
        if body != m["body"]:
            changed.append(m["spec"])
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 when a block is stale")
    p.add_argument("--readme", type=Path, default=REPO / "README.md", help="the README to render")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new, changed = render_readme(text)
    if args.check:
        if changed:
            print("stale README blocks (run benchmarks/render_readme.py): " + "; ".join(changed))
            return 1
        print(f"{len(BLOCK.findall(text))} README result blocks match benchmarks/results/")
        return 0
    if changed:
        args.readme.write_text(new)
    print(f"re-rendered {len(changed)} block(s)" + (": " + "; ".join(changed) if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
