"""Wall and CPU time of the committed saliency table runs (and the attack, where it ran in the same invocation).

Reads ``benchmarks/results/saliency/<model>/manifest.json`` (``config.timing``, written by ``sae-cafe
benchmark-saliency``) or, for a run made before the manifest recorded its time, ``run_time.json`` beside it
(GNU ``time -v`` of that run). Writes ``benchmarks/results/saliency/run_times.{json,md}``; README.md shows the
Markdown through ``benchmarks/render_readme.py``.

    .venv/bin/python benchmarks/saliency_run_times.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DIR = Path(__file__).resolve().parent / "results" / "saliency"
MODELS = ("mini_resnet", "mini_vgg", "mini_vit")


def _minutes(s: float | None) -> str:
    return "—" if s is None else f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def collect() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model in MODELS:
        manifest = DIR / model / "manifest.json"
        timing = json.loads(manifest.read_text())["config"].get("timing") if manifest.is_file() else None
        if timing:
            out[model] = {"source": "stage manifest", **timing}
        elif (DIR / model / "run_time.json").is_file():
            out[model] = json.loads((DIR / model / "run_time.json").read_text())
        else:
            out[model] = {"source": "not recorded (the run predates the manifest's timing field)"}
    return out


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| model | table run, wall | table run, CPU s | attack (same invocation), wall | threads | load "
             "| source |", "|---|---|---|---|---|---|---|"]
    for model, r in rows.items():
        load = r.get("conditions") or " → ".join(f"{r[k]:.1f}" for k in ("load_before", "load_after_table",
                                                                          "load_after_attack") if k in r)
        cpu = f"{r['table_cpu_s']:.0f}" if "table_cpu_s" in r else "—"
        lines.append(f"| {model} | {_minutes(r.get('table_wall_s'))} | {cpu} | {_minutes(r.get('attack_wall_s'))} | "
                     f"{r.get('threads', '—')} | {load or '—'} | {r['source'].split(' (')[0]} |")
    lines += ["", "One process, one thread, on the shared 2-core machine (the wall time grows with the load; CPU "
              "seconds much less); `benchmarks/saliency_run_times.py`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    rows = collect()
    (DIR / "run_times.json").write_text(json.dumps(rows, indent=1) + "\n")
    (DIR / "run_times.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
