"""Empty calibration bins: the reader (``Calibration.apply``) calibrates a raw confidence whose bin has no samples
with its nearest non-empty lower neighbour and says so in the label's ``calibration`` field; the writer
(``benchmarks/bench_concept_labels.py``) merges such bins away (``merge_empty_bins``). Checked: the shipped
``calibration.json``; reader and merged table agree for every raw value; a merged bin's accuracy equals the
accuracy recomputed directly from the samples that fall in it (the merge is exact)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sae_cafe.concepts.label import (
    CALIBRATION_FILE,
    filled_bin,
    label_from_shares,
    load_calibration,
    merge_empty_bins,
    parse_calibration,
)
from sae_cafe.errors import SaeCafeError

REPO = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_concept_labels_t",
                                                  REPO / "benchmarks" / "bench_concept_labels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def table(edges, acc, n, evidence="ierf"):
    return parse_calibration({"raw_confidence": "margin-v1", "evidence": {evidence: {
        "edges": list(edges), "accuracy": list(acc), "n": list(n)}}})


def test_shipped_table_high_margin_uses_the_lower_bin():
    cal = load_calibration()
    raw = json.loads(CALIBRATION_FILE.read_text())["evidence"]
    for ev, t in raw.items():
        edges, acc, n = t["edges"], t["accuracy"], t["n"]
        for x in (0.0, 0.3, 0.5, 0.75, 1.0):
            i = min(max(int(np.searchsorted(edges, x, side="right")) - 1, 0), len(n) - 1)
            conf, tag = cal.apply(x, ev)
            if n[i] > 0:
                assert (conf, tag) == (acc[i], f"calibration.json:{ev}")
                continue
            j = max(k for k in range(i) if n[k] > 0)  # the nearest non-empty lower bin, found here by hand
            assert conf == acc[j]
            assert tag == (f"calibration.json:{ev} (calibrated by the [{edges[j]:g}, {edges[j + 1]:g}] bin: the "
                           f"[{edges[i]:g}, {edges[i + 1]:g}] bin has no samples)")
    if raw["ierf"]["n"][-1] == 0 and raw["ierf"]["edges"][-3:] == [0.3, 0.5, 1.0]:  # the file as of this test
        assert cal.apply(0.7, "ierf")[1] == ("calibration.json:ierf (calibrated by the [0.3, 0.5] bin: the [0.5, 1] "
                                             "bin has no samples)")


def test_label_records_which_bin_calibrated_it():
    cal = table([0, 0.2, 0.5, 1.0], [0.4, 0.8, None], [5, 7, 0])
    lab = label_from_shares([{("colour", 0): 0.9, ("shape", 1): 0.1}], latent=3, calibration=cal)
    assert lab.raw_confidence == pytest.approx(0.8) and lab.confidence == 0.8
    assert lab.calibration == ("calibration.json:ierf (calibrated by the [0.2, 0.5] bin: the [0.5, 1] bin has no "
                               "samples)")
    assert lab.to_json()["calibration"] == lab.calibration


def test_reader_edge_cases():
    cal = table([0, 0.1, 0.2, 0.5, 1.0], [None, 0.6, None, None], [0, 4, 0, 0])
    # a leading empty bin has no lower neighbour: the nearest filled bin above
    assert cal.apply(0.05, "ierf") == (0.6, "calibration.json:ierf (calibrated by the [0.1, 0.2] bin: the [0, 0.1] "
                                            "bin has no samples)")
    assert cal.apply(0.1, "ierf") == (0.6, "calibration.json:ierf")
    assert cal.apply(1.0, "ierf")[0] == 0.6  # two empty bins above: still the nearest filled lower one
    empty = table([0, 0.5, 1.0], [None, None], [0, 0])
    assert empty.apply(0.7, "ierf") == (0.7, "uncalibrated (no calibration bin has samples)")
    assert filled_bin([None, None], [0, 0], 1) is None
    assert filled_bin([0.5, float("nan")], [3, 2], 1) == 0  # a non-finite accuracy counts as empty
    assert merge_empty_bins([0, 0.5, 1.0], [None, None], [0, 0]) == ([0, 0.5, 1.0], [None, None], [0, 0])
    with pytest.raises(SaeCafeError, match="B\\+1 edges"):
        merge_empty_bins([0, 1.0], [0.5, 0.6], [1, 2])


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_exact_and_agrees_with_the_reader(seed):
    rng = np.random.default_rng(seed)
    mod = bench()
    edges = mod.EDGES
    B = len(edges) - 1
    # samples (raw confidence, correct) that avoid a random set of bins (leading, inner and trailing runs)
    empty = set(rng.choice(B, size=int(rng.integers(1, B - 1)), replace=False).tolist())
    empty |= {0} if seed % 2 else {B - 1}
    empty = empty if len(empty) < B else empty - {B // 2}
    raws, correct = [], []
    for i in sorted(set(range(B)) - empty):
        k = int(rng.integers(1, 30))
        raws += rng.uniform(edges[i], edges[i + 1], k).tolist()
        correct += (rng.random(k) < rng.random()).tolist()
    raws += [edges[min(i for i in range(B) if i not in empty)]]  # a value exactly on a filled bin's lower edge
    correct += [True]
    rel = mod.bins([{"raw_confidence": r, "correct": c} for r, c in zip(raws, correct)])
    assert [i for i in range(B) if rel["n"][i] == 0] == sorted(empty)
    m_edges, m_acc, m_n = merge_empty_bins(rel["edges"], rel["accuracy"], rel["n"])
    assert m_edges[0] == edges[0] and m_edges[-1] == edges[-1] and m_edges == sorted(m_edges)
    assert all(x > 0 for x in m_n) and sum(m_n) == len(raws) and None not in m_acc
    # exact: each merged bin's accuracy is the accuracy of the samples inside it, counted directly
    r, c = np.array(raws), np.array(correct, float)
    for b in range(len(m_n)):
        inside = (r >= m_edges[b]) & ((r < m_edges[b + 1]) | ((b == len(m_n) - 1) & (r <= m_edges[b + 1])))
        assert inside.sum() == m_n[b]
        assert m_acc[b] == pytest.approx(c[inside].mean(), abs=5e-5)  # bins() rounds to 4 decimals
    # the reader on the unmerged table and the merged table give the same confidence everywhere
    full, merged = table(rel["edges"], rel["accuracy"], rel["n"]), table(m_edges, m_acc, m_n)
    for x in [*edges, *np.linspace(0, 1, 101).tolist()]:
        a, b = full.apply(x, "ierf"), merged.apply(x, "ierf")
        assert a[0] == b[0] and b[1] == "calibration.json:ierf"
        assert ("has no samples" in a[1]) == (rel["n"][min(int(np.searchsorted(edges, x, "right")) - 1, B - 1)] == 0)
    # the writer: merged tables only, the control row and all-empty types left out
    pooled = {"ierf": {"reliability": rel}, mod.CONTROL: {"reliability": rel},
              "act": {"reliability": {"edges": list(edges), "accuracy": [None] * B, "n": [0] * B}}}
    tabs = mod.calibration_tables(pooled)
    assert tabs == {"ierf": {"edges": m_edges, "accuracy": m_acc, "n": m_n}}
    assert all(x > 0 for t in tabs.values() for x in t["n"])
    assert all(x is not None and math.isfinite(x) for t in tabs.values() for x in t["accuracy"])
