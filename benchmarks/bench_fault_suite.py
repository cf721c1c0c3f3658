"""The fault suite as a committed result: runs ``tests/test_fault_suite.py`` (the real suite, through pytest) and
writes what it recorded — every hostile or unusual input, its entry point (Python API or CLI) and its outcome —
to ``STEM.json`` / ``STEM.md`` (default ``benchmarks/results/fault_suite``; the README's block).

The suite records its cases through ``tests/fault_report.py``; this script points that module's folder at a
temporary directory (``SAE_CAFE_FAULT_REPORT_DIR``), so the local ``indexes/fault_suite/`` is left alone, and
reads ``cases.json`` from there; pytest's JUnit XML gives the pass/fail count of the suite's tests (the cases
plus the determinism and no-pickle checks of the same file). Exit 1 when a test fails or a case ends in
anything but a clear error or a correct result.

    nice -n 10 .venv/bin/python benchmarks/bench_fault_suite.py [--out fault_suite] [--threads 1]
    .venv/bin/python benchmarks/bench_fault_suite.py --render        # only STEM.md again, from STEM.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_record import REPO, Measure, provenance, provenance_line, render_md, stem_path, write_results  # noqa: E402

SUITE = "tests/test_fault_suite.py"
GOOD = ("clear error", "correct result")  # the outcomes the suite accepts (tests/fault_report.py counts the same)


def run_suite(tmp: Path, threads: int) -> dict:
    """Run the suite with pytest into ``tmp``; its cases, the test counts and pytest's exit code."""
    junit = tmp / "junit.xml"
    env = {**os.environ, "SAE_CAFE_FAULT_REPORT_DIR": str(tmp), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    base = tmp / "t"  # pytest's tmp_path root: short (the suite keeps the first 90 characters of a message), and
    # replaced by "…" in the outcomes, so the committed table does not change with the machine's temp paths
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE, f"--basetemp={base}",
           f"--junitxml={junit}"]
    with Measure() as m:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if not (tmp / "cases.json").is_file():
        raise SystemExit(f"the suite recorded no cases (pytest exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-2000:]}")
    cases = [{"case": c, "entry": e, "outcome": o.replace(str(base), "…")}
             for c, e, o in json.loads((tmp / "cases.json").read_text())["cases"]]
    tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if junit.is_file():
        for tc in ET.parse(junit).getroot().iter("testcase"):
            kind = next((k for k in ("failure", "error", "skipped") if tc.find(k) is not None), None)
            tests[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[kind]] += 1
            if kind in ("failure", "error"):
                tests["failures"].append(tc.get("name"))
    return {"pytest_command": " ".join(["python", *cmd[1:-2]]), "pytest_exit": proc.returncode, **m.record(),
            "tests": tests, "n_cases": len(cases), "n_good": sum(c["outcome"].startswith(GOOD) for c in cases),
            "cases": cases, "pytest_tail": proc.stdout[-1500:] if proc.returncode else None}


def markdown(res: dict) -> str:
    """The README block: the count, the test result, how it was run, the cases in a collapsed table."""
    t = res["tests"]
    n_tests = t["passed"] + t["failed"] + t["errors"]
    lines = [f"**{res['n_good']}/{res['n_cases']}** hostile or unusual inputs end in a clear error or a correct "
             f"result; `{SUITE}`: {t['passed']}/{n_tests} tests passed"
             + (f" (failed: {', '.join(t['failures'])})" if t["failures"] else "") + f", {res['wall_seconds']:.0f} s "
             f"wall, {res['cpu_seconds']:.0f} CPU s. " + provenance_line(res), "",
             f"<details><summary>The {res['n_cases']} inputs and their outcomes</summary>", "",
             "| case | entry point | outcome |", "|---|---|---|"]
    esc = lambda s: s.replace("<", "&lt;").replace("|", "/")  # noqa: E731  (Markdown table cells, HTML-safe)
    lines += [f"| {esc(c['case'])} | {esc(c['entry'])} | {esc(c['outcome'])} |" for c in res["cases"]]
    return "\n".join(lines + ["", "</details>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fault_suite", help="results STEM (bare name: under benchmarks/results/)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the pytest process")
    ap.add_argument("--render", action="store_true", help="only rewrite STEM.md from the existing STEM.json")
    a = ap.parse_args(argv)
    if a.render:
        print(render_md(stem_path(a.out), markdown))
        return 0
    with tempfile.TemporaryDirectory(prefix="bfs") as tmp:
        res = {**provenance(a.threads), **run_suite(Path(tmp), a.threads)}
    print(write_results(stem_path(a.out), res, markdown).split("\n<details>")[0])
    t = res["tests"]
    return 0 if res["pytest_exit"] == 0 and not t["failed"] + t["errors"] and res["n_good"] == res["n_cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
