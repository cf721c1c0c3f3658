"""Checked lineage: typed manifests, stale upstream detected (error naming both hashes, rebuild inside the
pipeline), finished manifests never rewritten, notes and warnings printed under the stage they concern."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from sae_cafe.artifacts import (
    MANIFEST,
    Manifest,
    UpstreamRef,
    check_upstream,
    hash_file,
    is_finished,
    load_manifest,
    read_manifest,
    write_manifest,
)
from sae_cafe.errors import ArtifactError
from sae_training.pipeline import Pipeline, Stage


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


def test_manifest_is_a_typed_frozen_record(tmp_path):
    up = tmp_path / "run" / "acts" / "m" / "l"
    up.mkdir(parents=True)
    write_manifest(up, "acts", {"n": 1})
    down = tmp_path / "run" / "saes" / "m" / "l"
    down.mkdir(parents=True)
    d = write_manifest(down, "saes", {"k": 4}, {"acts": up}, model="m", counts={"n": 3})
    m = load_manifest(down, "saes")
    assert isinstance(m, Manifest) and m.kind == "saes" and m.extra == {"model": "m", "counts": {"n": 3}}
    assert m.upstream["acts"] == UpstreamRef(str(up), hash_file(up / MANIFEST), "../../../acts/m/l")
    assert m.to_dict() == d == read_manifest(down)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.kind = "cafe"
    with pytest.raises(ArtifactError, match="clash"):
        write_manifest(down, "saes", {}, None, created_at="yesterday")
    bad = dict(d, upstream={"acts": {"hash": 3}})
    with pytest.raises(ArtifactError, match="upstream 'acts'"):
        Manifest.from_dict(bad, "x")


def test_stale_upstream_is_an_error_naming_both_hashes(tmp_path):
    up, down = tmp_path / "run" / "acts", tmp_path / "run" / "saes"
    up.mkdir(parents=True)
    down.mkdir()
    write_manifest(up, "acts", {"n": 1})
    old = hash_file(up / MANIFEST)
    write_manifest(down, "saes", {}, {"acts": up})
    read_manifest(down)  # consistent
    write_manifest(up, "acts", {"n": 2})  # the upstream is rebuilt
    new = hash_file(up / MANIFEST)
    with pytest.raises(ArtifactError, match="stale") as e:
        read_manifest(down, "saes")
    assert old in str(e.value) and new in str(e.value) and "acts" in str(e.value)
    assert is_finished(down)  # finished, just stale
    assert load_manifest(down, check_lineage=False).kind == "saes"
    # a moved run folder: the upstream is found again through its relative path
    write_manifest(down, "saes", {}, {"acts": up})
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "run"), moved)
    assert check_upstream(moved / "saes", read_manifest(moved / "saes", check_lineage=False)) == []
    # an upstream that is gone cannot be checked: a visible warning, not silence
    shutil.rmtree(moved / "acts")
    with pytest.warns(UserWarning, match="gone"):
        read_manifest(moved / "saes")


def _stage(tmp: Path, name: str, deps: list[str], calls: list[str], upstream: dict | None = None,
           notes_to_add: tuple[str, ...] = (), warn: str | None = None) -> Stage:
    out = tmp / name

    def build(notes):
        calls.append(name)
        notes.extend(notes_to_add)
        if warn:
            warnings.warn(warn, stacklevel=1)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, "world", {"name": name}, upstream)
        return {"n": len(calls)}

    return Stage(name, deps, {"v": 1}, lambda: [out], build)


def test_pipeline_never_rewrites_finished_manifests_and_rebuilds_stale_stages(tmp_path):
    state = tmp_path / "pipeline_state.json"

    def run(stages_of):
        calls: list[str] = []
        pipe = Pipeline(False, _console()[0], state)
        for st in stages_of(calls):
            pipe.run(st)
        return calls, {n: r.status for n, r in pipe.results.items()}

    both = lambda calls: [_stage(tmp_path, "a", [], calls),  # noqa: E731
                          _stage(tmp_path, "b", [], calls, upstream={"a": tmp_path / "a"})]
    assert run(both)[0] == ["a", "b"]
    before = {n: ((tmp_path / n / MANIFEST).read_bytes(), (tmp_path / n / MANIFEST).stat().st_mtime_ns)
              for n in "ab"}
    calls, st = run(both)
    assert calls == [] and set(st.values()) == {"skipped"}
    after = {n: ((tmp_path / n / MANIFEST).read_bytes(), (tmp_path / n / MANIFEST).stat().st_mtime_ns)
             for n in "ab"}
    assert after == before  # skipped stages' manifests are left as they are
    saved = json.loads(state.read_text())["outputs"]
    assert saved[str(tmp_path / "b")]["manifest"] == hash_file(tmp_path / "b" / MANIFEST)
    # "a" rebuilt outside this pipeline (which now only runs "b", same key): b's lineage check makes it stale
    only_b = lambda calls: [_stage(tmp_path, "b", [], calls, upstream={"a": tmp_path / "a"})]  # noqa: E731
    assert run(only_b)[0] == []
    write_manifest(tmp_path / "a", "world", {"name": "a", "by": "hand"})
    calls, st = run(only_b)
    assert calls == ["b"] and st == {"b": "built"}
    read_manifest(tmp_path / "b")  # consistent again


def test_notes_and_warnings_print_under_their_stage(tmp_path):
    con, buf = _console()
    pipe = Pipeline(False, con, tmp_path / "state.json")
    calls: list[str] = []
    pipe.run(_stage(tmp_path, "s1", [], calls, notes_to_add=("batch capped",), warn="index fell back"))
    pipe.run(_stage(tmp_path, "s2", [], calls))
    text = buf.getvalue()
    r = pipe.results["s1"]
    assert r.notes == ["batch capped", "warning: index fell back"] and not pipe.results["s2"].notes
    i1, i2 = text.index("s1"), text.index("─ s2 ─") if "─ s2 ─" in text else text.rindex("s2")
    assert i1 < text.index("batch capped") < i2 and i1 < text.index("index fell back") < i2
    # a skipped stage keeps its notes in the state (and so in the report)
    pipe = Pipeline(False, _console()[0], tmp_path / "state.json")
    r = pipe.run(_stage(tmp_path, "s1", [], calls))
    assert r.status == "skipped" and r.notes == ["batch capped", "warning: index fell back"]
