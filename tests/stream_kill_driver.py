"""Kill-and-resume driver of streamed SAE training (``tests/test_stream.py`` runs it as a script).

The fork-server pattern of ``tests/interrupt_driver.py`` (``tests/fork_server.py``): torch, sae-lens and
sae-cafe are imported once; every run (the uninterrupted reference, each killed run, each resume) is a fresh
``os.fork()`` child, and a resuming child sees only what the killed one left on disk. Kill points are
file-system operations under the trial's directory (stratified over 1..N of the reference run, with a seeded
coin cutting a temporary file before its rename) and ``os.replace`` calls (the renames that publish
checkpoints and stages), so they land in the same places on a fast or a loaded machine.

Per trial the driver records whether the killed run died, whether the resume finished, the step it resumed
from and whether every SAE's ``sae_weights.safetensors`` and ``cfg.json`` are byte-identical to the reference.

Usage: ``python tests/stream_kill_driver.py OUT.json WORKDIR [--kills 4] [--markers 3] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import fork_server as fs

fs.prepare_process()  # before torch, tqdm or sae-lens start threads or create locks

import torch  # noqa: E402

torch.set_num_threads(1)

import sae_lens.training.multi_sae_trainer  # noqa: E402, F401 - imported once, before the forks
from tiny_models import tiny_vit  # noqa: E402

from sae_training.stream import StreamConfig, StreamSAE, train_saes_streaming  # noqa: E402
from sae_training.train import SAETrainConfig  # noqa: E402

CFG = StreamConfig(steps=24, batch_size=32, buffer_rows=256, n_checkpoints=3, image_batch_size=8)
SPECS = [StreamSAE(layer, SAETrainConfig(architecture=arch, expansion=4, k=4), None if arch == "batchtopk" else arch)
         for layer in ("blocks.0", "blocks.1") for arch in ("batchtopk", "standard")]


def run(root: Path) -> None:
    adapter = tiny_vit()
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    train_saes_streaming(adapter, images, SPECS, CFG, run="r", root=root, progress=False)


def outputs(root: Path) -> dict[str, bytes]:
    """Every SAE's weights and cfg (bytes) by relative path, plus the names left beside the stages."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name in ("sae_weights.safetensors", "cfg.json"):
            out[rel] = p.read_bytes()
        elif p.name.startswith("."):
            out[rel] = b"leftover"
    return out


def resumed_from(root: Path) -> list:
    return sorted({json.loads(p.read_text()).get("resumed_from_step") or 0 for p in root.rglob("training.json")})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("work")
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--markers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    rng = random.Random(args.seed)
    res: dict = {"config": {"steps": CFG.steps, "batch_size": CFG.batch_size, "saes": len(SPECS)},
                 "trials": [], "errors": [], "fork_hazards": fs.fork_hazards()}

    # reference: count file-system events and renames under its directory
    ref, counts = work / "ref", work / "logs" / "ref.counts"
    box: dict = {}

    def setup():
        box["fs"], box["rep"] = fs.count_fs_events(ref), fs.count_replaces()

    def body():
        run(ref)
        counts.write_text(json.dumps([box["fs"][0], box["rep"][0]]))

    ref.mkdir()
    t0 = time.perf_counter()
    status, secs, hang = fs.wait(fs.fork_child(body, work / "logs" / "ref.log", setup), 600, work / "logs" / "ref.log")
    res["reference_s"] = round(time.perf_counter() - t0, 2)
    if status != "ok":
        res["errors"].append(f"reference: {status} {hang}\n{(work / 'logs' / 'ref.log').read_text()[-3000:]}")
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 1
    n_fs, n_rep = json.loads(counts.read_text())
    res.update(n_fs_events=n_fs, n_replaces=n_rep)
    expected = outputs(ref)
    deadline = max(60.0, 20 * secs)

    plans = []
    for i in range(args.kills):  # one kill per stratum of the file-system events
        lo, hi = 1 + i * n_fs // args.kills, max(1 + i * n_fs // args.kills, (i + 1) * n_fs // args.kills)
        plans.append(("fs", rng.randint(lo, hi), rng.choice([None, 0.5])))
    for i in range(args.markers):  # publishing renames: checkpoints, exports
        plans.append(("replace", 1 + (i * n_rep) // args.markers, "mid-write" if i % 2 == 0 else "after"))
    for j, (kind, k, how) in enumerate(plans):
        root, log = work / f"t{j}", work / "logs" / f"t{j}.log"
        root.mkdir()
        kill = (lambda k=k, how=how, root=root: fs.kill_at_fs_event(root, k, how)) if kind == "fs" else (
            lambda k=k, how=how: fs.kill_at_replace(k, how))
        st_kill, _, h1 = fs.wait(fs.fork_child(lambda root=root: run(root), log, kill), deadline, log)
        st_res, s_res, h2 = fs.wait(fs.fork_child(lambda root=root: run(root), log), deadline, log)
        got = outputs(root) if st_res == "ok" else {}
        trial = {"kill": kind, "k": k, "how": how, "killed": st_kill, "kill_point": fs.kill_point(log),
                 "resume": st_res, "resume_s": round(s_res, 2), "resumed_from": resumed_from(root),
                 "identical": got == expected, "hung": bool(h1 or h2)}
        if got and got != expected:
            trial["differs"] = sorted(set(got) ^ set(expected)) + [p for p in got if p in expected and
                                                                    got[p] != expected[p]]
        if st_res != "ok":
            res["errors"].append(f"t{j} resume: {st_res}\n{log.read_text()[-3000:]}")
        res["trials"].append(trial)
        Path(args.out).write_text(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
