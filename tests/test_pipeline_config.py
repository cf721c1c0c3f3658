"""The pipeline's run configs (packaged, frozen, fitted to the data) and the visible fallbacks of
``sae-cafe demo``: IVF → Flat, SAE batch capped, dead-latent advice, SRD grid across classes, random
weights warned and recorded, reasons for NaN/0 in the summary, one ``--run`` default and ``--device``."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from sae_cafe.errors import SaeCafeError
from sae_training.pipeline import RunConfig, RunContext, config_files, default_config_path, load_config
from sae_training.pipeline.cafe import IVF_POINTS_PER_LIST, fit_index
from sae_training.pipeline.report import explained, fmt_metrics
from sae_training.pipeline.sae import SAESettings, dead_latent_advice, fit_batch
from sae_training.pipeline.saliency import reasons

REPO = Path(__file__).resolve().parent.parent


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


def test_packaged_configs_equal_the_user_copies():
    shipped = config_files()
    assert {"demo.toml", "own_model_resnet50.toml", "own_model_timm_vit.toml"} <= set(shipped)
    user = {p.name: p for p in (REPO / "configs").glob("*.toml")}
    assert set(user) == set(shipped), "every configs/*.toml is shipped in sae_training/pipeline/configs/"
    for name, p in user.items():
        assert p.read_text() == shipped[name].read_text(), f"configs/{name} differs from the packaged copy"
    for name in shipped:  # each one loads
        cfg = load_config(REPO / "configs" / name)
        assert cfg.models and all(m.layers for m in cfg.models)


def test_default_config_is_package_data():
    import tomllib

    p = default_config_path()
    assert p.is_file() and Path(str(p)).parent.name == "configs" and Path(str(p)).parent.parent.name == "pipeline"
    assert load_config() == load_config(REPO / "configs" / "demo.toml")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pipeline/configs/*.toml" in data["tool"]["setuptools"]["package-data"]["sae_training"]


@pytest.mark.slow
def test_default_config_found_from_an_installed_layout(tmp_path):
    """The packages copied as a wheel would install them (no repository around them, no configs/ next to
    them): the default config is still found, through importlib.resources."""
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("sae_cafe", "sae_training"):
        shutil.copytree(REPO / pkg, site / pkg, ignore=ignore)
    code = ("import sae_training, sae_training.pipeline as p; c = p.load_config(); "
            "print(sae_training.__file__); print(p.default_config_path()); print(c.run, len(c.models))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)), lines
    assert lines[2] == "demo 2"


def test_run_config_is_frozen_and_checked(tmp_path):
    cfg = load_config(overrides={"run": "other", "root": None})
    assert cfg.run == "other" and cfg.root == "indexes"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sae.steps = 3
    p = tmp_path / "c.toml"
    p.write_text('labels = "sorted"\n')
    with pytest.raises(SaeCafeError, match="labels"):
        load_config(p)
    p.write_text('[[models]]\nname = "mini_resnet"\nlayers = ["layer2"]\n[[models]]\nname = "mini_resnet"\n'
                 'layers = ["layer3"]\n')
    with pytest.raises(SaeCafeError, match="twice"):
        load_config(p)
    for f in dataclasses.fields(RunConfig):  # every field documented in the class or its section
        assert f.name in (RunConfig.__doc__ or "") or f.name in _attribute_docs(RunConfig) or f.name in (
            "world", "extract", "sae", "cafe", "icat", "saliency"), f.name


def _attribute_docs(cls) -> set[str]:
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    return {a.target.id for a, b in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
            and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant)}


def test_ivf_only_with_enough_points():
    notes: list[str] = []
    # the user's case: 308 exemplars, IVF would train 70 lists
    assert fit_index("IVF", 308, notes) == "Flat"
    assert len(notes) == 1 and "Flat" in notes[0] and "308" in notes[0]
    notes.clear()
    assert fit_index("IVF256,Flat", 256 * IVF_POINTS_PER_LIST - 1, notes) == "Flat" and notes
    notes.clear()
    assert fit_index("IVF256,Flat", 256 * IVF_POINTS_PER_LIST, notes) == "IVF256,Flat" and not notes
    n = 400_000  # IVF picks 4·√n = 2529 lists, ≥ 39 points each
    assert fit_index("IVF", n, notes) == "IVF" and not notes
    assert fit_index("Flat", 10, notes) == "Flat" and fit_index("HNSW", 10, notes) == "HNSW" and not notes


def test_sae_batch_capped_by_the_pfvs():
    notes: list[str] = []
    s = SAESettings(batch_size=4096, holdout=0.1)
    got = fit_batch(s, n_pfvs=40 * 49, n_images=40, notes=notes)  # 36 training images × 49 positions
    assert got.batch_size == 36 * 49 // 2 and len(notes) == 1 and "4096" in notes[0]
    notes.clear()
    assert fit_batch(SAESettings(batch_size=128), 10_000, 100, notes).batch_size == 128 and not notes


def test_dead_latents_warning_says_how_to_fix():
    s = SAESettings(steps=4000, seconds=60.0, expansion=8)
    msg = dead_latent_advice(0.97, s, steps=42, seconds=60.0)
    assert msg and "97%" in msg and "time budget" in msg and "sae.seconds" in msg and "expansion" in msg
    assert "step budget" in dead_latent_advice(0.6, s, steps=4000, seconds=10.0)
    assert dead_latent_advice(0.3, s, 4000, 10.0) is None and dead_latent_advice(float("nan"), s, 1, 1) is None


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (10 * i, 20, 30)).save(root / c / f"{c}_{i}.png")
    return root


def test_srd_grid_spreads_across_classes(tmp_path):
    folder = _folder(tmp_path / "imgs", {"a": 5, "b": 5, "c": 5})
    ctx = RunContext(dataclasses.replace(RunConfig(), images=str(folder), device="cpu", root=str(tmp_path)),
                     console=_console()[0])
    files = ctx.folder_files()
    idx = ctx.spread(3)
    assert sorted(files[i][1] for i in idx) == ["a", "b", "c"]
    idx = ctx.spread(5)
    assert {files[i][1] for i in idx} == {"a", "b", "c"} and len(idx) == 5
    assert ctx.spread(100) == list(range(15))
    # max_images: N images spread over the classes too (not the first N of the sorted folder)
    ctx6 = RunContext(dataclasses.replace(ctx.cfg, max_images=6), console=_console()[0])
    assert [c for _, c in ctx6.folder_files()] == ["a", "a", "b", "b", "c", "c"]
    assert [p.name for p, _ in ctx6.folder_files()][:2] == ["a_0.png", "a_1.png"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8)).save(flat / f"{i:02d}.png")
    ctx = RunContext(dataclasses.replace(RunConfig(), images=str(flat), device="cpu"), console=_console()[0])
    assert ctx.spread(3) == [0, 3, 6]


def test_random_weights_are_warned_and_recorded():
    from sae_training.pipeline import ModelSettings

    con, buf = _console()
    ctx = RunContext(dataclasses.replace(RunConfig(), device="cpu"), console=con)
    own = ModelSettings("resnet18", layers=("layer3",))
    assert ctx.random_weights(own)
    assert "no weights file given" in buf.getvalue() and ctx.model_warnings["resnet18"]
    rec = ctx.weights_record(own)
    assert rec["random_weights"] is True and rec["model_record"]
    mini = ModelSettings("mini_resnet", layers=("layer3",))  # shipped weights: not random, no warning
    assert not ctx.random_weights(mini) and "mini_resnet" not in ctx.model_warnings


def test_every_nan_and_zero_in_the_summary_has_a_reason():
    from sae_training.pipeline import StageResult

    out = {"srd_pointing": float("nan"), "srd_localisation": float("nan"), "srd_insertion": 0.0,
           "best_localisation": None}
    why = reasons(out, have_masks=False, metrics={"pointing", "localisation", "insertion"}, random_weights=True)
    assert "no masks" in why["srd_pointing"] and "no masks" in why["srd_localisation"]
    assert "random weights" in why["srd_insertion"] and why["best_localisation"]
    assert not reasons({"srd_pointing": 0.5, "srd_localisation": 0.4, "srd_insertion": 0.3,
                        "best_localisation": "srd"}, True, {"pointing", "localisation", "insertion"}, False)
    r = StageResult("saes/m/l", "built", metrics={"explained_variance": math.nan, "l0": 8.0}, reasons={})
    assert "not computed" in explained(r)["explained_variance"]
    assert "explained_variance=nan*" in fmt_metrics(r.metrics, explained(r))


def _subparsers():
    import argparse

    from sae_cafe.cli import build_parser

    parser = build_parser()
    act = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return act.choices


#: subcommands without --device, and why
NO_DEVICE = {"routes": "prints a finished ICAT stage; runs no model",
             "make-world": "generates images; runs no model",
             "view": "the viewer picks its device itself",
             "train-model": "trains a mini model on the CPU by design",
             "eval-models": "evaluates the CPU-sized mini models"}


def test_one_run_default_and_a_device_option_everywhere():
    subs = _subparsers()
    assert {"demo", "extract", "train-sae", "build-index", "graph", "srd"} <= set(subs)
    for name, p in subs.items():
        opts = {o: a for a in p._actions for o in a.option_strings}
        if "--run" in opts and name != "demo":  # demo: the config's run (demo.toml: "demo")
            assert opts["--run"].default == "demo", f"sae-cafe {name} --run defaults to {opts['--run'].default!r}"
        if ("--model" in opts or name == "demo") and name not in NO_DEVICE:
            assert "--device" in opts, f"sae-cafe {name} has no --device"
    assert load_config().run == "demo"


def test_bench_sae_refuses_a_missing_mini_model(tmp_path, monkeypatch):
    import importlib.util

    from sae_cafe.models import mini

    spec = importlib.util.spec_from_file_location("bench_sae", REPO / "benchmarks" / "bench_sae.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(mini, "weights_path", lambda arch: tmp_path / f"{arch}.safetensors")
    with pytest.raises(SaeCafeError, match="mini_resnet.*missing"):
        bench._adapter("mini_resnet")
    with pytest.raises(SaeCafeError, match="random"):
        bench._adapter("resnet18")


def test_folder_labels_are_never_a_silent_index_mapping(tmp_path):
    from sae_cafe.errors import MismatchError
    from sae_training.pipeline import ModelSettings

    folder = _folder(tmp_path / "imgs", {"cat": 2, "dog": 2})  # not class names of the mini ResNet
    m = ModelSettings("mini_resnet", layers=("layer3",))
    cfg = dataclasses.replace(RunConfig(), images=str(folder), device="cpu", labels="folder")
    ctx = RunContext(cfg, console=_console()[0])
    notes: list[str] = []
    x, labels, masks, ids = ctx.labelled_images(4, ctx.adapter(m), notes=notes)
    import torch

    pred = ctx.adapter(m).model(x).argmax(1)
    assert torch.equal(labels, pred) and masks is None and len(ids) == 4
    assert any("not the model's class ids" in n for n in notes) and any("no mask" in n for n in notes)
    assert ctx.label_decisions["mini_resnet"]["model_classes"] is False
    ctx = RunContext(dataclasses.replace(cfg, labels="class_names"), console=_console()[0])
    with pytest.raises(MismatchError, match="cat"):
        ctx.labelled_images(4, ctx.adapter(m))
