"""README tables equal what their committed results files render to (benchmarks/render_readme.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_readme", REPO / "benchmarks" / "render_readme.py")
render_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_readme)


def test_readme_blocks_match_results():
    text = (REPO / "README.md").read_text()
    blocks = render_readme.BLOCK.findall(text)
    assert len(blocks) >= 5, "README lost its generated result blocks"
    new, changed = render_readme.render_readme(text)
    assert changed == [], f"README disagrees with benchmarks/results/ in {changed}: run benchmarks/render_readme.py"
    assert new == text


def test_a_changed_number_is_caught(tmp_path):
    text = (REPO / "README.md").read_text()
    m = next(b for b in render_readme.BLOCK.finditer(text) if any(c.isdigit() for c in b["body"]))
    body = m["body"]
    digit = next(i for i, c in enumerate(body) if c.isdigit())
    tampered = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
    bad = text[:m.start("body")] + tampered + text[m.end("body"):]
    (tmp_path / "README.md").write_text(bad)
    assert render_readme.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1
    assert render_readme.main(["--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == text


def test_unknown_block_and_escape_refused():
    with pytest.raises(ValueError, match="unknown results block"):
        render_readme.render_block("tables everything")
    with pytest.raises(ValueError, match="outside the repository"):
        render_readme.render_block("file ../../etc/passwd")
