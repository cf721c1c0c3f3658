"""Every ``sae-cafe`` subcommand's ``--help``: it prints, every option is explained, each default is shown once
(never "(default: None)"), and the shared options (``--root``, ``--run``, ``--weights``) say what the paths are."""

from __future__ import annotations

import argparse

import pytest

from sae_cafe.cli import build_parser, main


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every (nested) subcommand's parser by its command line, e.g. ``"export html"``."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    out[f"{prefix}{name}"] = sp
                    walk(sp, f"{prefix}{name} ")

    walk(build_parser(), "")
    return dict(sorted(out.items()))


SUBCOMMANDS = list(subparsers())


def option_help(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line of one option as ``--help`` prints it (defaults expanded by the parser's formatter)."""
    return p._get_formatter()._get_help_string(action) % {**vars(action), "prog": p.prog} if action.help else ""


def test_every_subcommand_is_found():
    assert {"build-index", "query", "extract", "graph", "routes", "srd", "view", "demo"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_is_complete_and_shows_defaults_once(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([*name.split(), "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and "(default: None)" not in text
    p = subparsers()[name]
    problems = []
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue  # nested commands are walked on their own
        h = option_help(p, a)
        label = "/".join(a.option_strings) or a.dest
        if not h.strip():
            problems.append(f"{label}: no help text")
        if h.lower().count("default") > 1:
            problems.append(f"{label}: the default is shown twice: {h!r}")
        shown = a.option_strings and a.nargs != 0 and a.default not in (None, False, argparse.SUPPRESS) \
            and a.default != []
        if shown and "default" not in h.lower():
            problems.append(f"{label}: the default {a.default!r} is not shown")
        if "--root" in a.option_strings:
            assert "indexes" in h, h  # where the artifacts go (the config may set it)
    assert not problems, f"sae-cafe {name} --help: " + "; ".join(problems)


def test_specific_help_lines(capsys):
    for name, must in [("srd", ["--out", "indexes/srd"]), ("query", ["$SAE_CAFE_ROOT", "recorded"]),
                       ("view", ["kill PID"])]:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for m in must:
            assert m in out, (name, m)
