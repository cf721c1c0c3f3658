"""The interruption driver as a committed result: runs ``tests/interrupt_driver.py`` exactly as
``tests/test_interrupt.py`` does (same kills, seed, injected hang, deadline, one thread, ``PYTHONHASHSEED=0``;
the constants are imported from the test), ``--runs`` times in a row, each in a fresh temporary directory, and
writes ``STEM.json`` / ``STEM.md`` (default ``benchmarks/results/interrupt``; the README's block).

Per stage (activation extraction, SAE training, CAFE build): resumes identical / kill trials, kills at the
publishing renames identical / made, file-system kill points N, kills that left a partial temporary file,
hung runs (retried), uninterrupted rerun hash-equal. Per run: wall and CPU seconds (user + system of the driver
and its forked runs), load average before/after and sampled every 5 s. ``--spin K`` keeps K extra processes
spinning on the CPU during the runs (the "one core kept busy" condition), recorded in the results.

    nice -n 10 .venv/bin/python benchmarks/bench_interrupt.py [--runs 3] [--spin 0] [--out interrupt]
    .venv/bin/python benchmarks/bench_interrupt.py --runs 1 --kills 2 --markers 1 --out /tmp/x   # a smoke test
    .venv/bin/python benchmarks/bench_interrupt.py --render        # only STEM.md again, from STEM.json

Exit 1 when a run does not complete or a resume differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import test_interrupt as ti  # noqa: E402  (KILLS, INJECT, DRIVER, DRIVER_TIMEOUT, STAGES: the test's own run)
from fault_report import STAGE_NAMES, interruption_summary  # noqa: E402
from result_record import REPO, Measure, provenance, provenance_line, render_md, stem_path, write_results  # noqa: E402


def run_driver(work: Path, kills: int, markers: int, timeout: float) -> dict:
    """One driver run as the test makes it (its command and environment); the driver's results plus the run's
    wall/CPU seconds and load."""
    out = work / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, str(ti.DRIVER), str(out), str(work / "runs"), "--kills", str(kills), "--markers",
           str(markers), "--seed", "0", "--inject-hang", str(ti.INJECT)]
    with Measure() as m:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*ti._descendants(proc.pid), proc.pid]:  # the driver and its forked runs, as the test does
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _, err = proc.communicate()
    res = json.loads(out.read_text()) if out.exists() else {"stages": {}, "kills_per_stage": kills}
    res.pop("setup_s", None)
    for s in res["stages"].values():  # per-trial detail stays in the driver's own file; keep the counts
        for k in ("trials", "markers"):
            s[f"{k}_detail_count"] = len(s.pop(k, []))
    return {"driver_exit": proc.returncode, "complete": bool(res.get("complete")), **m.record(),
            "summary": interruption_summary(res) if res["stages"] else "nothing finished", "driver": res,
            "stderr_tail": err[-2000:] if proc.returncode else None}


@contextlib.contextmanager
def spinners(k: int):
    """``k`` processes that spin on the CPU until the block ends (killed by their own pids)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def markdown(res: dict) -> str:
    """The README block: per stage (summed over the runs) and per run."""
    runs = res["runs"]
    spin = f", {res['spin']} process(es) spinning on the CPU throughout" if res["spin"] else ""
    injected = sum(bool(h.get("injected")) for r in runs for s in r["driver"]["stages"].values()
                   for h in s.get("hung", []))
    lines = [f"`tests/interrupt_driver.py` as `tests/test_interrupt.py` runs it ({res['kills']} kills per stage, "
             f"{res['markers']} at the publishing renames, seed 0; {injected} hang(s) injected on purpose in all, "
             f"counted under hung), {len(runs)} run(s) in a row"
             f"{spin}, measured by `benchmarks/bench_interrupt.py`: " + provenance_line(
                 {**res, "load_before": runs[0]["load_before"], "load_after": runs[-1]["load_after"],
                  "date": runs[0]["date"]}, "1 thread per run"), "",
             "| stage | resumes identical / kills | at renames: identical / kills | kill points N | kills leaving a "
             "partial temp file | hung (retried) | uninterrupted reruns hash-equal |", "|---|---|---|---|---|---|---|"]
    names = {n for r in runs for n in r["driver"]["stages"]}
    stages = [n for n in ti.STAGES if n in names] + sorted(names - set(ti.STAGES))  # the driver's order
    for name in stages:
        ss = [r["driver"]["stages"][name] for r in runs if name in r["driver"]["stages"]]
        tot = {k: sum(s.get(k, 0) for s in ss) for k in ("identical", "kills", "marker_identical", "marker_kills",
                                                         "kills_leaving_partial_files")}
        hung = sum(len(s.get("hung", [])) for s in ss)
        retried = sum(len(s.get("retried", [])) for s in ss)
        events = sorted({s.get("events") for s in ss} - {None})
        lines.append(f"| {STAGE_NAMES.get(name, name)} | **{tot['identical']}/{tot['kills']}** | "
                     f"{tot['marker_identical']}/{tot['marker_kills']} | {', '.join(map(str, events)) or '?'} | "
                     f"{tot['kills_leaving_partial_files']} | {hung} ({retried}) | "
                     f"{sum(bool(s.get('rerun_identical')) for s in ss)}/{len(ss)} |")
    lines += ["", "| run | result | wall (s) | CPU s (user + system) | load before → after (1 min) | load during "
              "(mean / max) |", "|---|---|---:|---:|---|---|"]
    for i, r in enumerate(runs, 1):
        result = r["summary"] + ("" if r["complete"] and r["driver_exit"] == 0
                                 else f" (incomplete, exit {r['driver_exit']})")
        lines.append(f"| {i} | {result} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} | "
                     f"{r['load_during']['mean']:.1f} / {r['load_during']['max']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="driver runs in a row (default 3)")
    ap.add_argument("--kills", type=int, default=ti.KILLS, help=f"kills per stage (the test's: {ti.KILLS})")
    ap.add_argument("--markers", type=int, default=4, help="kills at the publishing renames per stage (the test's: 4)")
    ap.add_argument("--spin", type=int, default=0, help="extra processes spinning on the CPU during the runs")
    ap.add_argument("--timeout", type=float, default=ti.DRIVER_TIMEOUT, help="seconds per driver run (the test's)")
    ap.add_argument("--out", default="interrupt", help="results STEM (bare name: under benchmarks/results/)")
    ap.add_argument("--render", action="store_true", help="only rewrite STEM.md from the existing STEM.json")
    a = ap.parse_args(argv)
    if a.render:
        print(render_md(stem_path(a.out), markdown))
        return 0
    if a.runs < 1:
        ap.error("--runs must be ≥ 1")
    res = {**provenance(1), "kills": a.kills, "markers": a.markers, "spin": a.spin, "runs": []}
    with spinners(a.spin):
        for i in range(a.runs):
            with tempfile.TemporaryDirectory(prefix="bench_interrupt_") as work:
                r = run_driver(Path(work), a.kills, a.markers, a.timeout)
            res["runs"].append(r)
            print(f"run {i + 1}: {r['summary']}; complete {r['complete']}, exit {r['driver_exit']}, "
                  f"{r['wall_seconds']} s wall, {r['cpu_seconds']} CPU s, load {r['load_before'][0]} → "
                  f"{r['load_after'][0]}", flush=True)
    print(write_results(stem_path(a.out), res, markdown))
    def good(r: dict) -> bool:
        stages = r["driver"]["stages"]
        return (r["complete"] and r["driver_exit"] == 0 and len(stages) == len(ti.STAGES)
                and all(s.get("identical") == s.get("kills") == a.kills and not s.get("errors")
                        and s.get("marker_identical") == s.get("marker_kills") for s in stages.values()))

    ok = all(good(r) for r in res["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
