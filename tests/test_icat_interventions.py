"""ICAT checked against interventions, statistically: on ≥ 50 concept-world scenes, the mini ResNet (shipped
weights) and random TopK SAEs at layer3 → layer4, the IG weights of each image's top edges and the measured
drop of the target latent when the source latent is zeroed (``run_with_saes(..., interventions=...)``) are
positively rank-correlated. The measurement is ``benchmarks/bench_icat_interventions.py``'s (which writes
the full-size numbers to ``benchmarks/results/icat_interventions.json``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_icat_interventions.py"
_spec = importlib.util.spec_from_file_location("bench_icat_interventions", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_ig_edges_predict_ablation_drops():
    r = bench.icat_vs_interventions(n_images=50, edges_per_image=3, steps=8, seed=1)
    print(f"\nICAT IG vs ablation ({r['n_images']} images, {r['n_edges']} edges, {r['layer_pair']}): Spearman "
          f"{r['spearman']:.3f} (p={r['spearman_p']:.2g}), Pearson {r['pearson']:.3f}, sign agreement "
          f"{r['sign_agreement']:.2f}")
    assert r["n_images"] >= 50 and r["n_edges"] >= 100
    # the measured drops are real changes, not all zero (the intervention did something)
    assert sum(abs(e["drop"]) > 1e-6 for e in r["edges"]) >= 0.9 * r["n_edges"]
    assert r["spearman"] > 0.3 and r["spearman_p"] < 1e-3
    assert r["sign_agreement"] > 0.5
