"""``make demo`` timed: the demo pipeline on a fresh artifact root, then again on the same root (every stage
skipped), with per-stage seconds from the run's ``demo_report.json``.

``make demo`` runs ``.venv/bin/sae-cafe demo`` once the venv exists (Makefile); this script runs the same
console script (``sae-cafe`` beside the interpreter; ``python -m sae_cafe`` when there is none) with
``--root`` a new temporary directory, so nothing of ``indexes/`` is reused or touched:

1. ``--repeat`` fresh runs, each on its own new root (world, SRD grids, activations, SAEs, CAFE, ICAT,
   saliency benchmark built from nothing);
2. one second run on the last root: every stage skipped, as a user's second ``make demo``.

Each run records its exit code, wall and CPU seconds (user + system of the whole command), the load average
before/after and sampled every 5 s; the fresh runs also every stage's status and seconds and the sum per stage
kind (world, srd, acts, saes, cafe, icat, saliency). Writes ``STEM.json`` and ``STEM.md`` (default
``benchmarks/results/demo``; the README's block). The venv build itself (``make venv``) is not timed here.

    nice -n 10 .venv/bin/python benchmarks/bench_demo.py [--repeat 1] [--threads N] [--out demo] [--keep]
    .venv/bin/python benchmarks/bench_demo.py --render        # only STEM.md again, from STEM.json

Exit 1 when a run fails or the second run builds anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_record import REPO, Measure, provenance, provenance_line, render_md, stem_path, write_results  # noqa: E402


def demo_command(root: Path, threads: int | None) -> list[str]:
    """What ``make demo`` runs (``.venv/bin/sae-cafe demo``), pointed at ``root``."""
    script = Path(sys.executable).with_name("sae-cafe")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sae_cafe"]
    cmd += ["demo", "--root", str(root)]
    return cmd + (["--threads", str(threads)] if threads else [])


def run_once(root: Path, threads: int | None, log: Path) -> dict:
    """One ``sae-cafe demo`` into ``root``: exit code, seconds, load, and the stages of its report."""
    with Measure() as m, log.open("w") as f:
        rc = subprocess.run(demo_command(root, threads), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    reports = sorted(root.glob("*/demo_report.json"))
    report = json.loads(reports[0].read_text()) if reports else {}
    stages = [{"name": s["name"], "status": s["status"], "seconds": round(float(s["seconds"]), 2),
               "error": s.get("error")} for s in report.get("stages", [])]
    kinds: dict[str, float] = {}
    for s in stages:
        k = s["name"].split("/")[0]
        kinds[k] = round(kinds.get(k, 0.0) + s["seconds"], 2)
    return {"exit_code": rc, **m.record(), "pipeline_seconds": report.get("total_seconds"),
            "stages": stages, "seconds_per_kind": kinds,
            "statuses": {st: sum(s["status"] == st for s in stages) for st in sorted({s["status"] for s in stages})},
            "plan_notes": report.get("plan_notes", []), "model_warnings": report.get("model_warnings", {}),
            "log_tail": log.read_text()[-1500:] if rc else None}


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def markdown(res: dict) -> str:
    """The README block: how it was measured, the per-stage table of the fresh runs, the second run."""
    fresh, second = res["fresh_runs"], res["second_run"]
    n = len(fresh)
    lines = ["`make demo` (= `sae-cafe demo`) on a fresh artifact root, measured by `benchmarks/bench_demo.py`: "
             + provenance_line({**res, "load_before": fresh[0]["load_before"], "load_after": second["load_after"],
                                "date": fresh[0]["date"]}) + " The venv build (`make venv`) is not included.", ""]
    heads = [f"fresh run {i + 1}" for i in range(n)] if n > 1 else ["fresh run"]
    lines += ["| stage | " + " | ".join(f"{h} (s)" for h in heads) + " |", "|---|" + "---:|" * n]
    names = list(dict.fromkeys(s["name"] for r in fresh for s in r["stages"]))
    for name in names:
        cells = []
        for r in fresh:
            s = next((s for s in r["stages"] if s["name"] == name), None)
            cells.append("–" if s is None else f"{s['seconds']:.1f}" + ("" if s["status"] == "built"
                                                                           else f" ({s['status']})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **whole command (wall)** | " + " | ".join(
        f"**{r['wall_seconds']:.1f}**" + ("" if r["exit_code"] == 0 else f" (exit {r['exit_code']})") for r in fresh)
        + " |")
    lines.append("| whole command, CPU s (user + system) | " + " | ".join(f"{r['cpu_seconds']:.1f}" for r in fresh)
                 + " |")
    lines.append("| load average during (mean / max) | " + " | ".join(
        f"{r['load_during']['mean']:.1f} / {r['load_during']['max']:.1f}" for r in fresh) + " |")
    kinds = list(dict.fromkeys(s["name"].split("/")[0] for r in fresh for s in r["stages"]))  # pipeline order
    per_kind = ", ".join(f"{k} {_range([r['seconds_per_kind'].get(k, 0.0) for r in fresh])} s" for k in kinds)
    skipped = second["statuses"].get("skipped", 0)
    rebuilt = [s["name"] for s in second["stages"] if s["status"] != "skipped"]
    lines += ["", f"Per stage kind: {per_kind}. Second run on the same root: **{second['wall_seconds']:.1f} s** wall "
              f"({skipped}/{len(second['stages'])} stages skipped"
              + (f"; not skipped: {', '.join(rebuilt)}" if rebuilt else "")
              + f", exit {second['exit_code']}; load {second['load_before'][0]:.1f} before)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="fresh runs, each on a new root (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="sae-cafe demo --threads (default: as make demo, "
                    "torch's own default)")
    ap.add_argument("--out", default="demo", help="results STEM (bare name: under benchmarks/results/)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary roots (printed)")
    ap.add_argument("--render", action="store_true", help="only rewrite STEM.md from the existing STEM.json")
    a = ap.parse_args(argv)
    if a.render:
        print(render_md(stem_path(a.out), markdown))
        return 0
    if a.repeat < 1:
        ap.error("--repeat must be ≥ 1")
    import torch

    res = {**provenance(a.threads or f"torch's default {torch.get_num_threads()} threads"), "fresh_runs": []}
    roots = []
    for i in range(a.repeat):
        root = Path(tempfile.mkdtemp(prefix="bench_demo_"))
        roots.append(root)
        r = run_once(root, a.threads, root / "demo.log")
        res["fresh_runs"].append(r)
        print(f"fresh run {i + 1}: exit {r['exit_code']}, {r['wall_seconds']} s wall, {r['cpu_seconds']} CPU s, "
              f"load {r['load_before'][0]} → {r['load_after'][0]}; {r['seconds_per_kind']}", flush=True)
    r = res["second_run"] = run_once(roots[-1], a.threads, roots[-1] / "demo_second.log")
    print(f"second run: exit {r['exit_code']}, {r['wall_seconds']} s, {r['statuses']}", flush=True)
    stem = stem_path(a.out)
    print(write_results(stem, res, markdown))
    if a.keep:
        print("kept:", *roots)
    else:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    bad = [x for x in [*res["fresh_runs"], r] if x["exit_code"] != 0]
    rebuilt = [s["name"] for s in r["stages"] if s["status"] != "skipped"]
    if rebuilt:
        print(f"second run built {rebuilt}: expected every stage skipped", file=sys.stderr)
    return 1 if bad or rebuilt else 0


if __name__ == "__main__":
    sys.exit(main())
