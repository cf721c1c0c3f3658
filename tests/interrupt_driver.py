"""SIGKILL-at-random-points driver for ``tests/test_interrupt.py`` (run as a script, one process for all stages).

The driver imports torch, sae-lens and sae-cafe once and then acts as a fork server: every run of a stage
(the uninterrupted reference, its rerun, each killed run and each resume) is a fresh ``os.fork()`` child, so
a run costs no interpreter start or import. A killed child leaves only what it wrote to disk, and the
resuming child (another fork of the driver, which never ran the stage itself) sees nothing but that state.
``tests/fork_server.py`` makes the forks safe (no lock held at fork time, no extra thread; what could still
deadlock a child is recorded as ``fork_hazards``), places the kills and puts a deadline on every wait.

Per stage (activation extraction → SAE training → CAFE build on the concept world with the shipped mini
ResNet; each stage consumes the reference output of the one before):

1. ``reference``: one uninterrupted run; the number N of its file-system operations under the work
   directory (CPython audit events: opens, renames, mkdirs, removes, directory scans), its ``os.replace``
   calls, its wall time and the hash of its stage directories.
2. ``rerun``: a second uninterrupted run in another directory (determinism: hash-equal? same N?).
3. ``kills`` trials, each in a fresh directory: the child SIGKILLs itself at its k-th file-system operation,
   k drawn (seeded) from the i-th of ``kills`` equal strata of 1..N, so the kills spread over every phase
   whatever the machine's speed; at a rename of a temporary file, with a seeded coin, the file is first cut
   to a seeded fraction (a kill mid-write). Then a new child resumes it to completion and its hash is
   compared with the reference.
4. ``marker`` trials: the child kills itself at chosen ``os.replace`` calls, the renames that publish every
   file, checkpoint and stage: with the temporary file cut to half its size just before the rename (a kill
   mid-write), or just after the rename (between rename steps); then resume and compare.

Every wait has a deadline (``--deadline`` for the reference runs, then ``max(--min-deadline, 40·T)``); a run
past it is recorded in ``hung`` (thread states, wait channels, Python and native stacks), its process group
is killed, and the whole run or trial is retried once in a fresh directory (a second hang is an error). The
results file is rewritten after every trial, so a driver stopped from outside leaves what it measured.
``--inject-hang I`` makes the first attempt of kill trial I (first stage) deadlock on purpose, so that the
deadline, the hang report and the retry are exercised by every test run.

The hash covers every file of the stage directories, hidden ones included (bytes; JSON parsed, with
run-dependent fields such as ``created_at``, timings and the trial's own path removed) and the names of the
entries beside each stage directory (so a leftover ``.<name>.tmp``/``.old`` fails the comparison).

Usage: ``python tests/interrupt_driver.py OUT.json WORKDIR [--kills 20] [--markers 4] [--seed 0]
[--inject-hang I]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import fork_server as fs

fs.prepare_process()  # before torch, tqdm or sae-lens start threads or create locks

import torch  # noqa: E402

torch.set_num_threads(1)

# run-dependent JSON fields (wall-clock times, which checkpoint a run resumed from) are not artifact content
VOLATILE = {"created_at", "timings", "train_seconds", "samples_per_second", "resumed_from_step"}
N_WORLD, N_CAFE, SAE_STEPS = 24, 4, 32
INJECTED_DEADLINE = 5.0  # seconds; the injected child reaches its deadlock long before


# ----- hashing ------------------------------------------------------------------------------------------------
def _strip(obj, root: str):
    if isinstance(obj, dict):
        return {k: _strip(v, root) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    return obj


def tree_hash(stage_dirs: list[Path], root: Path) -> str:
    """sha256 over the stage directories: every file (JSON minus volatile fields) and the names beside them."""
    h = hashlib.sha256()
    for d in stage_dirs:
        h.update(b"\0siblings\0" + "\n".join(sorted(p.name for p in d.parent.iterdir())).encode())
        if not d.is_dir():
            h.update(b"\0missing\0")
            continue
        for p in sorted(d.rglob("*")):
            if not p.is_file():
                continue
            h.update(b"\0file\0" + str(p.relative_to(d)).encode() + b"\0")
            data = p.read_bytes()
            if p.suffix == ".json":
                data = json.dumps(_strip(json.loads(data), str(root)), sort_keys=True).encode()
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


# ----- the stages -------------------------------------------------------------------------------------------
class Pipeline:
    """Inputs built once in the driver; ``run_<stage>(root)`` is what a child executes."""

    def __init__(self, work: Path):
        import faiss
        import sae_lens.config  # noqa: F401 - everything a stage imports lazily is imported here, once
        import sae_lens.training.sae_trainer  # noqa: F401

        import sae_cafe.cafe  # noqa: F401
        import sae_cafe.srd  # noqa: F401
        import sae_training.train  # noqa: F401
        from sae_cafe.images import iter_image_files
        from sae_cafe.models import load_model
        from sae_cafe.world import generate
        from sae_cafe.world.dataset import write_world

        faiss.omp_set_num_threads(1)
        self.work = work
        self.world = generate(N_WORLD, seed=7)
        self.world_dir = write_world("concept", world=self.world, root=work / "inputs")
        self.images = self.world_dir / "images"
        self.cafe_images = [p for p, _ in iter_image_files(self.images)][:N_CAFE]
        self.model = load_model("mini_resnet")
        self.acts_ref: Path | None = None
        self.sae = None
        self.n_shards = 0

    # stage directories of a run rooted at ``root``
    def dirs(self, stage: str, root: Path) -> list[Path]:
        if stage == "acts":
            return [root / "r" / "acts" / "mini_resnet" / n for n in ("layer3", "layer4")]
        if stage == "saes":
            return [root / "r" / "saes" / "mini_resnet" / "layer3"]
        return [root / "r" / "cafe" / "mini_resnet" / "layer3"]

    def run(self, stage: str, root: Path, warm_up: bool = False) -> None:
        """Run ``stage`` into ``root`` (``warm_up``: a small in-process run on other inputs, see below)."""
        if stage == "acts":
            from sae_cafe.activations.extract import extract_activations

            extract_activations(self.model, self.cafe_images[:4] if warm_up else self.images, ["layer3", "layer4"],
                                run="r", root=root, shard_size=64, batch_size=4, progress=False)
        elif stage == "saes":
            from sae_training.train import train_sae

            steps = 8 if warm_up else SAE_STEPS
            train_sae(self.acts_ref, self.dirs("saes", root)[0], architecture="batchtopk", expansion=1, k=8,
                      steps=steps, batch_size=64, n_checkpoints=steps // 4 - 1, progress=False, evaluate=False)
        else:
            from sae_cafe.cafe import build_cafe

            build_cafe(self.model, self.sae, "layer3", self.cafe_images[:2 if warm_up else N_CAFE],
                       out_dir=self.dirs("cafe", root)[0], k=2, n_sample=4, batch_size=2, checkpoint_every=1,
                       anchor_batch=1, anchor_chunk=1, progress=False)

    def warm_up(self, stage: str) -> None:
        """Run the stage once in the driver on other, smaller inputs (in a scratch directory), so that the
        children inherit warm kernel and allocator caches instead of each paying for them (about a third of
        a CAFE build). Only caches of the process are warmed: every child still finds its stage directory
        in the state the previous child left on disk, and nothing else."""
        scratch = self.work / "warm_up" / stage
        self.run(stage, scratch, warm_up=True)
        shutil.rmtree(scratch, ignore_errors=True)

    def after_reference(self, stage: str, root: Path) -> None:
        """Feed the reference output of a stage to the next one."""
        if stage == "acts":
            self.acts_ref = self.dirs("acts", root)[0]
            self.n_shards = sum(len(json.loads((d / "manifest.json").read_text())["shards"])
                                for d in self.dirs("acts", root))
        elif stage == "saes":
            from sae_cafe.saes import load_sae

            self.sae = load_sae(self.dirs("saes", root)[0], self.model, "layer3")

    def phase(self, stage: str, root: Path) -> str:
        """Where a killed run was, read from what it left on disk."""
        final = self.dirs(stage, root)[-1]
        tmp = final.with_name(f".{final.name}.tmp")
        if stage == "acts":
            finals = self.dirs(stage, root)
            tmps = [f.with_name(f".{f.name}.tmp") for f in finals]
            if all((f / "manifest.json").exists() for f in finals):
                return "after publishing"
            if any((t / "manifest.json").exists() for t in tmps) or any(
                    (f / "manifest.json").exists() for f in finals):
                return "writing manifests / publishing"
            n = 0
            for t in tmps:
                with contextlib.suppress(OSError, ValueError):
                    n += len(json.loads((t / "progress.json").read_text())["shards"])
            if n == 0:
                return "setup (no shard recorded)" if not any(t.exists() for t in tmps) else "first shards"
            return f"extracting ({'1st' if n < self.n_shards / 2 else '2nd'} half of the shards)"
        if stage == "saes":
            if (final / "manifest.json").exists():
                return "after publishing"
            if (tmp / "manifest.json").exists():
                return "manifest written, not published"
            cks = sorted((tmp / "checkpoints").glob("step_*")) if tmp.exists() else []
            if not tmp.exists():
                return "setup"
            if not cks:
                return "norm estimate / steps before the 1st checkpoint"
            step = int(cks[-1].name.split("_")[1])
            if step >= SAE_STEPS:
                return "exporting (final checkpoint saved)"
            return f"training ({'1st' if step < SAE_STEPS / 2 else '2nd'} half of the steps)"
        if (final / "manifest.json").exists():
            return "after publishing"
        if not tmp.exists():
            return "setup"
        if (tmp / "manifest.json").exists():
            return "manifest written, not published"
        if (tmp / "topk.safetensors").exists():
            return "writing outputs"
        if list(tmp.glob("anchor_*.safetensors")):
            return "anchoring"
        if (tmp / "mining_state.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(tmp / "mining_state.safetensors"), "pt") as f:
                done = json.loads(f.metadata()["meta"])["done"]
            return "mining" if done < N_CAFE else "mined, anchoring the first chunk"
        return "mining the first batch"


# ----- the protocol ---------------------------------------------------------------------------------------------
class Results:
    """The results file, rewritten (atomically) after every trial."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def flush(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def partial_files(stage_dirs: list[Path]) -> int:
    from sae_cafe.artifacts import is_partial_file

    n = 0
    for d in stage_dirs:
        tmp = d.with_name(f".{d.name}.tmp")
        if tmp.is_dir():
            n += sum(1 for p in tmp.rglob(".*") if is_partial_file(p.name))
    return n


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


class StageRun:
    """One stage's protocol; ``res`` is its part of the results file."""

    def __init__(self, pipe: Pipeline, stage: str, work: Path, results: Results, deadline: float):
        self.pipe, self.stage, self.work, self.results = pipe, stage, work, results
        self.base, self.logs = work / stage, work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.base.mkdir(exist_ok=True)  # so that every run of the stage makes the same file-system operations
        self.deadline = deadline
        self.res: dict = {"stage": stage, "trials": [], "markers": [], "errors": [], "hung": [], "retried": [],
                          "fork_hazards": []}
        results.data["stages"][stage] = self.res
        self.h_ref = ""

    def hazards(self, found: list[str]) -> None:
        self.res["fork_hazards"] += [h for h in found if h not in self.res["fork_hazards"]]

    def fork(self, root: Path, log: Path, setup=None, after=None,
             deadline: float | None = None) -> tuple[str, float, dict | None]:
        """Run the stage into ``root`` in a forked child (``setup``/``after``: in the child, around the run)."""
        self.hazards(fs.fork_hazards())

        def body():
            self.pipe.run(self.stage, root)
            if after is not None:
                after()

        return fs.wait(fs.fork_child(body, log, setup), deadline or self.deadline, log)

    def retrying(self, what: str, unit):
        """``unit(attempt) -> (result, hang)``; a hang is recorded and the unit retried once."""
        for attempt in range(2):
            out, hang = unit(attempt)
            if hang is None:
                return out
            self.res["hung"].append({"what": what, "attempt": attempt, **hang})
            if attempt == 0:
                self.res["retried"].append(what)
            self.results.flush()
        self.res["errors"].append(f"{what}: hung twice (deadline {hang['deadline_s']} s); see hung[]")
        return None

    def resume_and_compare(self, root: Path, log: Path) -> tuple[dict | None, dict | None]:
        status, secs, hang = self.fork(root, log)
        if hang is not None:
            return None, hang
        same = status == "ok" and tree_hash(self.pipe.dirs(self.stage, root), root) == self.h_ref
        if status != "ok":
            self.res["errors"].append(f"resume in {root.name}: {status}\n{_tail(log)}")
        return {"resume_s": round(secs, 3), "identical": same}, None

    def reference(self) -> bool:
        """The uninterrupted reference run (counting file-system events and renames) and its rerun."""
        pipe, stage = self.pipe, self.stage

        def counted(name: str):
            def unit(attempt: int):
                root, log = self.base / f"{name}_{attempt}", self.logs / f"{stage}_{name}_{attempt}.log"
                counts = self.logs / f"{stage}_{name}_{attempt}.counts"
                box: dict = {}

                def setup():
                    box["fs"], box["replace"] = fs.count_fs_events(self.work), fs.count_replaces()

                def after():
                    counts.write_text(json.dumps([box["fs"][0], box["replace"][0]]))

                status, secs, hang = self.fork(root, log, setup, after)
                if hang is not None:
                    return None, hang
                if status != "ok":
                    self.res["errors"].append(f"{name} run: {status}\n{_tail(log)}")
                    return None, None
                n_fs, n_replace = json.loads(counts.read_text())
                return (root, secs, n_fs, n_replace, tree_hash(pipe.dirs(stage, root), root)), None
            return unit

        ref = self.retrying("reference run", counted("reference"))
        if ref is None:
            return False
        root, t_ref, self.n_events, self.n_replace, self.h_ref = ref
        pipe.after_reference(stage, root)
        rerun = self.retrying("rerun", counted("rerun"))
        self.res["rerun_identical"] = rerun is not None and rerun[4] == self.h_ref
        if rerun is not None and rerun[2] != self.n_events:
            self.res["warnings"] = [f"file-system events: {self.n_events} in the reference run, {rerun[2]} in the "
                                    "rerun; kill points drawn from the fewer"]
            self.n_events = min(self.n_events, rerun[2])
        if rerun is not None:
            shutil.rmtree(rerun[0], ignore_errors=True)
        t = min(t_ref, rerun[1]) if rerun is not None else t_ref
        self.res.update(reference_s=round(t, 3), events=self.n_events, renames=self.n_replace)
        self.deadline = max(self.min_deadline, 40 * t)
        self.res["deadline_s"] = round(self.deadline, 1)
        return True

    def kill_trial(self, i: int, k: int, cut: float | None) -> None:
        pipe, stage = self.pipe, self.stage

        def unit(attempt: int):
            root, log = self.base / f"kill_{i:02d}_{attempt}", self.logs / f"{stage}_kill_{i:02d}_{attempt}.log"
            if attempt == 0 and i == self.inject_hang:  # the self-test of the deadline: a child that never ends
                status, _, hang = self.fork(root, log, setup=fs.deadlock, deadline=INJECTED_DEADLINE)
                if hang is None:
                    self.res["errors"].append(f"kill trial {i}: the injected deadlock ended ({status})\n{_tail(log)}")
                    return None, None
                return None, {**hang, "injected": True}
            status, _, hang = self.fork(root, log, setup=lambda: fs.kill_at_fs_event(self.work, k, cut))
            if hang is not None:
                return None, hang
            if status != "killed":
                self.res["errors"].append(f"kill trial {i}: the run ended ({status}) before its kill point, "
                                          f"file-system event {k} of {self.n_events}\n{_tail(log)}")
                return None, None
            rec = {"kill": i, "event": k, "of": self.n_events, "at": fs.kill_point(log),
                   "phase": pipe.phase(stage, root), "partial_files": partial_files(pipe.dirs(stage, root))}
            out, hang = self.resume_and_compare(root, log)
            if hang is not None:
                return None, hang
            if out["identical"]:
                shutil.rmtree(root, ignore_errors=True)
            return {**rec, **out, "attempt": attempt}, None

        rec = self.retrying(f"kill trial {i}", unit)
        if rec is not None:
            self.res["trials"].append(rec)

    def marker_trial(self, j: int, k: int, mode: str) -> None:
        pipe, stage, n = self.pipe, self.stage, self.n_replace

        def unit(attempt: int):
            root, log = self.base / f"marker_{j}_{attempt}", self.logs / f"{stage}_marker_{j}_{attempt}.log"
            status, _, hang = self.fork(root, log, setup=lambda: fs.kill_at_replace(k, mode))
            if hang is not None:
                return None, hang
            if status != "killed":
                self.res["errors"].append(f"marker kill {j} (rename {k}/{n}, {mode}): {status}\n{_tail(log)}")
                return None, None
            rec = {"rename": k, "of": n, "mode": mode, "phase": pipe.phase(stage, root),
                   "partial_files": partial_files(pipe.dirs(stage, root))}
            out, hang = self.resume_and_compare(root, log)
            if hang is not None:
                return None, hang
            if out["identical"]:
                shutil.rmtree(root, ignore_errors=True)
            return {**rec, **out, "attempt": attempt}, None

        rec = self.retrying(f"marker kill {j}", unit)
        if rec is not None:
            self.res["markers"].append(rec)

    def run(self, kills: int, markers: int, rng: random.Random, min_deadline: float,
            inject_hang: int | None = None) -> dict:
        self.min_deadline, self.inject_hang = min_deadline, inject_hang
        self.pipe.warm_up(self.stage)
        self.hazards(fs.fork_hazards(full=True))
        if not self.reference():
            return self.res
        self.results.flush()
        if self.n_events < kills:
            self.res["errors"].append(f"{self.n_events} file-system events, fewer than {kills} kill points")
        for i in range(kills):
            u, coin, frac = rng.random(), rng.random(), rng.random()
            lo, hi = 1 + i * self.n_events // kills, 1 + (i + 1) * self.n_events // kills  # stratum i of 1..N
            k = lo + int(u * (hi - lo))
            self.kill_trial(i, k, frac if coin < 0.5 else None)
            self.results.flush()
        n = self.n_replace
        points = [(1, "mid-write"), (max(1, n // 2), "after"), (max(1, n - 1), "mid-write"),
                  (max(1, n - 1), "after")][:markers]
        for j, (k, mode) in enumerate(points):
            self.marker_trial(j, k, mode)
            self.results.flush()
        t, m = self.res["trials"], self.res["markers"]
        self.res.update(kills=len(t), identical=sum(x["identical"] for x in t), marker_kills=len(m),
                        marker_identical=sum(x["identical"] for x in m),
                        kills_leaving_partial_files=sum(x["partial_files"] > 0 for x in t + m),
                        phases={p: sum(x["phase"] == p for x in t) for p in sorted({x["phase"] for x in t})})
        return self.res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("work")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--markers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="acts,saes,cafe")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds a reference run may take")
    ap.add_argument("--min-deadline", type=float, default=30.0, help="least seconds any later run may take")
    ap.add_argument("--inject-hang", type=int, default=None, metavar="I",
                    help=f"self-test: the first attempt of kill trial I of the first stage deadlocks (deadline "
                         f"{INJECTED_DEADLINE} s), so the hang report and the retry run every time")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Results(Path(a.out), {
        "seed": a.seed, "kills_per_stage": a.kills, "kill_points": "file-system events", "stages": {},
        "setup": {"world": f"{N_WORLD} concept-world scenes (seed 7), 64 px", "model": "mini_resnet",
                  "acts": "layers layer3 + layer4, 4 images per batch, 64-row shards",
                  "saes": f"layer3, BatchTopK, 48 latents, {SAE_STEPS} steps of 64 rows, checkpoint every 4 steps",
                  "cafe": f"layer3 SAE over {N_CAFE} scenes, k=2, mining checkpoint every batch of 2 images, "
                          "anchoring chunks of 1 image"}})
    pipe = Pipeline(work)
    results.data["setup_s"] = round(time.perf_counter() - t0, 1)
    rng = random.Random(a.seed)
    for n, stage in enumerate(a.stages.split(",")):
        ts = time.perf_counter()
        sr = StageRun(pipe, stage, work, results, a.deadline)
        sr.run(a.kills, a.markers, rng, a.min_deadline, a.inject_hang if n == 0 else None)
        sr.res["seconds"] = round(time.perf_counter() - ts, 1)
        results.data["total_s"] = round(time.perf_counter() - t0, 1)
        results.flush()
        print(f"{stage}: {sr.res.get('identical', 0)}/{sr.res.get('kills', 0)} identical, "
              f"{len(sr.res['hung'])} hung, {len(sr.res['errors'])} errors, {sr.res['seconds']} s", file=sys.stderr)
        if "reference_s" not in sr.res:
            break  # the next stage needs this one's reference output
    results.data["complete"] = True
    results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
