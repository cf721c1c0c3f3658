"""Saliency metrics: hand-made maps with known answers, and equality with Quantus on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from sae_cafe.evaluation import metrics as M
from sae_cafe.evaluation.postprocess import for_metric, positive_minmax, signed_maxabs


def test_pointing_game_known_answers():
    maps = torch.zeros(4, 32, 32)
    maps[:, 5, 5] = 1.0
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[0, 5, 5] = True  # on the peak
    masks[1, 5, 15] = True  # 10 px away
    masks[2, 5, 25] = True  # 20 px away
    hit = M.pointing_game(maps, masks, tolerance=15)
    assert hit[:3].tolist() == [1.0, 1.0, 0.0]
    assert math.isnan(hit[3])  # empty mask
    assert M.pointing_game(maps, masks, tolerance=0)[:3].tolist() == [1.0, 0.0, 0.0]
    # default tolerance scales with H: 15 px at 224 → 2.14 px at 32
    assert M.default_tolerance(32) == pytest.approx(15 * 32 / 224)
    m2 = torch.zeros(1, 32, 32, dtype=torch.bool)
    m2[0, 5, 7] = True
    assert M.pointing_game(maps[:1], m2).item() == 1.0
    m2[0, 5, 7], m2[0, 5, 8] = False, True
    assert M.pointing_game(maps[:1], m2).item() == 0.0


def test_localisation_and_sparseness_known_answers():
    maps = torch.ones(2, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True
    assert M.attribution_localisation(maps, masks).tolist() == pytest.approx([0.25, 0.25], abs=1e-6)
    maps[1] = 0
    maps[1, 0, 0] = 1
    assert M.attribution_localisation(maps, masks)[1].item() == pytest.approx(1.0, abs=1e-6)
    g = M.sparseness(maps)
    assert g[0].item() == pytest.approx(0.0, abs=1e-6)  # uniform: no inequality
    assert g[1].item() == pytest.approx(63 / 64, abs=1e-5)  # one-hot: maximal Gini (n-1)/n


def test_postprocess():
    m = torch.tensor([[[-2.0, 1.0], [0.5, 0.0]]])
    assert signed_maxabs(m).tolist() == [[[-1.0, 0.5], [0.25, 0.0]]]
    assert positive_minmax(m).tolist() == [[[0.0, 1.0], [0.5, 0.0]]]
    assert positive_minmax(-m.abs()).abs().sum() == 0
    assert for_metric(m, "sparseness").min() >= 0


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 30), generator=g).double()
    b = torch.randn(3, 30, generator=g, dtype=torch.float64)
    ours = M.spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(spearmanr(a[i], b[i])[0], abs=1e-12)


class _Linear(nn.Module):
    """logits = [s, -s], s = Σ w·x: the drop of logit 0 under occlusion is exactly Σ_S w·x."""

    def __init__(self, C=3, H=18, W=18):
        super().__init__()
        self.w = nn.Parameter(torch.randn(C, H, W, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_fidelity_and_insertion_deletion_known_answers():
    model = _Linear()
    x = torch.randn(2, 3, 18, 18, generator=torch.Generator().manual_seed(2))
    t = torch.zeros(2, dtype=torch.long)
    exact = (model.w * x).sum(1).detach()  # (N,H,W) exact per-pixel contribution
    fid = M.mu_fidelity(model, x, t, exact, n_subsets=50, generator=torch.Generator().manual_seed(0))
    assert fid.tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    fid_neg = M.mu_fidelity(model, x, t, -exact, n_subsets=50, generator=torch.Generator().manual_seed(0))
    assert fid_neg.tolist() == pytest.approx([-1.0, -1.0], abs=1e-9)
    # the logit drops do not depend on the map: computed once and passed in, the score is the same
    sub50 = M.grid_subsets(2, 18, 18, 50, generator=torch.Generator().manual_seed(0))
    deltas = M.fidelity_deltas(model, x, t, sub50)
    assert deltas.shape == (2, 50)
    noisy = exact + 0.3 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(M.mu_fidelity(model, x, t, noisy, sub50, deltas=deltas),
                       M.mu_fidelity(model, x, t, noisy, sub50))
    # subsets: 20 % of a 9×9 grid = 16 whole cells
    sub = M.grid_subsets(1, 18, 18, 5, generator=torch.Generator().manual_seed(0))
    assert sub.shape == (1, 5, 18, 18) and (sub.flatten(2).sum(2) == 16 * 4).all()

    auc_del, curve = M.insertion_deletion(model, x, t, exact, "deletion", steps=10)
    p0 = model(x).softmax(1)[:, 0]
    assert curve[:, 0].tolist() == pytest.approx(p0.tolist(), abs=1e-6)
    assert curve[:, -1].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)  # all pixels at baseline 0
    auc_del_bad, _ = M.insertion_deletion(model, x, t, -exact, "deletion", steps=10)
    assert (auc_del < auc_del_bad).all()  # deleting the most positive evidence first drops faster
    auc_ins, curve_i = M.insertion_deletion(model, x, t, exact, "insertion", steps=10)
    auc_ins_bad, _ = M.insertion_deletion(model, x, t, -exact, "insertion", steps=10)
    assert curve_i[:, 0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert (auc_ins > auc_ins_bad).all()
    assert M.trapezoid_auc(torch.tensor([[0.0, 1.0, 1.0]])).item() == pytest.approx(0.75)


def test_stability_known_answers():
    x = torch.rand(2, 3, 8, 8) + 1
    t = torch.zeros(2, dtype=torch.long)
    const = M.stability(lambda xx, tt: torch.ones(xx.shape[0], 8, 8), x, t, n_samples=3)
    assert const.abs().max().item() == 0
    noise = torch.full((2, 2, 3, 8, 8), 0.1)
    s = M.stability(lambda xx, tt: xx[:, 0], x, t, noise=noise)
    expect = (0.1 * 8) / x[:, 0].flatten(1).norm(dim=1)
    assert s.tolist() == pytest.approx(expect.tolist(), rel=1e-5)


# ---------------------------------------------------------------- equality with Quantus ------------------
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 5)).eval()


def _gxi(model):
    def explain(x, t):
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
        return (g * x).sum(1).detach()
    return explain


@pytest.fixture(scope="module")
def setup():
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([0, 1, 2, 3])
    raw = _gxi(model)(x, t)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 2:9, 3:12] = True
    masks[1] = False
    masks[1, 10:, 10:] = True
    return model, x, t, raw, masks


def test_equal_quantus_localisation_and_sparseness(setup):
    quantus = pytest.importorskip("quantus")
    model, x, t, raw, masks = setup
    kw = dict(model=model, x_batch=x.numpy(), y_batch=t.numpy(), s_batch=masks[:, None].numpy().astype(float),
              device="cpu")
    a = for_metric(raw, "pointing")
    q = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
        a_batch=a[:, None].numpy(), **kw)
    assert np.allclose(M.pointing_game(a, masks, tolerance=0).numpy(), np.asarray(q, float), atol=1e-5)
    a = for_metric(raw, "localisation")
    q = quantus.AttributionLocalisation(abs=False, normalise=False, disable_warnings=True)(
        a_batch=a[:, None].numpy(), **kw)
    assert np.allclose(M.attribution_localisation(a, masks).numpy(), np.asarray(q, float), atol=1e-5)
    a = for_metric(raw, "sparseness")
    q = quantus.Sparseness(abs=False, normalise=False, disable_warnings=True)(
        a_batch=a[:, None].numpy(), **kw)
    assert np.allclose(M.sparseness(a).numpy(), np.asarray(q, float), atol=1e-5)


def test_equal_quantus_faithfulness_correlation(setup):
    quantus = pytest.importorskip("quantus")
    model, x, t, raw, _ = setup
    a = for_metric(raw, "fidelity")
    recorded = []

    def occlude(arr, indices, **_):  # Quantus' baseline replacement (value 0), recording its subsets
        recorded.append(indices.copy())
        out = arr.copy()
        out[np.arange(arr.shape[0])[:, None], indices] = 0.0
        return out

    np.random.seed(0)
    metric = quantus.FaithfulnessCorrelation(nr_runs=12, subset_size=150, abs=False, normalise=False,
                                             similarity_func=quantus.similarity_func.correlation_spearman,
                                             perturb_func=occlude, return_aggregate=False,
                                             disable_warnings=True)
    q = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=a[:, None].numpy(), device="cpu")
    N, C, H, W = x.shape
    sub = torch.zeros(N, len(recorded), C * H * W, dtype=torch.bool)
    for r, idx in enumerate(recorded):
        sub[torch.arange(N)[:, None], r, torch.from_numpy(idx)] = True
    ours = M.mu_fidelity(model, x, t, a, subsets=sub.view(N, -1, C, H, W))
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)


def test_equal_quantus_avg_sensitivity(setup):
    quantus = pytest.importorskip("quantus")
    model, x, t, raw, _ = setup
    explain = _gxi(model)
    post = lambda m: for_metric(m, "stability")  # noqa: E731
    noise = torch.rand(3, *x.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    it = iter(noise.reshape(3, x.shape[0], -1).numpy())

    def add_noise(arr, indices, **_):  # Quantus' uniform noise, fed our samples
        return (arr + next(it)).astype(arr.dtype)

    def qexplain(model, inputs, targets, **_):
        return post(explain(torch.as_tensor(inputs), torch.as_tensor(targets)))[:, None].numpy()

    metric = quantus.AvgSensitivity(nr_samples=3, lower_bound=0.0, upper_bound=0.1, perturb_func=add_noise,
                                    abs=False, normalise=False, disable_warnings=True,
                                    return_nan_when_prediction_changes=False)
    q = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=post(raw)[:, None].numpy(),
               explain_func=qexplain, device="cpu")
    ours = M.stability(explain, x, t, raw, noise=noise, postprocess=post)
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)


def test_evaluate_maps_runs_all(setup):
    model, x, t, raw, masks = setup
    out = M.evaluate_maps(model, x, t, raw, masks, explain=_gxi(model), n_subsets=20, n_noise=2,
                          generator=torch.Generator().manual_seed(0))
    assert set(M.METRICS) <= set(out)
    assert out["insertion_curve"].shape == (4, 11)
