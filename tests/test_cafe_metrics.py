"""Known answers for the CAFE metric helpers behind the README's p-values: ``mass_region``, ``top_n_region``
and ``sign_test`` (sae_cafe/cafe/metrics.py), against hand-worked cases, brute force and scipy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import binomtest

from sae_cafe.cafe.metrics import mass_region, sign_test, top_n_region


def test_mass_region_hand_worked():
    m = torch.tensor([[[0.0, 4.0, -1.0], [2.0, 1.0, 3.0]]])  # positive mass 10
    as_set = lambda r: {tuple(i) for i in r[0].nonzero().tolist()}  # noqa: E731
    assert as_set(mass_region(m, 0.5)) == {(0, 1), (1, 2)}  # 4 + 3 = 7 ≥ 5, 4 alone < 5
    assert as_set(mass_region(m, 0.4)) == {(0, 1)}  # 4 = 40 % exactly
    assert as_set(mass_region(m, 1.0)) == {(0, 1), (1, 2), (1, 0), (1, 1)}  # never the zero or negative pixel
    assert not mass_region(-m.abs(), 0.5).any()  # no positive mass: empty region
    assert mass_region(m, 0.5).shape == m.shape and mass_region(m, 0.5).dtype == torch.bool


def test_mass_region_is_the_smallest_set_by_brute_force():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 2, 4, generator=g)  # 8 pixels, distinct values
    for share in (0.3, 0.5, 0.8):
        got = mass_region(maps, share)
        for e in range(maps.shape[0]):
            v = maps[e].flatten().clamp(min=0).double()
            total = v.sum().item()
            best = None
            for k in range(1, 9):  # smallest subset holding the share; the largest sum among that size
                cands = [c for c in itertools.combinations(range(8), k) if v[list(c)].sum() >= share * total - 1e-12]
                if cands:
                    best = set(max(cands, key=lambda c: v[list(c)].sum().item()))
                    break
            assert set(got[e].flatten().nonzero().flatten().tolist()) == best, (e, share)


def test_top_n_region_ties_by_pixel_order_and_per_row_n():
    m = torch.tensor([[[1.0, 3.0], [3.0, 0.0]], [[5.0, 1.0], [2.0, 2.0]]])
    r = top_n_region(m, torch.tensor([1, 3]))
    assert r[0].tolist() == [[False, True], [False, False]]  # first of the tied 3s
    assert r[1].tolist() == [[True, False], [True, True]]
    assert top_n_region(m, torch.tensor([0, 4])).flatten(1).sum(1).tolist() == [0, 4]


@pytest.mark.parametrize("pos,neg", [(10, 0), (5, 5), (7, 2), (0, 3), (330, 130), (1581, 425)])
def test_sign_test_equals_exact_binomial(pos, neg):
    diff = torch.cat([torch.ones(pos), -torch.ones(neg), torch.zeros(4)])  # zeros are dropped
    out = sign_test(diff[torch.randperm(len(diff), generator=torch.Generator().manual_seed(pos))])
    assert out["n_pos"] == pos and out["n_neg"] == neg
    ref = binomtest(pos, pos + neg, 0.5).pvalue
    assert math.isclose(out["p"], ref, rel_tol=1e-9, abs_tol=1e-300)


def test_sign_test_known_values():
    assert sign_test(torch.ones(10))["p"] == pytest.approx(2 / 1024)  # both tails of 0.5^10
    assert sign_test(torch.tensor([1.0, -1.0]))["p"] == 1.0
    assert sign_test(torch.zeros(5)) == {"n_pos": 0, "n_neg": 0, "p": 1.0}
