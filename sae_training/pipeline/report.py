"""The end-of-run report: a per-stage table (status, seconds, key metrics or error), the reasons of every
NaN / 0 in it, the notes and warnings, and ``<run>/demo_report.json``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

REPORT = "demo_report.json"
COLOUR = {"built": "green", "skipped": "dim", "failed": "red", "blocked": "yellow"}


def _blank(v: Any) -> bool:
    """NaN, or a zero count/score."""
    return isinstance(v, float) and math.isnan(v) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and v == 0)


def explained(r) -> dict[str, str]:
    """metric → reason for every NaN (and every 0 the stage explained) among a stage result's metrics."""
    out = {k: v for k, v in r.reasons.items() if k in r.metrics}
    for k, v in r.metrics.items():
        if k not in out and isinstance(v, float) and math.isnan(v):
            out[k] = "not computed (see the stage's notes above)"
    return out


def fmt_metrics(metrics: dict[str, Any], reasons: dict[str, str] | None = None) -> str:
    """``k=v, …`` of the key metrics (paths and tracebacks left out); a value with a reason gets a ``*``."""
    parts = []
    for k, v in metrics.items():
        hidden = k == "traceback" or (isinstance(v, str) and k.endswith(("png", "table")))
        if hidden or (v is None and k not in (reasons or {})):
            continue
        if isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k}={v}{'*' if reasons and k in reasons else ''}")
    return ", ".join(parts)


def print_report(ctx, results: dict[str, Any], total: float, plan_notes: list[str]) -> None:
    """Print the table and summary and write ``<run>/demo_report.json``."""
    from rich.table import Table

    from sae_cafe.artifacts import atomic_write_json

    con = ctx.console
    t = Table(title=f"sae-cafe demo: stages ({total:.1f} s in all)")
    for col in ("stage", "status", "seconds", "key metrics / error"):
        t.add_column(col, justify="right" if col == "seconds" else "left", overflow="fold")
    for r in results.values():
        info = r.error if r.error else fmt_metrics(r.metrics, explained(r))
        t.add_row(r.name, f"[{COLOUR[r.status]}]{r.status}", f"{r.seconds:.1f}", info)
    con.print(t)
    why = [(r.name, k, r.metrics.get(k), reason) for r in results.values() for k, reason in explained(r).items()]
    if why:
        con.print("[bold]* why these values[/bold]:")
        for name, k, v, reason in why:
            con.print(f"  {name}: {k}={v}: {reason}")
    for name, texts in ctx.model_warnings.items():
        for text in texts:
            con.print(f"[red]warning ({name})[/red]: {text}")
    failed = [r for r in results.values() if r.status == "failed"]
    blocked = [r for r in results.values() if r.status == "blocked"]
    built = [r for r in results.values() if r.status in ("built", "skipped")]
    con.print(f"[bold]Summary[/bold]: {len(built)} stages ready, {len(failed)} failed, "
              f"{len(blocked)} blocked; artifacts under {ctx.run_dir}/")
    kinds: dict[str, list[str]] = {}
    for r in built:
        kinds.setdefault(r.name.split("/")[0], []).append("/".join(r.name.split("/")[1:]) or ".")
    for k, names in kinds.items():
        con.print(f"  {k + '/':<10} {', '.join(names)}")
    for r in failed:
        con.print(f"[red]  failed {r.name}: {r.error}")
    atomic_write_json(ctx.run_dir / REPORT, {
        "run": ctx.cfg.run, "root": str(ctx.root), "device": ctx.device, "total_seconds": total,
        "config": ctx.cfg, "plan_notes": plan_notes, "model_warnings": ctx.model_warnings,
        "labels": ctx.label_decisions,
        "stages": [{**dataclasses.asdict(r), "reasons": explained(r)} for r in results.values()]})
    if built:
        con.print(f"Open the viewer:  [bold]sae-cafe view {ctx.run_dir}[/bold]")
    if failed or blocked:
        con.print(f"[red]demo incomplete: see the table above and {ctx.run_dir / REPORT}")
