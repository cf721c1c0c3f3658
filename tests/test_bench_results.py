"""The results files of the measurement scripts agree with themselves: each ``benchmarks/results/STEM.md`` that
the README shows is what its script renders from the committed ``STEM.json`` (``README ↔ .md`` is
``tests/test_readme_results.py``'s check; this one closes ``.md ↔ .json``), and the renderers put the recorded
numbers, not others, into the Markdown."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# results STEM → (script module, name of its json → markdown function)
RENDERERS = {"demo": ("bench_demo", "markdown"), "fault_suite": ("bench_fault_suite", "markdown"),
             "interrupt": ("bench_interrupt", "markdown"), "saliency_cost": ("bench_saliency", "cost_markdown"),
             "icat_interventions": ("bench_icat_interventions", "markdown")}


def _markdown(stem: str):
    mod, fn = RENDERERS[stem]
    return getattr(_load(mod), fn)


def _shown_in_readme(stem: str) -> bool:
    return f"<!-- results: file benchmarks/results/{stem}.md -->" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("stem", sorted(RENDERERS))
def test_committed_markdown_is_rendered_from_its_json(stem):
    js, md = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    if not _shown_in_readme(stem) and not md.exists():
        pytest.skip(f"benchmarks/results/{stem}.md is not written yet and the README does not show it")
    assert js.is_file(), f"{md} has no {js.name} beside it: rerun the benchmark"
    assert md.read_text() == _markdown(stem)(json.loads(js.read_text())), (
        f"{md} differs from what {js.name} renders to: run `{RENDERERS[stem][0]}.py --render` or the benchmark")


def _demo_record() -> dict:
    run = {"exit_code": 0, "date": "2026-01-01 00:00 UTC", "wall_seconds": 87.4, "cpu_seconds": 150.2,
           "load_before": [0.5, 0.4, 0.3], "load_after": [1.9, 1.0, 0.5],
           "load_during": {"every_s": 5, "mean": 1.7, "max": 2.1, "samples": [1.7]},
           "stages": [{"name": "world", "status": "built", "seconds": 1.2},
                      {"name": "saes/mini_resnet/layer3", "status": "built", "seconds": 40.5},
                      {"name": "saes/mini_vit/3", "status": "built", "seconds": 39.0}],
           "seconds_per_kind": {"world": 1.2, "saes": 79.5}, "statuses": {"built": 3}}
    second = {**copy.deepcopy(run), "wall_seconds": 8.3, "statuses": {"skipped": 3},
              "stages": [{**s, "status": "skipped", "seconds": 0.0} for s in run["stages"]]}
    return {"command": ".venv/bin/python benchmarks/bench_demo.py", "threads": "torch's default 2 threads",
            "nice": 10, "commit": "0123456789abcdef", "uncommitted_changes": False,
            "machine": {"cpus": 2, "cpu": "Test CPU"}, "fresh_runs": [run], "second_run": second}


def test_demo_markdown_carries_the_recorded_numbers():
    render = _markdown("demo")
    rec = _demo_record()
    md = render(rec)
    assert "**87.4**" in md and "| saes/mini_resnet/layer3 | 40.5 |" in md and "**8.3 s**" in md
    assert "saes 80 s" in md and "3/3 stages skipped" in md and "Test CPU" in md and "nice 10" in md
    rec["fresh_runs"][0]["stages"][1]["seconds"] = 41.5
    assert "| saes/mini_resnet/layer3 | 41.5 |" in render(rec)
    rec["fresh_runs"].append(copy.deepcopy(rec["fresh_runs"][0]))
    rec["fresh_runs"][1]["seconds_per_kind"]["saes"] = 120.0
    assert "fresh run 2 (s)" in render(rec) and "saes 80–120 s" in render(rec)


def test_fault_suite_markdown_counts_the_cases():
    render = _markdown("fault_suite")
    cases = [{"case": "empty.png", "entry": "load_images", "outcome": "clear error: ImageError: empty"},
             {"case": "CMYK", "entry": "load_images", "outcome": "correct result (RGB)"},
             {"case": "nan weights", "entry": "load_model", "outcome": "BARE ValueError"}]
    rec = {"command": "x", "threads": 1, "nice": 0, "commit": "abc", "machine": {"cpus": 2, "cpu": "c"},
           "date": "d", "load_before": [1.0, 1, 1], "load_after": [2.0, 1, 1], "wall_seconds": 30.0,
           "cpu_seconds": 25.0, "tests": {"passed": 8, "failed": 1, "errors": 0, "skipped": 0,
                                          "failures": ["test_bad_weights"]},
           "n_cases": 3, "n_good": 2, "cases": cases}
    md = render(rec)
    assert md.startswith("**2/3** hostile or unusual inputs") and "8/9 tests passed" in md
    assert "test_bad_weights" in md and "| nan weights | load_model | BARE ValueError |" in md


def test_interrupt_markdown_sums_the_runs():
    render = _markdown("interrupt")

    def run(identical: int) -> dict:
        st = {"kills": 20, "identical": identical, "marker_kills": 4, "marker_identical": 4, "events": 136,
              "kills_leaving_partial_files": 6, "hung": [{"injected": True}], "retried": ["kill trial 3"],
              "rerun_identical": True}
        return {"driver": {"stages": {"acts": st}}, "summary": "s", "complete": True, "driver_exit": 0,
                "date": "d", "wall_seconds": 51.0, "cpu_seconds": 44.0, "load_before": [1.0, 1, 1],
                "load_after": [2.0, 1, 1], "load_during": {"mean": 1.5, "max": 2.0}}

    rec = {"command": "x", "threads": 1, "nice": 0, "commit": "abc", "machine": {"cpus": 2, "cpu": "c"},
           "kills": 20, "markers": 4, "spin": 1, "runs": [run(20), run(19)]}
    md = render(rec)
    assert "| activation extraction | **39/40** | 8/8 | 136 | 12 | 2 (2) | 2/2 |" in md
    assert "2 hang(s) injected" in md and "1 process(es) spinning" in md and "| 2 | s | 51.0 | 44.0 |" in md


def test_stem_paths():
    rr = _load("result_record")
    assert rr.stem_path("demo") == RESULTS / "demo"
    assert rr.stem_path("demo.json") == RESULTS / "demo"
    assert rr.stem_path("benchmarks/results/x/y") == REPO / "benchmarks" / "results" / "x" / "y"
    assert rr.stem_path("/tmp/a.md") == Path("/tmp/a")


def test_written_markdown_equals_a_later_render(tmp_path):
    """``write_results`` renders the .md from the JSON as stored (keys sorted), so ``--render`` reproduces it and
    the stage order stays the pipeline's, not the alphabet's."""
    rr = _load("result_record")
    render = _markdown("demo")
    md = rr.write_results(tmp_path / "demo", _demo_record(), render)
    assert (tmp_path / "demo.md").read_text() == md == rr.render_md(tmp_path / "demo", render).read_text()
    assert md.index("world 1 s") < md.index("saes 80 s")
    assert json.loads((tmp_path / "demo.json").read_text())["fresh_runs"][0]["wall_seconds"] == 87.4
