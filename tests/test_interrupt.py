"""Interruption: extraction, SAE training and the CAFE build are SIGKILLed at 20 random points each on the
concept world; every resume must give artifacts identical to an uninterrupted run (same shard contents,
same top-k, same FAISS index, same manifests minus timestamps), with nothing lost, duplicated or left over.

The kills run in ``tests/interrupt_driver.py`` (one subprocess that imports everything once and forks a
fresh process for every run, killed or resuming; its docstring describes the protocol). Each of the 20
kills per stage is followed by its own resume in a separate directory, so every resume starts from exactly
one killed run's on-disk state. The results go to ``indexes/fault_suite/interrupt.json`` and into the
fault-suite report (``indexes/fault_suite/report.md``, rendered by ``tests/fault_report.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_report import INTERRUPT, interruption_summary, record

KILLS = 20
DRIVER = Path(__file__).with_name("interrupt_driver.py")
STAGES = ("acts", "saes", "cafe")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("interrupt")
    out = work / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(DRIVER), str(out), str(work / "runs"), "--kills", str(KILLS),
                           "--seed", "0"], capture_output=True, text=True, timeout=800, env=env)
    assert proc.returncode == 0 and out.exists(), f"driver failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["measured_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record(INTERRUPT, res)
    return res


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_random_points_resumes_identically(results, stage):
    r = results["stages"][stage]
    assert not r["errors"], "\n\n".join(r["errors"])
    bad = [t for t in r["trials"] if not t["identical"]]
    assert r["kills"] == KILLS and r["identical"] == KILLS, f"resumes that differ: {bad}"
    # the kills landed in different phases of the stage, some of them while a file was being written
    assert len(r["phases"]) >= 3, r["phases"]
    assert r["kills_leaving_partial_files"] >= 1
    # kills at the renames themselves (mid-write, and between a manifest and its publication) too
    assert r["marker_kills"] == r["marker_identical"] == 4, r["markers"]


def test_uninterrupted_reruns_are_hash_equal(results):
    assert {s: results["stages"][s]["rerun_identical"] for s in STAGES} == dict.fromkeys(STAGES, True)


def test_report_states_the_result(results):
    assert interruption_summary(results) == f"{KILLS}/{KILLS} resumes identical per stage"
    text = (Path(__file__).resolve().parents[1] / "indexes" / "fault_suite" / "report.md").read_text()
    assert f"{KILLS}/{KILLS} resumes identical per stage" in text
