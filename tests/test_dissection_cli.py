"""``sae-cafe dissect`` run in process (its ``register`` on a parser, as ``sae_cafe.cli.main`` does): a folder
exported from the concept world, a CAFE stage built over its images by ``sae-cafe build-index``; the CLI's IoU
tables equal the library's ``dissect`` on the same model, SAE and layer (activation and evidence versions),
its output folder is replaced whole, and bad input (missing folder, unknown or wrong format, another layer,
no model source) is a clear error."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from sae_cafe.concepts import read_labels
from sae_cafe.concepts.cli import register
from sae_cafe.concepts.dissection import dissect, export_world_segmentation
from sae_cafe.errors import MismatchError, SaeCafeError
from sae_cafe.world import generate


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sae-cafe")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sae_lens import TopKSAE, TopKSAEConfig
    from safetensors.torch import save_file

    from sae_cafe.cli import main
    from sae_cafe.models import load_model
    from sae_cafe.models.mini import make_mini_resnet

    tmp = tmp_path_factory.mktemp("dissect_cli")
    seg = export_world_segmentation(generate(10, seed=3), tmp / "seg")
    torch.manual_seed(0)
    save_file(make_mini_resnet().state_dict(), str(tmp / "w.safetensors"))
    d_in = load_model("mini_resnet", weights=str(tmp / "w.safetensors")).layer("layer2").channels
    TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=12, k=3)).eval().save_model(tmp / "sae")
    common = ["--run", "r", "--root", str(tmp / "idx"), "--model", "mini_resnet", "--layer", "layer2",
              "--no-progress"]
    assert main(["build-index", *common, "--weights", str(tmp / "w.safetensors"), "--sae", str(tmp / "sae"),
                 "--images", str(tmp / "seg" / "images"), "--k", "3", "--n-sample", "0"]) == 0
    return tmp, seg, tmp / "idx" / "r" / "cafe" / "mini_resnet" / "layer2"


def test_dissect_cli_equals_the_library_and_replaces_its_output(setup, capsys):
    from safetensors.torch import load_file

    from sae_cafe.cafe import load_cafe
    from sae_cafe.models import load_model
    from sae_cafe.saes import load_sae

    tmp, seg, stage = setup
    out = tmp / "idx" / "r" / "dissection" / "mini_resnet" / "layer2"  # the default: beside the CAFE stage
    assert run_cli(["dissect", "--cafe", str(stage), "--masks", str(tmp / "seg"), "--evidence", "--quantile",
                    "0.05", "--iou-min", "0.01", "--top", "4"]) == 0
    printed = capsys.readouterr().out
    assert "labelled (IoU ≥ 0.01): dissection-act" in printed and f"written {out}" in printed
    assert len([ln for ln in printed.splitlines() if ln[:6].strip().isdigit()]) == 4
    ad = load_model("mini_resnet", weights=str(tmp / "w.safetensors"))
    ref = dissect(ad, load_sae(tmp / "sae", ad, "layer2"), "layer2", seg, cafe=load_cafe(stage), quantile=0.05,
                  iou_min=0.01)
    got = load_file(str(out / "iou.safetensors"))
    for k in ("act", "ierf"):
        torch.testing.assert_close(got[f"iou_{k}"], ref.iou[k], rtol=0, atol=1e-6)
    assert got["iou_act"].max() > 0  # something overlaps: the comparison is not between two empty tables
    doc = json.loads((out / "dissection.json").read_text())
    assert doc["model"] == "mini_resnet" and doc["layer"] == "layer2" and doc["format"] == "folder"
    assert doc["methods"] == ["act", "ierf"] and doc["cafe"] == str(stage) and doc["n_images"] == 10
    assert [lab.name for lab in read_labels(out).values()] == [lab.name for lab in ref.labels["dissection-act"]]
    # rerun by run + model + layer (the run's recorded weights, its SAE given): the folder is replaced whole
    assert run_cli(["dissect", "--run", "r", "--root", str(tmp / "idx"), "--model", "mini_resnet", "--layer",
                    "layer2", "--sae", str(tmp / "sae"), "--masks", str(tmp / "seg"), "--quantile", "0.05",
                    "--out", str(out)]) == 0
    assert sorted(load_file(str(out / "iou.safetensors"))) == ["iou_act", "threshold_act"]
    torch.testing.assert_close(load_file(str(out / "iou.safetensors"))["iou_act"], ref.iou["act"], rtol=0, atol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["layer2"]  # no temporary folder left
    assert not (stage / "dissection").exists()  # the finished CAFE stage is not written into


def test_dissect_cli_bad_input_is_a_clear_error(setup, tmp_path):
    tmp, _, stage = setup
    base = ["dissect", "--cafe", str(stage), "--out", str(tmp_path / "o")]
    with pytest.raises(SaeCafeError, match="--masks .*nowhere does not exist"):
        run_cli([*base, "--masks", str(tmp_path / "nowhere")])
    (tmp_path / "masks.txt").write_text("x")
    with pytest.raises(SaeCafeError, match="unknown format '.txt'"):
        run_cli([*base, "--masks", str(tmp_path / "masks.txt")])
    with pytest.raises(SaeCafeError, match="holds the 'folder' format, not --format json"):
        run_cli([*base, "--masks", str(tmp / "seg"), "--format", "json"])
    with pytest.raises(MismatchError, match="--layer layer3 .*layer 'layer2'"):
        run_cli([*base, "--masks", str(tmp / "seg"), "--layer", "layer3"])
    with pytest.raises(MismatchError, match="layer .layer3. .*use an SAE trained on this layer"):  # a layer2 SAE
        run_cli(["dissect", "--run", "r", "--root", str(tmp / "idx"), "--model", "mini_resnet", "--layer", "layer3",
                 "--sae", str(tmp / "sae"), "--masks", str(tmp / "seg")])
    with pytest.raises(SaeCafeError, match="missing: --model, --layer"):
        run_cli(["dissect", "--run", "r", "--masks", str(tmp / "seg")])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    with pytest.raises(SaeCafeError, match="not a dissection output"):
        run_cli([*base, "--masks", str(tmp / "seg")])
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".o.tmp-*"))
