"""Every committed result of a mini model comes from the weights we ship.

A results file under ``benchmarks/results/`` that records a mini model's weights hash must record the hash of
``sae_cafe/weights/<model>.safetensors`` as committed now; for the mini ViT (retrained more than once) every
figure the README shows must record it (issue 19: "all ViT figures in the README come from the shipped
weights"). Retraining a model without rerunning its figures fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_cafe.artifacts import hash_file
from sae_cafe.models.mini import MINI_ARCHS, weights_path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _recorded() -> dict[str, list[tuple[str, str | None]]]:
    """{model: [(results file, recorded hash or None)]} for every results file that describes a mini model."""
    out: dict[str, list[tuple[str, str | None]]] = {m: [] for m in MINI_ARCHS}

    def load(name: str):
        path = RESULTS / name
        return json.loads(path.read_text()) if path.is_file() else None

    for name, key in (("world.json", "weights_sha256"), ("mini_srd.json", "weights_sha256"),
                      ("concept_labels.json", "weights_hash")):
        doc = load(name)
        for model, rec in ((doc or {}).get("models") or {}).items():
            out.setdefault(model, []).append((name, rec.get(key)))
    for model, rec in (load("sae_quality.json") or {}).items():
        out.setdefault(model, []).append(("sae_quality.json", rec.get("weights_sha256")))
    for rec in load("cafe.json") or []:
        out.setdefault(rec["model"], []).append(("cafe.json", rec.get("weights_sha256")))
    for name in ("icat/results.json", "icat_vit/results.json"):
        for model, rec in ((load(name) or {}).get("models") or {}).items():
            out.setdefault(model, []).append((name, rec.get("weights_sha256")))
    for manifest in sorted(RESULTS.glob("saliency/*/manifest.json")):
        cfg = json.loads(manifest.read_text())["config"]
        if cfg.get("weights") is None:  # the shipped weights (a --weights file would be another model)
            out.setdefault(cfg["model"], []).append((str(manifest.relative_to(RESULTS)), cfg.get("weights_hash")))
    return out


@pytest.mark.parametrize("model", MINI_ARCHS)
def test_results_record_the_shipped_weights(model):
    shipped = hash_file(weights_path(model))
    records = _recorded()[model]
    assert records, f"no committed results describe {model}"
    wrong = [(name, h[:12]) for name, h in records if h is not None and h != shipped]
    assert not wrong, f"{model}: results from other weights than the shipped {shipped[:12]}: {wrong}"
    if model == "mini_vit":
        missing = [name for name, h in records if h is None]
        assert not missing, f"mini_vit results without a weights hash (rerun them): {missing}"


def test_a_stale_result_is_caught(tmp_path, monkeypatch):
    """The check reads what the files say: a world table of other weights is reported."""
    import shutil

    fake = tmp_path / "results"
    shutil.copytree(RESULTS, fake, ignore=shutil.ignore_patterns("*.png", "*.svg", "cases", "graphs", "saes"))
    doc = json.loads((fake / "world.json").read_text())
    doc["models"]["mini_vit"]["weights_sha256"] = "0" * 64
    (fake / "world.json").write_text(json.dumps(doc))
    monkeypatch.setattr(__import__(__name__), "RESULTS", fake)
    with pytest.raises(AssertionError, match="world.json"):
        test_results_record_the_shipped_weights("mini_vit")
