"""``benchmarks/model_zoo.py`` (the coverage table; ``--family`` presets replace the former per-family scripts):
a preset's settings reach every row and the results land in ``model_zoo_<family>.{json,md}`` in the table format
of ``model_zoo.md``; ``randomize`` re-draws norms and sets BN statistics to a batch's. On a 32-px ResNet-18
(the script's own ``build`` swapped for it), not at full size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from tiny_models import tiny_resnet

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("model_zoo", REPO / "benchmarks" / "model_zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def test_family_preset_rows_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "build", lambda name: (tiny_resnet(), f"tiny {name}"))
    monkeypatch.setattr(zoo, "best_pair", lambda fa, fb, repeat: (fa(), fb(), 2.0, 1.0, 1.0, 0.5)[2:])
    assert zoo.main(["--family", "cnn", "--models", "tiny_a", "--threads", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "model_zoo_cnn.json").read_text())
    assert doc["meta"]["batch"] == 2 and doc["meta"]["repeat"] == 3 and doc["meta"]["family"] == "cnn"
    assert "re-drawn" in doc["meta"]["weights"]
    (row,) = doc["rows"]
    assert "error" not in row, row
    assert row["constructor"] == "tiny tiny_a" and row["saliency_err"] < 1e-4 and row["ierf_err"] < 1e-4
    assert row["extraction_ok"] and row["cafe_ok"] and row["cost"] == 2.0
    md = (tmp_path / "model_zoo_cnn.md").read_text()
    assert md == zoo.render(doc["rows"]) and md.startswith("| model | constructor | saliency conservation err |")
    assert not (tmp_path / "model_zoo.json").exists()  # a preset never overwrites the README's table


def test_randomize_redraws_norms_and_sets_bn_statistics():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                            torch.nn.LayerNorm(4 * 6 * 6))
    zoo.randomize(m, (8, 8))
    bn, ln = m[1], m[3]
    assert not m.training and ((bn.weight >= 0.5) & (bn.weight <= 1.5)).all() and (ln.weight >= 0.5).all()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():  # replay the draws up to the calibration batch
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            torch.rand(mod.weight.shape, generator=g), torch.rand(mod.bias.shape, generator=g)
        elif isinstance(mod, torch.nn.Conv2d):
            torch.rand(mod.bias.shape, generator=g)
    with torch.no_grad():
        h = m[0](torch.randn(4, 3, 8, 8, generator=g))
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3)))  # momentum 1: exactly this batch's (unbiased)
