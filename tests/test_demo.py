"""``sae-cafe demo``: the whole pipeline on a tiny config (every stage's manifest, skip on rerun, failures
reported) and the incremental bookkeeping of :class:`sae_training.demo.Pipeline`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rich.console import Console

from sae_cafe.artifacts import read_manifest, write_manifest
from sae_training.demo import Demo, ModelSettings, Pipeline, Stage, load_config

TINY = """
run = "tiny"
device = "cpu"
srd_images = 1
[world]
n = 24
seed = 3
[extract]
batch_size = 24
[sae]
d_sae = 16
steps = 10
seconds = 10.0
batch_size = 128
n_checkpoints = 0
[cafe]
k = 4
n_anchor = 1
n_sample = 4
batch_size = 24
cards = 1
[icat]
n_images = 12
steps = 2
per_class = 1
max_classes = 1
max_nodes = 3
top_k = 2
cases = false
[saliency]
n = 3
n_fidelity = 0
methods = "saliency,gradcam"
metrics = ["pointing", "sparseness"]
[[models]]
name = "mini_resnet"
layers = ["layer4"]
[[models]]
name = "mini_vit"
weights = "VIT_WEIGHTS"
layers = ["1"]
srd = false
cafe = false
icat = false
saliency = false
"""


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def _statuses(root: Path, run: str) -> dict[str, str]:
    rep = json.loads((root / run / "demo_report.json").read_text())
    return {s["name"]: s["status"] for s in rep["stages"]}


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sae_cafe.models.mini import make_mini_vit

    torch.manual_seed(0)
    vit = tmp_path / "mini_vit_random.safetensors"  # the shipped ViT weights are not needed for this test
    save_file({k: v.contiguous() for k, v in make_mini_vit().state_dict().items()}, str(vit))
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TINY.replace("VIT_WEIGHTS", str(vit)))
    root = tmp_path / "idx"
    cfg = load_config(cfg_path, {"root": str(root)})
    assert Demo(cfg, console=_quiet()).run() == 0
    run = root / "tiny"
    expected = {"world": run / "world", "srd/mini_resnet": run / "srd/mini_resnet",
                "acts/mini_resnet": run / "acts/mini_resnet/layer4", "acts/mini_vit":
                run / "acts/mini_vit/encoder.layers.encoder_layer_1",
                "saes/mini_resnet/layer4": run / "saes/mini_resnet/layer4",
                "saes/mini_vit/1": run / "saes/mini_vit/encoder.layers.encoder_layer_1",
                "cafe/mini_resnet/layer4": run / "cafe/mini_resnet/layer4",
                "icat/mini_resnet": run / "icat/mini_resnet",
                "saliency/mini_resnet": run / "saliency/mini_resnet"}
    st = _statuses(root, "tiny")
    assert st == dict.fromkeys(expected, "built")
    state = json.loads((run / "pipeline_state.json").read_text())["outputs"]
    for name, d in expected.items():
        read_manifest(d)
        assert state[str(d)]["stage"] == name and state[str(d)]["key"], name
        assert "demo_key" not in read_manifest(d)  # finished manifests are not rewritten
    assert (run / "srd/mini_resnet/maps.png").stat().st_size > 0
    assert list((run / "cafe/mini_resnet/layer4/cards").glob("*.png"))
    assert (run / "saliency/mini_resnet/table.csv").exists()
    # upstream links survive the demo's stamping: the SAE still points at its acts stage
    assert read_manifest(expected["saes/mini_resnet/layer4"])["upstream"]["acts"]["path"].endswith("layer4")

    # second run: everything is up to date; a model with a wrong layer fails, its SAE is blocked, exit 1
    cfg = load_config(cfg_path, {"root": str(root)})
    cfg = dataclasses.replace(cfg, models=(*cfg.models, ModelSettings(
        "mini_vgg", layers=("no_such_layer",), srd=False, cafe=False, icat=False, saliency=False)))
    assert Demo(cfg, console=_quiet()).run() == 1
    st = _statuses(root, "tiny")
    assert all(st[n] == "skipped" for n in expected), st
    assert st["acts/mini_vgg"] == "failed" and st["saes/mini_vgg/no_such_layer"] == "blocked"
    rep = json.loads((run / "demo_report.json").read_text())
    err = next(s["error"] for s in rep["stages"] if s["name"] == "acts/mini_vgg")
    assert "no_such_layer" in err


def _stage(tmp: Path, name: str, deps: list[str], config: dict, calls: list[str],
           fail: bool = False) -> Stage:
    out = tmp / name

    def build():
        calls.append(name)
        if fail:
            raise RuntimeError(f"{name} broke")
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, "world", config)
        return {"n": len(calls)}

    return Stage(name, deps, config, lambda: [out], build)


def _run(tmp: Path, stages_cfg: dict[str, dict], fresh: bool = False, fail: tuple[str, ...] = ()):
    calls: list[str] = []
    pipe = Pipeline(fresh, _quiet(), tmp / "pipeline_state.json")
    deps = {"a": [], "b": ["a"], "c": ["b"], "d": []}
    for name in "abcd":
        pipe.run(_stage(tmp, name, deps[name], stages_cfg[name], calls, fail=name in fail))
    return calls, {n: r.status for n, r in pipe.results.items()}


def test_pipeline_skips_rebuilds_and_blocks(tmp_path):
    cfg = {n: {"v": 1} for n in "abcd"}
    calls, st = _run(tmp_path, cfg)
    assert calls == list("abcd") and set(st.values()) == {"built"}
    calls, st = _run(tmp_path, cfg)
    assert calls == [] and set(st.values()) == {"skipped"}
    # a changed setting rebuilds that stage and everything downstream of it, nothing else
    cfg["b"] = {"v": 2}
    calls, st = _run(tmp_path, cfg)
    assert calls == ["b", "c"] and st["a"] == st["d"] == "skipped"
    # a stage rebuilt by hand (new manifest) makes its dependants stale
    write_manifest(tmp_path / "c", "world", {"v": 1, "by": "hand"})
    calls, _ = _run(tmp_path, cfg)
    assert calls == ["c"]
    calls, st = _run(tmp_path, cfg, fresh=True)
    assert calls == list("abcd")
    # a failing stage: its dependants are blocked, independent stages still run
    calls, st = _run(tmp_path, cfg, fresh=True, fail=("a",))
    assert st == {"a": "failed", "b": "blocked", "c": "blocked", "d": "built"}


def test_config_errors(tmp_path):
    from sae_cafe.errors import SaeCafeError

    p = tmp_path / "bad.toml"
    p.write_text('[sae]\nexpansoin = 4\n')
    with pytest.raises(SaeCafeError, match="expansoin"):
        load_config(p)
    with pytest.raises(SaeCafeError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.toml")
    assert [m.name for m in cfg.models] == ["mini_resnet", "mini_vit"]
    assert cfg.models[0].layers == ("layer2", "layer3", "layer4")
    for own in ("own_model_resnet50.toml", "own_model_timm_vit.toml"):
        c = load_config(Path(__file__).parent.parent / "configs" / own)
        assert c.images and c.models[0].weights
