"""SIGKILL-at-random-points driver for ``tests/test_interrupt.py`` (run as a script, one process for all stages).

The driver imports torch, sae-lens and sae-cafe once and then acts as a fork server: every run of a stage
(the uninterrupted reference, its rerun, each killed run and each resume) is a fresh ``os.fork()`` child, so
a run costs no interpreter start or import. A killed child is SIGKILLed by the driver; it leaves only what it
wrote to disk, and the resuming child (another fork of the driver, which never ran the stage itself) sees
nothing but that on-disk state.

Per stage (activation extraction → SAE training → CAFE build on the concept world with the shipped mini
ResNet; each stage consumes the reference output of the one before):

1. ``reference``: one uninterrupted run; its wall time T and the hash of its stage directories.
2. ``rerun``: a second uninterrupted run in another directory (determinism: hash-equal?).
3. ``kills`` timed trials, each in a fresh directory: start the stage, SIGKILL it after ``f·T`` with
   ``f`` drawn (seeded) from the i-th of ``kills`` equal strata of (0, 1), so the kills spread over every phase;
   then resume it in a new child to completion and compare its hash with the reference. A run that finished
   before its kill is not counted: the trial is retried with half the delay.
4. ``marker`` trials: the child kills itself (SIGKILL) at chosen ``os.replace`` calls, the renames that
   publish every file, checkpoint and stage: with the temporary file cut to half its size just before the
   rename (a kill mid-write), or just after the rename (between rename steps); then resume and compare.

The hash covers every file of the stage directories, hidden ones included (bytes; JSON parsed, with
run-dependent fields such as ``created_at``, timings and the trial's own path removed) and the names of the
entries beside each stage directory (so a leftover ``.<name>.tmp``/``.old`` fails the comparison).

Usage: ``python tests/interrupt_driver.py OUT.json WORKDIR [--kills 20] [--markers 4] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import tqdm  # noqa: E402

# no tqdm monitor thread in the fork server: a thread holding a lock at fork() can deadlock the child
tqdm.tqdm.monitor_interval = 0

# run-dependent JSON fields (wall-clock times, which checkpoint a run resumed from) are not artifact content
VOLATILE = {"created_at", "timings", "train_seconds", "samples_per_second", "resumed_from_step"}
N_WORLD, N_CAFE, SAE_STEPS = 24, 4, 32


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


# ----- fork server ----------------------------------------------------------------------------------------------
def spawn(pipe: Pipeline, stage: str, root: Path, log: Path, marker: tuple[int, str] | None = None,
          count_file: Path | None = None) -> int:
    """Fork a child that runs ``stage`` into ``root`` (optionally killing itself at an ``os.replace``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # fewer copy-on-write page copies in the child
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if marker is not None or count_file is not None:
            _patch_replace(marker, count_file)
        pipe.run(stage, root)
        if count_file is not None:
            count_file.write_text(str(_REPLACES[0]))
        code = 0
    except BaseException:  # noqa: BLE001 - report and exit the child whatever happened
        traceback.print_exc()
    finally:
        os._exit(code)


_REPLACES = [0]


def _patch_replace(marker: tuple[int, str] | None, count_file: Path | None) -> None:
    orig = os.replace

    def replace(src, dst, *a, **kw):
        _REPLACES[0] += 1
        hit = marker is not None and _REPLACES[0] == marker[0]
        if hit and marker[1] == "mid-write":
            if os.path.isfile(src):
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(src, dst, *a, **kw)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    os.replace = replace


def wait(pid: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    _, status = os.waitpid(pid, 0)
    return _status(status), time.perf_counter() - t0


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "ok" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def kill_after(pid: int, delay: float) -> tuple[str, float]:
    """SIGKILL ``pid`` ``delay`` seconds after it was forked, unless it has finished by then.

    Returns the outcome and the seconds until the kill (or until the run finished)."""
    t0 = time.perf_counter()
    while (left := t0 + delay - time.perf_counter()) > 0:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _status(status), time.perf_counter() - t0
        time.sleep(min(left, 0.004))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return _status(status), time.perf_counter() - t0


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


def run_stage(pipe: Pipeline, stage: str, work: Path, kills: int, markers: int, rng: random.Random) -> dict:
    base = work / stage
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    res: dict = {"stage": stage, "trials": [], "markers": [], "errors": []}

    # 1. reference (also counts the os.replace calls, for the marker kills)
    pipe.warm_up(stage)
    ref = base / "reference"
    t0 = time.perf_counter()
    pid = spawn(pipe, stage, ref, logs / f"{stage}_reference.log", count_file=logs / f"{stage}_replaces")
    status, _ = wait(pid)
    T = time.perf_counter() - t0
    if status != "ok":
        res["errors"].append(f"reference run: {status}\n{_tail(logs / f'{stage}_reference.log')}")
        return res
    h_ref = tree_hash(pipe.dirs(stage, ref), ref)
    n_replace = int((logs / f"{stage}_replaces").read_text())
    pipe.after_reference(stage, ref)

    # 2. determinism: an uninterrupted rerun (T: the shorter of the two runs)
    rerun = base / "rerun"
    status, t_rerun = wait(spawn(pipe, stage, rerun, logs / f"{stage}_rerun.log"))
    res["rerun_identical"] = status == "ok" and tree_hash(pipe.dirs(stage, rerun), rerun) == h_ref
    shutil.rmtree(rerun, ignore_errors=True)
    T = min(T, t_rerun)
    res.update(reference_s=round(T, 3), renames=n_replace)

    def resume_and_compare(root: Path, log: Path) -> tuple[bool, float, str]:
        status, secs = wait(spawn(pipe, stage, root, log))
        same = status == "ok" and tree_hash(pipe.dirs(stage, root), root) == h_ref
        return same, secs, status

    # 3. timed kills
    for i in range(kills):
        frac = (i + rng.random()) / kills
        tries = 0
        while True:
            root = base / f"kill_{i:02d}_{tries}"
            log = logs / f"{stage}_kill_{i:02d}_{tries}.log"
            delay = frac * T
            status, secs = kill_after(spawn(pipe, stage, root, log), delay)
            if status == "killed":
                break
            shutil.rmtree(root, ignore_errors=True)
            if status != "ok":
                res["errors"].append(f"kill trial {i}: run failed before the kill: {status}\n{_tail(log)}")
                break
            tries += 1
            T = min(T, secs)  # a run faster than the reference (load varies): time the kills on it
            res["finished_before_kill"] = res.get("finished_before_kill", 0) + 1
            if tries == 10:
                res["errors"].append(f"kill trial {i}: ten runs finished before their kill")
                break
        if status != "killed":
            continue
        phase = pipe.phase(stage, root)
        partial = partial_files(pipe.dirs(stage, root))
        same, secs, rstatus = resume_and_compare(root, log)
        if rstatus != "ok":
            res["errors"].append(f"resume after kill {i}: {rstatus}\n{_tail(log)}")
        res["trials"].append({"kill": i, "delay_s": round(delay, 4), "fraction": round(frac, 4),
                              "phase": phase, "partial_files": partial, "resume_s": round(secs, 3),
                              "identical": same})
        if same:
            shutil.rmtree(root, ignore_errors=True)

    # 4. kills at rename points (mid-write of the temporary file, or right after the rename)
    n = n_replace
    points = [(1, "mid-write"), (max(1, n // 2), "after"), (max(1, n - 1), "mid-write"),
              (max(1, n - 1), "after")][:markers]
    for j, (k, mode) in enumerate(points):
        root = base / f"marker_{j}"
        log = logs / f"{stage}_marker_{j}.log"
        status, _ = wait(spawn(pipe, stage, root, log, marker=(k, mode)))
        if status != "killed":
            res["errors"].append(f"marker kill {j} (rename {k}/{n}, {mode}): {status}\n{_tail(log)}")
            continue
        phase = pipe.phase(stage, root)
        partial = partial_files(pipe.dirs(stage, root))
        same, secs, rstatus = resume_and_compare(root, log)
        if rstatus != "ok":
            res["errors"].append(f"resume after marker kill {j}: {rstatus}\n{_tail(log)}")
        res["markers"].append({"rename": k, "of": n, "mode": mode, "phase": phase, "partial_files": partial,
                               "identical": same})
        if same:
            shutil.rmtree(root, ignore_errors=True)

    t = res["trials"]
    res.update(kills=len(t), identical=sum(x["identical"] for x in t),
               marker_kills=len(res["markers"]), marker_identical=sum(x["identical"] for x in res["markers"]),
               kills_leaving_partial_files=sum(x["partial_files"] > 0 for x in t + res["markers"]),
               phases={p: sum(x["phase"] == p for x in t) for p in sorted({x["phase"] for x in t})})
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("work")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--markers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="acts,saes,cafe")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(work)
    setup_s = time.perf_counter() - t0
    rng = random.Random(a.seed)
    stages = {}
    for stage in a.stages.split(","):
        ts = time.perf_counter()
        stages[stage] = run_stage(pipe, stage, work, a.kills, a.markers, rng)
        stages[stage]["seconds"] = round(time.perf_counter() - ts, 1)
        if stages[stage]["errors"] and "reference_s" not in stages[stage]:
            break  # the next stage needs this one's reference output
    out = {"seed": a.seed, "kills_per_stage": a.kills, "setup_s": round(setup_s, 1),
           "total_s": round(time.perf_counter() - t0, 1), "stages": stages,
           "setup": {"world": f"{N_WORLD} concept-world scenes (seed 7), 64 px", "model": "mini_resnet",
                     "acts": "layers layer3 + layer4, 4 images per batch, 64-row shards",
                     "saes": f"layer3, BatchTopK, 48 latents, {SAE_STEPS} steps of 64 rows, checkpoint every 4 "
                             "steps",
                     "cafe": f"layer3 SAE over {N_CAFE} scenes, k=2, mining checkpoint every batch of 2 images, "
                             "anchoring chunks of 1 image"}}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
