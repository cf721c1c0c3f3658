"""A new user's first own-model run, end to end: ``configs/own_model_quick.toml`` on a 40-image folder and random
torchvision ResNet-50 weights saved to a file, through the real CLI in a fresh directory, then the latent
browser in headless Chromium.

1. Makes a fresh working directory holding ``data/my_images/<class>/*.png`` (4 class folders × 10 deterministic
   224-px crops of ``skimage.data`` photos: astronaut, cat, coffee, rocket; no download) and
   ``weights/resnet50.pth`` (torch.save of a seeded random ``torchvision.models.resnet50()`` state dict).
2. Runs ``python -m sae_cafe demo --config configs/own_model_quick.toml`` there (the paths of the shipped
   config, relative to the working directory), timing the whole command and sampling ``/proc/loadavg``.
3. Starts ``python -m sae_cafe view <run>`` (the real server), opens every page in headless Chromium (Debian
   ``chromium`` + ``chromedriver`` through selenium; ``app.browser``, as ``tests/test_app_browser.py``) and
   checks: no error box, no "No … in run" message, and on the latent browser every exemplar image is a decoded
   ``<img>`` whose pixels are those of the user's file named in its caption (nearest of all 40 files, mean abs.
   difference below a JPEG tolerance), not a grey placeholder. Saves a screenshot of the latent browser.
4. Writes ``benchmarks/results/own_model_quick.{json,md,png}``: per-stage seconds (``demo_report.json``),
   total wall time, the load average during the run, the browser check. Exit 1 when the run or a check
   failed, or the wall time exceeds ``--target`` seconds.

    nice -n 5 .venv/bin/python benchmarks/bench_own_model_quick.py [--workdir DIR] [--out benchmarks/results]
                                                                   [--target 600] [--no-browser]

Timing is the point of this script, so nothing here is a unit test; ``tests/test_own_model_quick.py`` checks
the same config (scaled down) for correctness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "own_model_quick.toml"
CLASSES = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
PER_CLASS, SIZE = 10, 224
PAGES = [("", "sae-cafe viewer"), ("Image_explorer", "Image explorer"), ("Concept_graph", "Concept graph"),
         ("Metrics", "Metrics"), ("Latent_browser", "Latent browser")]
MAX_MAE = 12.0  # mean |Δ| (0–255) of a shown exemplar vs its file: JPEG transport only (a grey placeholder: ≫ 30)


def make_images(folder: Path) -> dict[str, np.ndarray]:
    """4 class folders × ``PER_CLASS`` PNG crops (``SIZE`` px) of skimage.data photos, seeded; name → pixels."""
    from PIL import Image
    from skimage import data

    out = {}
    for c, (name, photo) in enumerate(CLASSES.items()):
        img = getattr(data, photo)()
        h, w = img.shape[:2]
        rng = np.random.default_rng(c)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = Image.fromarray(img[y:y + s, x:x + s]).resize((SIZE, SIZE), Image.BICUBIC)
            rel = f"{name}/{name}-{i:02d}.png"  # no underscores: the viewer's captions are Markdown
            crop.save(folder / rel)
            out[rel] = np.asarray(crop)
    return out


def make_weights(path: Path) -> str:
    """torch.save of a seeded random torchvision ResNet-50 state dict; its sha256."""
    import torch
    import torchvision

    from sae_cafe.artifacts import hash_file

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return hash_file(path)


class LoadSampler(threading.Thread):
    """1-minute load average every ``every`` seconds while the run goes."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop.wait(self.every)


def run_demo(work: Path, log: Path) -> tuple[int, float, float, list[float]]:
    """(exit code, wall seconds, CPU seconds (user + system), load samples) of ``sae-cafe demo --config`` run
    in ``work``."""
    import resource

    sampler = LoadSampler()
    sampler.start()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = ru.ru_utime + ru.ru_stime
    t = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "sae_cafe", "demo", "--config", str(CONFIG)], cwd=work,
                            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    wall = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler.stop.set()
    sampler.join()
    return rc, wall, ru.ru_utime + ru.ru_stime - cpu0, sampler.samples


def class_push_share(run: Path, report: dict) -> list[dict]:
    """Per CAFE stage of the run: the seconds of its class push (manifest ``timings.class_push_s``) and their
    share of the whole stage (``demo_report.json`` seconds)."""
    out = []
    for s in report.get("stages", []):
        mf = run / s["name"] / "manifest.json"
        if s["name"].startswith("cafe/") and mf.exists():
            m = json.loads(mf.read_text())
            push = m.get("timings", {}).get("class_push_s")
            out.append({"stage": s["name"], "n_latents": m.get("n_latents"), "class_push_seconds": push,
                        "stage_seconds": round(s["seconds"], 1),
                        "percent": None if push is None else round(100 * push / max(s["seconds"], 1e-9), 2)})
    return out


# (src, decoded natural width, caption) of every image on the page
IMAGES_JS = """return Array.from(document.querySelectorAll('[data-testid="stImageContainer"]')).map(e => {
  const i = e.querySelector('img'); const c = e.querySelector('[data-testid="stImageCaption"]');
  return [i ? i.src : null, i && i.complete ? i.naturalWidth : 0, c ? c.innerText : ''];});"""


def check_exemplars(driver, files: dict[str, np.ndarray]) -> dict:
    """Every exemplar image of the card (caption ``#rank name · …``): decoded, and its pixels are those of
    the named user file (the nearest of all files by mean abs. difference, below ``MAX_MAE``)."""
    import io

    from PIL import Image

    names = list(files)
    stack = np.stack([files[n].astype(np.float32) for n in names])  # (F, SIZE, SIZE, 3)
    shown = []
    for src, width, caption in driver.execute_script(IMAGES_JS):
        if not caption.startswith("#"):
            continue  # the activation map / iERF overlays of the triplet
        named = caption.split(" ", 1)[1].split(" · ")[0].strip()
        # the caption names the file as the run recorded it (absolute since relative config paths are resolved):
        # compare by its path inside the image folder
        named = next((n for n in names if named == n or named.endswith("/" + n)), named)
        if not src or not width:
            shown.append({"caption": caption, "decoded": False})
            continue
        img = Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())).convert("RGB")
        px = np.asarray(img.resize((SIZE, SIZE), Image.BOX), np.float32)
        mae = np.abs(stack - px).mean(axis=(1, 2, 3))
        best = int(mae.argmin())
        shown.append({"caption": caption, "decoded": True, "natural_width": int(width), "named": named,
                      "nearest_file": names[best], "mae": round(float(mae[best]), 2),
                      "mae_named": round(float(mae[names.index(named)]), 2) if named in names else None,
                      "pixel_std": round(float(px.std()), 1)})
    ok = bool(shown) and all(s["decoded"] and s["nearest_file"] == s["named"] and s["mae"] <= MAX_MAE
                             and s["pixel_std"] > 10 for s in shown)
    return {"exemplars": shown, "ok": ok, "max_mae": MAX_MAE}


def browser_check(run: Path, files: dict[str, np.ndarray], shot: Path, scratch: Path) -> dict:
    """Every page loaded without an error or a "No … in run" message; the latent browser's exemplars."""
    from selenium.webdriver.support.ui import WebDriverWait

    from app.browser import body_text, browser, error_boxes, settle, viewer, wait_title

    pages, result = {}, {}
    with viewer(run, scratch / "view.log", cli=True, timeout=180, grace=30) as server, \
            browser(scratch / "chromium-profile", window=(1400, 2200), page_load_timeout=180) as driver:
        for path, title in PAGES:
            t = time.perf_counter()
            driver.get(f"{server.url}/{path}")
            wait_title(driver, title, 180)
            if path == "Latent_browser":
                WebDriverWait(driver, 240).until(lambda d: sum(1 for s in d.execute_script(IMAGES_JS)
                                                               if s[2].startswith("#")) >= 1)
            settle(driver, 240)
            body, errors = body_text(driver), error_boxes(driver)
            empty = [ln for ln in body.splitlines() if ln.startswith("No ") and " in run " in ln]
            pages[title] = {"seconds": round(time.perf_counter() - t, 1), "errors": [e[:300] for e in errors],
                            "empty": empty, "ok": not errors and not empty and "Traceback" not in body}
            if path == "Latent_browser":
                result = check_exemplars(driver, files)
                result["placeholder_warning"] = "not readable" in body
                result["ok"] = result["ok"] and not result["placeholder_warning"]
                time.sleep(1.5)  # let the images paint
                driver.save_screenshot(str(shot))
    return {"pages": pages, "latent_browser": result,
            "ok": all(p["ok"] for p in pages.values()) and bool(result.get("ok"))}


def markdown(res: dict) -> str:
    """The results table (README-ready)."""
    lines = [f"`sae-cafe demo --config configs/own_model_quick.toml`: random torchvision ResNet-50 weights from a "
             f"file, {res['n_images']} images (4 folders), fresh directory, {res['machine']['cpus']} CPU cores "
             f"({res['machine']['cpu']}), torch {res['torch_threads']} threads, nice {res['nice']}; load average "
             f"during the run {res['load']['mean']:.1f} mean, {res['load']['max']:.1f} max "
             f"(before: {res['load']['before']:.1f}). {res['date']}, commit {res['commit'][:10]}.", "",
             "| stage | status | seconds |", "|---|---|---:|"]
    for s in res["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |")
    lines += [f"| **whole command (wall)** | exit {res['exit_code']} | **{res['wall_seconds']:.1f}** |",
              f"| whole command, CPU time (user + system, all threads) | | {res['cpu_seconds']:.1f} |", "",
              f"Target ≤ {res['target_seconds']:.0f} s: **{'met' if res['within_target'] else 'MISSED'}**."]
    for c in res["class_push"]:
        if c["percent"] is not None:
            lines.append(f"Class push in `{c['stage']}` ({c['n_latents']} latents): {c['class_push_seconds']:.2f} s, "
                         f"{c['percent']:.1f} % of the stage.")
    b = res.get("browser")
    if b:
        ex = b["latent_browser"].get("exemplars", [])
        good = sum(1 for e in ex if e.get("decoded") and e.get("nearest_file") == e.get("named"))
        maes = [e["mae"] for e in ex if e.get("decoded")]
        lines.append(f"Headless Chromium: {len(b['pages'])} pages without error or empty stage "
                     f"({sum(p['ok'] for p in b['pages'].values())} ok); latent browser: {good}/{len(ex)} exemplar "
                     f"images decoded and equal to the user's named file (mean |Δ| ≤ "
                     f"{max(maes) if maes else float('nan'):.1f}/255, JPEG transport), "
                     f"{'no' if not b['latent_browser'].get('placeholder_warning') else 'a'} placeholder warning. "
                     f"Screenshot: `benchmarks/results/own_model_quick.png`.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="fresh working directory (default: a new temp dir; "
                    "an existing one is refused)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the results go")
    ap.add_argument("--target", type=float, default=600.0, help="wall-time target in seconds")
    ap.add_argument("--no-browser", action="store_true", help="skip the headless-Chromium check")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="own_model_quick_"))
    if args.workdir:
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"{work} is not empty; the run must start from a fresh directory")
        work.mkdir(parents=True, exist_ok=True)
    scratch = work / "_bench"
    scratch.mkdir()
    import torch

    files = make_images(work / "data" / "my_images")
    sha = make_weights(work / "weights" / "resnet50.pth")
    before = os.getloadavg()[0]
    print(f"working directory {work}; {len(files)} images; weights sha256 {sha[:16]}…; load {before:.2f}", flush=True)
    rc, wall, cpu, load = run_demo(work, scratch / "demo.log")
    print(f"demo exit {rc} after {wall:.1f} s, {cpu:.1f} CPU s (log {scratch / 'demo.log'})", flush=True)
    run = work / "indexes" / "quick"
    report = json.loads((run / "demo_report.json").read_text()) if (run / "demo_report.json").exists() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    res = {"config": str(CONFIG.relative_to(REPO)), "n_images": len(files), "weights_sha256": sha,
           "exit_code": rc, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
           "target_seconds": args.target,
           "within_target": rc == 0 and wall <= args.target,
           "demo_total_seconds": report.get("total_seconds"),
           "stages": [{"name": s["name"], "status": s["status"], "seconds": round(s["seconds"], 1)}
                      for s in report.get("stages", [])],
           "class_push": class_push_share(run, report),
           "plan_notes": report.get("plan_notes", []), "labels": report.get("labels"),
           "load": {"before": round(before, 2), "mean": round(float(np.mean(load)), 2) if load else before,
                    "max": round(float(np.max(load)), 2) if load else before, "samples_every_s": 5,
                    "samples": [round(v, 2) for v in load]},
           "nice": os.nice(0), "torch_threads": torch.get_num_threads(),
           "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "torch": torch.__version__},
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
           "uncommitted_changes": dirty}
    try:
        with open("/proc/cpuinfo") as f:
            res["machine"]["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_browser and rc == 0:
        from app.browser import unavailable

        if unavailable():
            res["browser"] = None
            print(f"browser check skipped: {unavailable()}", flush=True)
        else:
            res["browser"] = browser_check(run, files, args.out / "own_model_quick.png", scratch)
            print(f"browser check ok={res['browser']['ok']}", flush=True)
    (args.out / "own_model_quick.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "own_model_quick.md").write_text(markdown(res))
    print(markdown(res))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = res["within_target"] and (args.no_browser or bool(res.get("browser") and res["browser"]["ok"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
