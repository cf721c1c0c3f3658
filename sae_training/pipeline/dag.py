"""The stage DAG runner: skip / build / fail / block bookkeeping, notes and the pipeline state file.

A stage is up to date when ``<run>/pipeline_state.json`` records, for every one of its output directories,
the stage's current key (a hash of its settings and of its dependencies' keys and output manifests) and
the sha256 of the manifest the output has now. Finished manifests are never rewritten: the state lives in
its own file, and a stage rebuilt by hand (a new manifest) makes its dependants stale. Reading an output's
manifest also checks its recorded upstream hashes (``sae_cafe.artifacts.check_upstream``), so an output
built from a since-rebuilt upstream is rebuilt too.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE = "pipeline_state.json"
STATE_VERSION = 1
DEV_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@dataclass
class Stage:
    """One step of the pipeline.

    ``name``: ``kind/model[/layer]``; ``deps``: names of the stages it reads; ``config``: the settings its
    key hashes; ``outputs()``: its stage directories; ``build(notes)`` → key metrics, ``notes`` a list the
    builder appends user-facing notes to; ``reuse(outputs)``: accept finished outputs built outside the
    pipeline (e.g. a world written by ``sae-cafe make-world`` with the same settings)."""

    name: str
    deps: list[str]
    config: dict[str, Any]
    outputs: Callable[[], list[Path]]
    build: Callable[[list[str]], dict[str, Any]]
    reuse: Callable[[list[Path]], bool] | None = None


@dataclass
class StageResult:
    """What happened to a stage: ``status`` built | skipped | failed | blocked; ``notes``: the notes and
    warnings printed under it; ``reasons``: metric name → why its value is NaN/0/None."""

    name: str
    status: str
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    key: str | None = None
    manifests: list[str | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


def short_error(e: BaseException) -> str:
    """``Type: first line of the message`` (≤ 300 characters)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


class _Notes(list):
    """The notes list handed to a stage builder: each note is printed (and kept) as it is appended."""

    def __init__(self, show: Callable[[str], None]):
        super().__init__()
        self._show = show

    def append(self, text: str) -> None:
        super().append(text)
        self._show(text)

    def extend(self, texts) -> None:
        for t in texts:
            self.append(t)


def _call_build(build: Callable, notes: list[str]) -> dict[str, Any]:
    """``build(notes)``, or ``build()`` for a builder that takes no notes list."""
    import inspect

    try:
        takes = bool(inspect.signature(build).parameters)
    except (TypeError, ValueError):
        takes = True
    return build(notes) if takes else build()


def _manifest_hash(directory: Path) -> str | None:
    """sha256 of a finished, lineage-consistent output's manifest; None when it is missing, unreadable or
    stale (its upstream changed)."""
    from sae_cafe.artifacts import MANIFEST, hash_file, load_manifest
    from sae_cafe.errors import ArtifactError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a gone upstream is reported by the stage that reads it
            load_manifest(directory)
    except ArtifactError:
        return None
    return hash_file(directory / MANIFEST)


class PipelineState:
    """``<run>/pipeline_state.json``: output directory → {stage, key, manifest sha256, metrics, notes,
    reasons} of the last successful build. Written after every stage (atomic), so an interrupted run
    keeps the bookkeeping of the stages it finished."""

    def __init__(self, path: Path):
        import json

        self.path = Path(path)
        self.outputs: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == STATE_VERSION:
                    self.outputs = dict(data.get("outputs") or {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                self.outputs = {}  # a corrupt state only costs rebuilds; its stages are rebuilt

    def up_to_date(self, outs: list[Path], key: str, hashes: list[str | None]) -> dict[str, Any] | None:
        entries = [self.outputs.get(str(o)) for o in outs]
        if outs and all(e is not None and e.get("key") == key and h is not None and e.get("manifest") == h
                        for e, h in zip(entries, hashes)):
            return entries[0]
        return None

    def record(self, r: StageResult) -> None:
        from sae_cafe.artifacts import atomic_write_json

        for o, h in zip(r.outputs, r.manifests):
            self.outputs[o] = {"stage": r.name, "key": r.key, "manifest": h, "metrics": r.metrics,
                               "notes": r.notes, "reasons": r.reasons}
        atomic_write_json(self.path, {"version": STATE_VERSION, "outputs": self.outputs})


class Pipeline:
    """Runs stages in order with skip/fail/block bookkeeping, timing and notes printed under each stage.

    ``state_path``: the pipeline state file (default: none kept, every stage is built)."""

    def __init__(self, fresh: bool, console, state_path: Path | None = None):
        self.fresh, self.console = fresh, console
        self.results: dict[str, StageResult] = {}
        self.state = PipelineState(state_path) if state_path is not None else None

    def _note(self, r: StageResult, text: str, style: str = "yellow") -> None:
        r.notes.append(text)
        self.console.print(f"  [{style}]note[/{style}] ({r.name}): {text}")

    def run(self, stage: Stage) -> StageResult:
        from sae_cafe.artifacts import hash_json

        bad = [d for d in stage.deps if d in self.results and self.results[d].status in ("failed", "blocked")]
        if bad:
            r = StageResult(stage.name, "blocked", error=f"needs {', '.join(bad)}")
            self.results[stage.name] = r
            self.console.print(f"[yellow]- {stage.name}: blocked (needs {', '.join(bad)})")
            return r
        t0 = time.perf_counter()
        r = StageResult(stage.name, "built")
        try:
            outs = stage.outputs()
            dep_info = {d: {"key": self.results[d].key, "manifests": self.results[d].manifests}
                        for d in stage.deps if d in self.results}
            key = hash_json({"stage": stage.name, "config": stage.config, "deps": dep_info})
            r.key, r.outputs = key, [str(o) for o in outs]
            hashes = [_manifest_hash(o) for o in outs]
            prev = None if self.fresh or self.state is None else self.state.up_to_date(outs, key, hashes)
            if prev is None and not self.fresh and stage.reuse is not None and hashes and all(hashes) \
                    and stage.reuse(outs):
                prev = {"metrics": {"reused": "finished outputs with the same settings"}}
            if prev is not None:
                r.status = "skipped"
                r.metrics = dict(prev.get("metrics") or {})
                r.notes, r.reasons = list(prev.get("notes") or []), dict(prev.get("reasons") or {})
                self.console.print(f"[dim]- {stage.name}: up to date, skipped")
            else:
                self.console.rule(f"[bold]{stage.name}")
                notes = _Notes(lambda text, r=r: self._note(r, text))  # printed as they come
                dev: list[warnings.WarningMessage] = []
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        r.metrics = _call_build(stage.build, notes) or {}
                    finally:
                        seen: dict[str, int] = {}  # each distinct warning once, with its count
                        for w in caught:
                            if issubclass(w.category, DEV_WARNINGS):
                                dev.append(w)
                            else:
                                seen[str(w.message)] = seen.get(str(w.message), 0) + 1
                        for text, n in seen.items():
                            self._note(r, f"warning: {text}" + (f" (×{n})" if n > 1 else ""), "red")
                for w in dev:  # deprecations are for developers: passed on, not shown as the user's notes
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                r.reasons = dict(r.metrics.pop("_reasons", {}) or {})
            r.manifests = [_manifest_hash(o) for o in outs]
            missing = [o for o, h in zip(r.outputs, r.manifests) if h is None]
            if missing:
                raise RuntimeError(f"stage finished without a readable manifest in {missing}")
        except Exception as e:  # noqa: BLE001 - a failing stage is reported, the others go on
            r.status, r.error = "failed", short_error(e)
            r.metrics = {"traceback": traceback.format_exc()}
            self.console.print(f"[red]- {stage.name}: failed: {r.error}")
        r.seconds = time.perf_counter() - t0
        self.results[stage.name] = r
        if r.status in ("built", "skipped") and self.state is not None:
            self.state.record(r)
        return r
