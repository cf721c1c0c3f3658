"""End to end on foundation ViTs: run a shipped config from scratch and record per-stage times.

For each config (default: ``configs/clip_vit_b16.toml`` and ``configs/dinov2_small_hf.toml``) this deletes the
run folder under ``--root``, runs the real CLI (``sae-cafe demo --config X --root ROOT``) in a subprocess with
``--threads`` torch/OpenMP threads under ``nice``, and reads the run's ``demo_report.json``. It records the
wall time, every stage's status and seconds, the load average of the machine before and after (the CPU may
be shared), and checks the issue's minimums on the built artifacts: ≥ 200 images, SAEs of ≥ 2 × d_model
latents at two blocks, CAFE k = 8 exemplars with iERFs stored at ≥ 112 px, an ICAT stage over both blocks
with its last edge, the viewer's inputs present (CAFE cards and stages, ICAT graphs).

    nice -n 10 .venv/bin/python benchmarks/bench_foundation_e2e.py [--config configs/X.toml ...] [--threads 2]
        [--root /tmp/foundation_e2e] [--out benchmarks/results/foundation_e2e]

Writes ``OUT.json`` (merged per config, so one config can be rerun alone) and ``OUT.md`` (the README table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("configs/clip_vit_b16.toml", "configs/dinov2_small_hf.toml")
TARGET_S = 15 * 60


def run_config(config: Path, root: Path, threads: int) -> dict:
    """Run ``config`` from scratch into ``root``; the record of the run (times, stages, checks)."""
    sys.path.insert(0, str(REPO))
    from sae_training.pipeline import load_config

    cfg = load_config(config)
    run_dir = root / cfg.run
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "sae_cafe", "demo", "--config", str(config), "--root", str(root),
           "--threads", str(threads)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(root / f"{cfg.run}.log", "w") as log:  # the run's console output, readable while it runs
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        cpu = watch(proc.pid, run_dir, proc.poll)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    report = json.loads((run_dir / "demo_report.json").read_text()) if (run_dir / "demo_report.json").exists() else {}
    stages = [{"stage": s["name"], "status": s["status"], "seconds": round(float(s["seconds"]), 1),
               "metrics": {k: v for k, v in s.get("metrics", {}).items() if not str(k).startswith("_")},
               "error": s.get("error")} for s in report.get("stages", [])]
    return {"config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
            "run": cfg.run, "model": [m.name for m in cfg.models], "images": cfg.images, "exit_code": proc.returncode,
            "wall_seconds": round(wall, 1), "pipeline_seconds": round(float(report.get("total_seconds", 0.0)), 1),
            "within_target": wall <= TARGET_S, "threads": threads,
            "load_average_before": [round(v, 2) for v in load0], "load_average_after": [round(v, 2) for v in load1],
            "cpu_seconds": cpu["total"], "stage_cpu_seconds": cpu["stages"],
            "stages": stages, "checks": checks(run_dir, cfg), "model_warnings": report.get("model_warnings", {})}


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of a live process from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(pid: int, run_dir: Path, done, interval: float = 2.0) -> dict:
    """Poll the run's CPU time and its finished stages (``pipeline_state.json``) until ``done()`` is not None:
    the CPU seconds of the whole run and per stage (CPU spent since the previous stage finished: the first
    stage also carries start-up and image generation). On a shared machine the wall time measures the load;
    the CPU time measures the run."""
    state = run_dir / "pipeline_state.json"
    last, seen, stages = 0.0, set(), {}
    while done() is None:
        now = cpu_seconds(pid)
        if now is not None:
            last = now
        try:
            finished = [v.get("stage") for v in json.loads(state.read_text()).get("outputs", {}).values()]
        except (OSError, ValueError):
            finished = []
        new = [f for f in dict.fromkeys(finished) if f not in seen]
        if new:
            base = sum(stages.values())
            for i, f in enumerate(new):  # stages finished within one poll: the first one carries the CPU
                stages[f] = round(last - base, 1) if i == 0 else 0.0
                seen.add(f)
        time.sleep(interval)
    return {"total": round(last, 1), "stages": stages}


def load_run_name(config: str) -> str:
    sys.path.insert(0, str(REPO))
    from sae_training.pipeline import load_config

    return load_config(config).run


def checks(run_dir: Path, cfg) -> dict:
    """The issue's minimums, read from the artifacts of the run."""
    from sae_cafe.activations import ShardReader
    from sae_cafe.artifacts import read_manifest
    from sae_cafe.cafe import load_cafe

    out: dict = {}
    for m in cfg.models:
        mdir = m.name.replace("/", "_")
        layers = sorted(p.name for p in (run_dir / "saes" / mdir).iterdir()
                        if p.is_dir() and not p.name.startswith("."))
        out["layers"] = layers
        per = {}
        for layer in layers:
            r = ShardReader(run_dir / "acts" / mdir / layer)
            sae_cfg = json.loads((run_dir / "saes" / mdir / layer / "cfg.json").read_text())
            cafe = load_cafe(run_dir / "cafe" / mdir / layer)
            ierf = cafe.anchors.get("ierf16")
            man = read_manifest(run_dir / "cafe" / mdir / layer)
            per[layer] = {"images": r.n_images, "d_in": r.d_in, "d_sae": sae_cfg.get("d_sae"),
                          "sae_ge_2x": int(sae_cfg.get("d_sae", 0)) >= 2 * r.d_in,
                          "cafe_k": (man.get("config") or {}).get("k"),
                          "cafe_n_anchor": (man.get("config") or {}).get("n_anchor"),
                          "ierf_px": list(ierf.shape[-2:]) if ierf is not None else None,
                          "ierfs": int(ierf.shape[0]) if ierf is not None else 0,
                          "exemplars": man.get("n_exemplars"),
                          "cards": len(list((run_dir / "cafe" / mdir / layer / "cards").glob("*.png")))}
        out["per_layer"] = per
        icat = run_dir / "icat" / mdir
        if (icat / "manifest.json").exists():
            im = read_manifest(icat)
            graphs = sorted(p.name for p in (icat / "graphs").glob("class_*.json"))
            g = json.loads((icat / "graphs" / graphs[0]).read_text()) if graphs else {}
            out["icat"] = {"layers": im.get("layers"), "target": im.get("target"), "graphs": len(graphs),
                           "edges_first_graph": len(g.get("links", [])), "cases": im.get("cases")}
    return out


def partial_record(config: Path, root: Path, threads: int) -> dict:
    """The record of a run that was stopped before it finished (from its ``pipeline_state.json``): the stages
    it built with their key metrics; wall seconds per stage are not known (the report is written at the end)."""
    sys.path.insert(0, str(REPO))
    from sae_training.pipeline import load_config

    cfg = load_config(config)
    state = json.loads((root / cfg.run / "pipeline_state.json").read_text())
    stages = {}
    for v in state.get("outputs", {}).values():
        stages.setdefault(v["stage"], {"stage": v["stage"], "status": "built", "seconds": None,
                                       "metrics": {k: m for k, m in v.get("metrics", {}).items()
                                                   if not str(k).startswith("_")}, "error": None})
    return {"config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
            "run": cfg.run, "model": [m.name for m in cfg.models], "images": cfg.images, "exit_code": None,
            "incomplete": True, "wall_seconds": None, "pipeline_seconds": None, "within_target": None,
            # elapsed wall time at the stop, from the image folder the run wrote in its first seconds
            "elapsed_seconds_at_stop": round(time.time() - (root / cfg.run / "images").stat().st_mtime, 0),
            "threads": threads, "load_average_before": None, "load_average_after": list(os.getloadavg()),
            "stages": list(stages.values()), "checks": {}, "model_warnings": {}}


def markdown(results: dict) -> str:
    lines = ["End to end on foundation ViTs (random weights, `sae-cafe demo --config …` from scratch under `nice`, "
             "per-stage wall seconds from `demo_report.json`, CPU seconds of the run's process from /proc; "
             "written by `benchmarks/bench_foundation_e2e.py`). The 2-core machine was shared with other jobs "
             "(load average below): wall time measures the load, CPU seconds / threads bounds the wall time "
             "the run needs on an idle machine. The SAE stages stop at a wall-clock budget, so under load they "
             "train fewer steps.", ""]
    for rec in results["runs"].values():
        c = rec.get("checks") or {}
        per = c.get("per_layer", {})
        first = next(iter(per.values()), {})
        cpu = rec.get("cpu_seconds")
        wall = rec.get("wall_seconds")
        head = f"**{rec['config']}** ({', '.join(rec['model'])}, images `{rec['images']}`, {rec['threads']} threads): "
        if rec.get("incomplete"):
            head += (f"stopped after {rec.get('elapsed_seconds_at_stop', 0) / 60:.0f} min wall, before it finished "
                     f"(the deadline of the measurement): {len(rec['stages'])} stages built"
                     + (f", {cpu:.0f} CPU s" if cpu else ""))
        else:
            head += (f"{wall / 60:.1f} min wall ({'within' if rec['within_target'] else 'over'} the 15-min target), "
                     f"exit {rec['exit_code']}")
            if cpu:
                head += (f", {cpu:.0f} CPU s (≈ {cpu / rec['threads'] / 60:.1f}–{cpu / 60:.1f} min on an idle "
                         f"{rec['threads']}-core machine)")
        if rec.get("incomplete") and rec.get("load_average_after"):
            head += f"; load average {rec['load_average_after'][0]:.1f} (1-min) at the stop"
        if rec.get("load_average_before"):
            head += (f"; load average {rec['load_average_before'][0]:.1f} → {rec['load_average_after'][0]:.1f} "
                     "(1-min, before → after)")
        lines.append(head + ".")
        if per:
            lines.append(f"Blocks {', '.join(per)}: {first.get('images')} images, SAEs "
                         + ", ".join(f"{v['d_in']}→{v['d_sae']}" for v in per.values())
                         + f", CAFE k = {first.get('cafe_k')} (iERFs for {first.get('cafe_n_anchor')} per latent, "
                         f"{'×'.join(map(str, first.get('ierf_px') or []))} px), exemplars / iERFs "
                         + ", ".join(f"{v['exemplars']} / {v.get('ierfs')}" for v in per.values())
                         + f"; ICAT target {((c.get('icat') or {}).get('target') or {}).get('kind', 'class')}, "
                         f"{(c.get('icat') or {}).get('graphs')} graph(s).")
        if rec.get("cpu_note"):
            lines.append(f"({rec['cpu_note']}.)")
        stage_cpu = rec.get("stage_cpu_seconds") or {}
        lines += ["", "| stage | status | wall s | CPU s |", "|---|---|---:|---:|"]
        for s_ in rec["stages"]:
            w = "" if s_["seconds"] is None else f"{s_['seconds']:.1f}"
            cs = stage_cpu.get(s_["stage"])
            lines.append(f"| {s_['stage']} | {s_['status']} | {w} | {'' if cs is None else f'{cs:.1f}'} |")
        if not rec.get("incomplete"):
            lines.append(f"| **total** | exit {rec['exit_code']} | {wall:.1f} | {'' if not cpu else f'{cpu:.1f}'} |")
        lines.append("")
    return "\n".join(lines)


def merge(args) -> int:
    """Merge bench results, CPU watch records (``--attach``) and stopped runs (``--partial``) into ``--out``."""
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"runs": {}}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    cpu = []
    for f in args.merge:
        d = json.loads(Path(f).read_text())
        if "runs" in d:
            results["runs"].update(d["runs"])
        else:
            cpu.append(d)
    for c in args.partial:
        rec = partial_record((REPO / c).resolve(), Path(args.root).resolve(), 2)
        results["runs"][rec["config"]] = rec
    for d in cpu:  # attach the CPU record to the run it watched
        for rec in results["runs"].values():
            if Path(d["run_dir"]).name == rec["run"]:
                rec["cpu_seconds"], rec["stage_cpu_seconds"] = d["total"], d["stages"]
                rec["cpu_note"] = ("CPU per stage: CPU time since the previous finished stage was seen (polled every "
                                   "2 s; stages seen finished in one poll, e.g. before a watcher attached to a "
                                   "running process with --attach, are lumped into the first of them)")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=None, help=f"run config(s) (default: {', '.join(CONFIGS)})")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of the run")
    ap.add_argument("--root", default="/tmp/foundation_e2e", help="artifact root of the runs (deleted per run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "foundation_e2e"),
                    help="results stem: writes STEM.json and STEM.md")
    ap.add_argument("--attach", type=int, default=None, help="only watch the live `sae-cafe demo` process PID "
                    "(its CPU time per stage) and write the record to --out.cpu.json")
    ap.add_argument("--merge", nargs="*", default=None, help="instead of running: merge these results / .cpu.json "
                    "files (and --partial configs) into --out")
    ap.add_argument("--partial", action="append", default=[], help="with --merge: a config whose run under --root "
                    "was stopped before it finished (recorded from its pipeline_state.json)")
    args = ap.parse_args(argv)
    if args.merge is not None:
        return merge(args)
    if args.attach:
        run_dir = Path(args.root) / load_run_name(args.config[0])
        rec = watch(args.attach, run_dir, lambda: None if cpu_seconds(args.attach) is not None else 0)
        Path(f"{args.out}.cpu.json").write_text(json.dumps({"pid": args.attach, "run_dir": str(run_dir), **rec}) + "\n")
        return 0
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"runs": {}}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for c in args.config or CONFIGS:
        config = (REPO / c).resolve() if not Path(c).is_absolute() else Path(c)
        rec = run_config(config, root, args.threads)
        results["runs"][rec["config"]] = rec
        print(f"{rec['config']}: exit {rec['exit_code']}, {rec['wall_seconds']:.1f} s wall, load "
              f"{rec['load_average_before'][0]:.2f} → {rec['load_average_after'][0]:.2f}")
        for s in rec["stages"]:
            print(f"  {s['stage']:<40} {s['status']:<8} {s['seconds']:8.1f}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(results))
    return 0 if all(r["exit_code"] == 0 for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
