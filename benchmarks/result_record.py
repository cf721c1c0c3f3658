"""Shared by the benchmark scripts that write ``benchmarks/results/STEM.{json,md}``: where a STEM lands, the
record of what a measurement ran under (machine, threads, nice, load average before/after and sampled during,
wall and CPU seconds, date, commit, the command line) and the atomic write of both files
(``sae_cafe.artifacts.atomic_write_json`` / ``atomic_write_bytes``: a reader never sees half a file).

    from result_record import Measure, provenance, stem_path, write_results
    with Measure() as m:            # load before, wall clock and CPU seconds of this process and its children
        ...                         # the real thing
    write_results(stem_path("demo"), {**provenance(threads), **m.record(), ...}, markdown)  # markdown(record)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def stem_path(stem: str | Path) -> Path:
    """Absolute STEM (no suffix): a bare name goes under ``benchmarks/results/``, a relative path is taken from the
    repository root, a trailing ``.json``/``.md`` is dropped."""
    p = Path(stem)
    if p.suffix in (".json", ".md"):
        p = p.with_suffix("")
    if p.is_absolute():
        return p
    return RESULTS / p if len(p.parts) == 1 else REPO / p


def machine() -> dict:
    """CPU model, cores (and those this process may use), OS, Python and torch versions."""
    out = {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
           "cpu": platform.processor() or platform.machine(), "os": platform.platform(),
           "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # a script that never imports torch still gets the rest
        out["torch"] = None
    return out


def command() -> str:
    """The command line of this process, with the interpreter and script relative to the repository."""
    exe, script = Path(sys.executable), Path(sys.argv[0]).resolve()
    parts = [os.path.relpath(exe, REPO) if REPO in exe.parents else str(exe),
             os.path.relpath(script, REPO) if REPO in script.parents else sys.argv[0], *sys.argv[1:]]
    return shlex.join(parts)


def git_state() -> dict:
    """Commit of the checkout and whether tracked files differ from it."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cpu() -> float:
    """User + system CPU seconds of this process and of its waited-for children (and theirs)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Measure:
    """Context manager around one measured piece: load average before and after, the 1-minute load sampled every
    ``every`` seconds in between, wall seconds, CPU seconds (this process + finished children)."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(round(os.getloadavg()[0], 2))

    def __enter__(self) -> Measure:
        self.date, self.load_before = now(), [round(v, 2) for v in os.getloadavg()]
        self._cpu0, self._t0 = _cpu(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = _cpu() - self._cpu0
        self.load_after = [round(v, 2) for v in os.getloadavg()]
        self._stop.set()
        self._thread.join()

    def record(self) -> dict:
        """JSON-ready: date, wall/CPU seconds, load average (1/5/15 min) before and after, sampled 1-min load."""
        s = self.samples or [self.load_before[0]]
        return {"date": self.date, "wall_seconds": round(self.wall, 1), "cpu_seconds": round(self.cpu, 1),
                "load_before": self.load_before, "load_after": self.load_after,
                "load_during": {"every_s": self.every, "mean": round(sum(s) / len(s), 2), "max": max(s),
                                "samples": self.samples}}


def provenance(threads: int | str | None = None) -> dict:
    """What every results file records besides its numbers: the command, machine, threads, nice, commit."""
    return {"command": command(), "machine": machine(), "threads": threads, "nice": os.nice(0),
            "written": now(), **git_state()}


def provenance_line(rec: dict, threads: str | None = None) -> str:
    """One Markdown sentence: machine, threads, nice, load before → after, date, commit, the command."""
    m = rec["machine"]
    lb, la = rec.get("load_before"), rec.get("load_after")
    load = f"load average {lb[0]:.1f} before, {la[0]:.1f} after" if lb and la else "load not recorded"
    t = threads if threads is not None else rec.get("threads")
    thr = f"{t} thread{'s' * (t != 1)}" if isinstance(t, int) else (t or "torch's default threads")
    commit = (rec.get("commit") or "?")[:10] + (" + local changes" if rec.get("uncommitted_changes") else "")
    return (f"{m['cpus']} CPU cores ({m['cpu']}), {thr}, nice {rec.get('nice', '?')}; {load}; "
            f"{rec.get('date') or rec.get('written')}, commit {commit}; `{rec['command']}`.")


def write_results(stem: Path, data: dict, markdown) -> str:
    """``STEM.json`` (``data``) and ``STEM.md`` (``markdown(record)``), each written atomically; the Markdown is
    rendered from the JSON as written (keys sorted, values JSON-typed), so ``--render`` gives the same file
    again. Prints both paths; returns the Markdown."""
    import json

    from sae_cafe.artifacts import atomic_write_bytes, atomic_write_json

    js, mdp = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    atomic_write_json(js, data)
    md = markdown(json.loads(js.read_text()))
    atomic_write_bytes(mdp, md.encode())
    print(js, mdp, sep="\n")
    return md


def render_md(stem: Path, markdown) -> Path:
    """Rewrite ``STEM.md`` from ``STEM.json`` with ``markdown(record) -> str`` (nothing is measured)."""
    import json

    from sae_cafe.artifacts import atomic_write_bytes

    js, md = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    if not js.is_file():
        raise SystemExit(f"{js} not found: run the benchmark (without --render) first")
    atomic_write_bytes(md, markdown(json.loads(js.read_text())).encode())
    return md
