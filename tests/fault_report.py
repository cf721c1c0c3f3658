"""``indexes/fault_suite/report.md``: rendered from what the fault-suite modules recorded beside it.

``tests/test_fault_suite.py`` records its cases in ``cases.json``, ``tests/test_interrupt.py`` its SIGKILL
results in ``interrupt.json``; each module re-renders the report when it finishes, so the report is complete
whichever of them runs last (a part that has not run yet in this checkout is marked as missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/bench_fault_suite.py points this at a temporary folder (the report of a committed measurement)
REPORT_DIR = Path(os.environ.get("SAE_CAFE_FAULT_REPORT_DIR") or ROOT / "indexes" / "fault_suite")
CASES, INTERRUPT = "cases.json", "interrupt.json"
STAGE_NAMES = {"acts": "activation extraction", "saes": "SAE training", "cafe": "CAFE build (top-k mining, "
                                                                            "iERF anchoring, FAISS)"}


def _read(name: str) -> dict | None:
    try:
        return json.loads((REPORT_DIR / name).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record(name: str, data: dict) -> None:
    """Store one module's results beside the report and re-render it."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    _write(REPORT_DIR / name, json.dumps(data, indent=1) + "\n")
    write_report()


def interruption_summary(intr: dict) -> str:
    """``20/20 resumes identical per stage`` (or the per-stage counts when one falls short)."""
    k = intr["kills_per_stage"]
    stages = intr["stages"]
    if len(stages) == 3 and all(s.get("kills") == k and s.get("identical") == k for s in stages.values()):
        return f"{k}/{k} resumes identical per stage"
    return ", ".join(f"{n}: {s.get('identical', 0)}/{s.get('kills', 0)} resumes identical (of {k} kills planned)"
                     for n, s in stages.items())


def _hang_lines(intr: dict) -> list[str]:
    hung = [(n, h) for n, s in intr["stages"].items() for h in s.get("hung", [])]
    injected = sum(1 for _, h in hung if h.get("injected"))
    lines = ["", f"Hangs: {injected} injected (the self-test of the deadline: the first attempt of one kill trial "
             f"deadlocks on purpose), {len(hung) - injected} other. Every wait has a deadline; a run past it has "
             "its thread states and stacks recorded, its process group killed, and is retried once in a fresh "
             "directory."]
    if hung:
        lines += ["", "| stage | run | attempt | deadline (s) | threads (state, kernel wait) "
                  "| Python stack (innermost) |", "|---|---|---|---|---|---|"]
        for n, h in hung:
            threads = ", ".join(f"{t['comm']} {t['state']} {t['wchan']}" for t in h.get("threads", []))
            stack = [x.strip() for x in h.get("python_stack", "").splitlines() if x.strip().startswith("File")]
            lines.append(f"| {n} | {h['what']}{' (injected)' if h.get('injected') else ''} | {h['attempt']} | "
                         f"{h.get('deadline_s')} | {threads} | {(stack[0] if stack else '-').replace('|', '/')} |")
    hazards = sorted({x for s in intr["stages"].values() for x in s.get("fork_hazards", [])})
    lines += ["", "Locks or threads at fork time (each would let a killed child block the next): "
              + ("; ".join(hazards) if hazards else "none found") + "."]
    return lines


def _interruption_lines(intr: dict) -> list[str]:
    head = (f"**{interruption_summary(intr)}** (all kills, resumes and comparisons of `tests/test_interrupt.py`, "
            f"seed {intr['seed']}, measured {intr.get('measured_at', '?')}, "
            f"{intr.get('wall_s', intr.get('total_s', '?'))} s for the whole module).")
    if not intr.get("complete"):
        head += (f" **Incomplete**: the driver stopped (exit {intr.get('driver_exit', '?')}) before the end; the "
                 "table shows what it had finished.")
    lines = ["## Interruption: SIGKILL at random points, then resume", "", head, "",
             "Each kill: the stage runs in a fresh forked process in its own directory and SIGKILLs itself at its "
             "k-th file-system operation (open, rename, mkdir, remove, directory scan; CPython audit events), k "
             "drawn (seeded) from the i-th of 20 equal slices of the N operations of an uninterrupted run, so the "
             "kills do not depend on the machine's speed; at a rename of a temporary file, with a seeded coin, "
             "the file is first cut to a seeded fraction (a kill mid-write). A new process then resumes it from "
             "what is on disk and the finished stage directories are hashed (every file, hidden ones included; "
             "JSON without `created_at`, timings and the run's own path; and the names beside each stage "
             "directory, so no `.tmp`/`.old` may be left) and compared with the uninterrupted run. Extra kills "
             "at the renames that publish files: the temporary file cut to half and the process killed before "
             "the rename, or killed right after it.", "",
             "| stage | kills | identical resumes | T (s) | kill points N | phases hit (kills) | kills at renames: "
             "identical | kills (at events or renames) that left a partial temp file | hung runs (retried) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in intr["stages"].items():
        phases = "; ".join(f"{p} ({n})" for p, n in s.get("phases", {}).items())
        lines.append(f"| {STAGE_NAMES.get(name, name)} | {s.get('kills', 0)} | {s.get('identical', 0)} | "
                     f"{s.get('reference_s', '?')} | {s.get('events', '?')} | {phases} | "
                     f"{s.get('marker_identical', 0)}/{s.get('marker_kills', 0)} | "
                     f"{s.get('kills_leaving_partial_files', 0)} | {len(s.get('hung', []))} "
                     f"({len(s.get('retried', []))}) |")
    setup = intr.get("setup", {})
    if setup:
        lines += ["", "Setup: " + "; ".join(f"{k}: {v}" for k, v in setup.items()) + "."]
    lines += _hang_lines(intr)
    errors = [e for s in intr["stages"].values() for e in s.get("errors", [])]
    if errors:
        lines += ["", "Errors:", "", *[f"    {e.splitlines()[0]}" for e in errors]]
    lines += ["", "## Determinism: uninterrupted reruns", "",
              "| stage | rerun in another process and directory hash-equal |", "|---|---|"]
    lines += [f"| {STAGE_NAMES.get(n, n)} | {'yes' if s.get('rerun_identical') else 'NO'} |"
              for n, s in intr["stages"].items()]
    return lines


def write_report() -> Path:
    cases, intr = _read(CASES), _read(INTERRUPT)
    lines = ["# Fault-suite report", ""]
    if cases is not None:
        rows = cases["cases"]
        ok = sum(1 for *_, o in rows if o.startswith(("clear error", "correct result")))
        lines += [f"{ok}/{len(rows)} cases end in a clear error or a correct result.", "",
                  "| case | entry point | outcome |", "|---|---|---|"]
        lines += [f"| {c} | {e} | {o} |" for c, e, o in rows]
    else:
        lines += ["Hostile-input cases: not run yet in this checkout (`pytest tests/test_fault_suite.py`)."]
    lines.append("")
    if intr is not None:
        lines += _interruption_lines(intr)
    else:
        lines += ["## Interruption", "", "Not run yet in this checkout (`pytest tests/test_interrupt.py`)."]
    out = REPORT_DIR / "report.md"
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    _write(out, "\n".join(lines) + "\n")
    return out
