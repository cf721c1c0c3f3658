"""Plans a run's stage DAG from its config and runs it (what ``sae-cafe demo`` does)."""

from __future__ import annotations

import time

from . import cafe, extract, icat, sae, saliency, srd, world
from .context import RunContext
from .dag import STATE, Pipeline, Stage, short_error
from .report import print_report

#: stage modules in build order (each ``stages(ctx)`` adds its stages; dependencies come first)
STAGE_MODULES = (world, srd, extract, sae, cafe, icat, saliency)


class Run(RunContext):
    """One pipeline run of a :class:`~.config.RunConfig` into ``<root>/<run>/``."""

    def stages(self) -> list[Stage]:
        """The stage DAG in build order."""
        out: list[Stage] = []
        for mod in STAGE_MODULES:
            out += mod.stages(self)
        return out

    def run(self) -> int:
        """Build every stage that is not up to date; print the report. Returns 0 when every stage is built
        or skipped, else 1."""
        import torch

        if self.cfg.threads:
            torch.set_num_threads(int(self.cfg.threads))
        self.console.print(f"[bold]sae-cafe demo[/bold] → {self.run_dir}  (device {self.device}, "
                           f"{torch.get_num_threads()} CPU threads{', fresh' if self.fresh else ''})")
        pipe = Pipeline(self.fresh, self.console, state_path=self.run_dir / STATE)
        self.results = pipe.results
        t0 = time.perf_counter()
        try:
            stages = self.stages()
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable image folder
            self.console.print(f"[red]cannot plan the demo: {short_error(e)}")
            raise
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for st in stages:
            pipe.run(st)
        plan_notes = [f"{name}: {t}" for name, ts in self.model_warnings.items() for t in ts]
        print_report(self, pipe.results, time.perf_counter() - t0, plan_notes)
        return 0 if all(r.status in ("built", "skipped") for r in pipe.results.values()) else 1


Demo = Run  # the name used before the pipeline became a package
