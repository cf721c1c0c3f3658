"""Saliency metrics: hand-made maps with known answers, equality with Quantus on a tiny model under both
definition sets, and insertion/deletion against an independent NumPy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import quantus
import torch
from scipy.ndimage import correlate, gaussian_filter
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
    with pytest.raises(ValueError, match="tolerance"):
        M.pointing_game(maps, masks, tolerance=-1)


def test_pointing_game_ties_and_constant_maps():
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, :4, :4] = True
    maps = torch.zeros(4, 16, 16)
    maps[0, 1, 1] = maps[0, 12, 12] = 2.0  # two tied maxima, one on the mask
    maps[1, 1, 1] = maps[1, 2, 2] = maps[1, 3, 3] = maps[1, 14, 14] = 1.0  # 3 of 4 on the mask
    maps[2] = 0.0  # all-zero map: every pixel tied
    maps[3] = 0.7  # a constant map (a constant CAM)
    hit = M.pointing_game(maps, masks, tolerance=0)
    assert hit.tolist() == pytest.approx([0.5, 0.75, 0.0, 0.0])
    # a wide tolerance puts every pixel near the mask: ties all count, constant maps still miss
    assert M.pointing_game(maps, masks, tolerance=100).tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])


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
    assert for_metric(m, "sparseness", "paper").tolist() == [[[0.0, 1.0], [0.5, 0.0]]]
    assert for_metric(m, "sparseness", "source").tolist() == [[[1.0, 0.5], [0.25, 0.0]]]  # |a| / max|a|
    assert for_metric(m, "localisation", "source").tolist() == [[[0.0, 0.5], [0.25, 0.0]]]  # a+ / max|a|
    assert torch.equal(for_metric(m, "stability", "source"), m)
    with pytest.raises(ValueError, match="definition set"):
        for_metric(m, "sparseness", "nope")


def test_sparseness_source_is_gini_of_abs():
    """A map with strong negative evidence: the paper protocol's positive part looks sparse, |a| does not."""
    a = torch.tensor([[[1.0, -1.0], [-1.0, -1.0]]])
    paper = M.sparseness(for_metric(a, "sparseness", "paper")).item()
    source = M.sparseness(for_metric(a, "sparseness", "source")).item()
    assert paper == pytest.approx(0.75, abs=1e-5)  # one-hot of 4: (n-1)/n
    assert source == pytest.approx(0.0, abs=1e-5)  # |a| uniform


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


# ---------------------------------------------------------------- insertion / deletion vs NumPy -----------
def _np_insertion_deletion(model, x, t, saliency, mode, steps, substrate):
    """Independent NumPy version of RISE's causal metric (Petsiuk et al. 2018, ``CausalMetric``): pixels in
    descending order of saliency (stable), ``round(k·HW/steps)`` of them moved from the finish image to the
    start image at step k; insertion starts from the blurred image (``gkern``: gaussian_filter of an odd
    k×k delta, σ = 5·H/224; zero padding) or the zero baseline, deletion ends at zero."""
    x = x.numpy().astype(np.float64)
    N, C, H, W = x.shape
    k = max(3, 2 * int(5 * H / 224 + 0.5) + 1)
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1
    kern = gaussian_filter(delta, 5.0 * H / 224)
    curves = np.zeros((N, steps + 1))
    for n in range(N):
        if mode == "insertion":
            start = (np.stack([correlate(x[n, c], kern, mode="constant") for c in range(C)])
                     if substrate == "blur" else np.zeros_like(x[n]))
            finish = x[n]
        else:
            start, finish = x[n], np.zeros_like(x[n])
        order = np.argsort(-saliency[n].reshape(-1), kind="stable")
        for step in range(steps + 1):
            img = start.copy().reshape(C, -1)
            idx = order[:round(H * W * step / steps)]
            img[:, idx] = finish.reshape(C, -1)[:, idx]
            with torch.no_grad():
                p = model(torch.from_numpy(img.reshape(1, C, H, W)).float()).softmax(1)[0, t[n]].item()
            curves[n, step] = p
    auc = (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / steps
    return auc, curves


@pytest.mark.parametrize("mode,substrate", [("insertion", "blur"), ("insertion", "baseline"),
                                            ("deletion", "baseline")])
def test_insertion_deletion_equals_numpy_reference(mode, substrate):
    model = _tiny()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 40, 40, generator=g)
    t = torch.tensor([0, 2, 4])
    sal = torch.randn(3, 40, 40, generator=g)
    sal[0, :10] = 0.5  # a block of ties: the stable order decides
    auc, curve = M.insertion_deletion(model, x, t, sal, mode, steps=16, substrate=substrate)
    ref_auc, ref_curve = _np_insertion_deletion(model, x, t, sal.numpy(), mode, 16, substrate)
    assert np.allclose(curve.numpy(), ref_curve, atol=1e-5)
    assert np.allclose(auc.numpy(), ref_auc, atol=1e-5)


def test_blur_kernel_is_rise_gkern_at_224():
    k = M.blur_kernel(224)
    assert k.shape == (11, 11)
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    assert np.allclose(k.numpy(), gaussian_filter(delta, 5))  # RISE's gkern(klen=11, nsig=5)
    assert k.sum().item() == pytest.approx(1.0)


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
    masks[3] = False
    flat = raw[3].flatten().argmax()  # image 3: the mask holds the arg-max (a hit at tolerance 0)
    masks[3, flat // 16, flat % 16] = True
    return model, x, t, raw, masks


def _kw(model, x, t, masks):
    return dict(model=model, x_batch=x.numpy(), y_batch=t.numpy(), s_batch=masks[:, None].numpy().astype(float),
                device="cpu")


def test_equal_quantus_source_definitions(setup):
    """Source definitions = Quantus with its defaults (localisation: the paper's positive relevance)."""
    model, x, t, raw, masks = setup
    kw = _kw(model, x, t, masks)
    a_raw = raw[:, None].numpy()
    assert (raw.flatten(1) == raw.flatten(1).amax(1, keepdim=True)).sum(1).eq(1).all()  # no tied maxima
    q = quantus.PointingGame(disable_warnings=True)(a_batch=a_raw, **kw)
    ours = M.pointing_game(for_metric(raw, "pointing", "source"), masks, tolerance=0)
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)
    assert 0 < ours.sum() < 4  # hits and misses both tested
    q = quantus.AttributionLocalisation(abs=False, positive_attributions=True, disable_warnings=True)(
        a_batch=a_raw, **kw)
    ours = M.attribution_localisation(for_metric(raw, "localisation", "source"), masks)
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)
    q = quantus.Sparseness(disable_warnings=True)(a_batch=a_raw, **kw)
    ours = M.sparseness(for_metric(raw, "sparseness", "source"))
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)


def test_equal_quantus_paper_definitions(setup):
    """Paper protocol = Quantus on the protocol's post-processed maps."""
    model, x, t, raw, masks = setup
    kw = _kw(model, x, t, masks)
    opts = dict(abs=False, normalise=False, disable_warnings=True)
    a = for_metric(raw, "pointing", "paper")
    q = quantus.PointingGame(**opts)(a_batch=a[:, None].numpy(), **kw)
    assert np.allclose(M.pointing_game(a, masks, tolerance=0).numpy(), np.asarray(q, float), atol=1e-5)
    a = for_metric(raw, "localisation", "paper")
    q = quantus.AttributionLocalisation(**opts)(a_batch=a[:, None].numpy(), **kw)
    assert np.allclose(M.attribution_localisation(a, masks).numpy(), np.asarray(q, float), atol=1e-5)
    a = for_metric(raw, "sparseness", "paper")
    q = quantus.Sparseness(**opts)(a_batch=a[:, None].numpy(), **kw)
    assert np.allclose(M.sparseness(a).numpy(), np.asarray(q, float), atol=1e-5)


@pytest.mark.parametrize("definitions", ["source", "paper"])
def test_equal_quantus_faithfulness_correlation(setup, definitions):
    model, x, t, raw, _ = setup
    a = for_metric(raw, "fidelity", definitions)
    recorded = []

    def occlude(arr, indices, **_):  # Quantus' baseline replacement (value 0), recording its subsets
        recorded.append(indices.copy())
        out = arr.copy()
        out[np.arange(arr.shape[0])[:, None], indices] = 0.0
        return out

    np.random.seed(0)
    corr = "pearson" if definitions == "source" else "spearman"
    sim = {"source": {}, "paper": {"similarity_func": quantus.similarity_func.correlation_spearman,
                                   "normalise": False}}[definitions]  # source: Quantus's defaults
    metric = quantus.FaithfulnessCorrelation(nr_runs=12, subset_size=150, perturb_func=occlude,
                                             return_aggregate=False, disable_warnings=True, **sim)
    q = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=a[:, None].numpy(), device="cpu")
    N, C, H, W = x.shape
    sub = torch.zeros(N, len(recorded), C * H * W, dtype=torch.bool)
    for r, idx in enumerate(recorded):
        sub[torch.arange(N)[:, None], r, torch.from_numpy(idx)] = True
    ours = M.mu_fidelity(model, x, t, a, subsets=sub.view(N, -1, C, H, W), correlation=corr)
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)


@pytest.mark.parametrize("definitions", ["source", "paper"])
def test_equal_quantus_avg_sensitivity(setup, definitions):
    model, x, t, raw, _ = setup
    explain = _gxi(model)
    post = lambda m: for_metric(m, "stability", definitions)  # noqa: E731
    noise = torch.rand(3, *x.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    it = iter(noise.reshape(3, x.shape[0], -1).numpy())

    def add_noise(arr, indices, **_):  # Quantus' uniform noise, fed our samples
        return (arr + next(it)).astype(arr.dtype)

    def qexplain(model, inputs, targets, **_):
        return post(explain(torch.as_tensor(inputs), torch.as_tensor(targets)))[:, None].numpy()

    # source: Quantus's defaults (raw maps, no normalisation) but for the 3 samples and our noise
    metric = quantus.AvgSensitivity(nr_samples=3, lower_bound=0.0, upper_bound=0.1, perturb_func=add_noise,
                                    disable_warnings=True)
    q = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=post(raw)[:, None].numpy(),
               explain_func=qexplain, device="cpu")
    ours = M.stability(explain, x, t, raw, noise=noise, postprocess=post)
    assert np.allclose(ours.numpy(), np.asarray(q, float), atol=1e-5)
    # the same from precomputed noisy maps (what the benchmark's cache feeds evaluate_maps)
    noisy = M.explain_noisy(explain, x, t, noise)
    via = M.evaluate_maps(model, x, t, raw, metrics=("stability",), stability_maps=noisy, definitions=definitions)
    assert np.allclose(via["stability"].numpy(), np.asarray(q, float), atol=1e-5)


def test_evaluate_maps_runs_all(setup):
    model, x, t, raw, masks = setup
    for definitions, steps in (("source", 16), ("paper", 10)):
        out = M.evaluate_maps(model, x, t, raw, masks, explain=_gxi(model), n_subsets=20, n_noise=2,
                              generator=torch.Generator().manual_seed(0), definitions=definitions)
        assert set(M.METRICS) <= set(out)
        assert out["insertion_curve"].shape == (4, steps + 1)
    with pytest.raises(ValueError, match="at least 16"):
        M.evaluate_maps(model, x, t, raw, masks, metrics=("insertion",), steps=10, definitions="source")


def test_evaluate_maps_passes_tolerance_and_definitions(setup):
    model, x, t, raw, _ = setup
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 0, 0] = True
    far = M.evaluate_maps(model, x, t, raw, masks, metrics=("pointing",), tolerance=0)["pointing"]
    near = M.evaluate_maps(model, x, t, raw, masks, metrics=("pointing",), tolerance=50)["pointing"]
    assert torch.equal(near, torch.ones(4)) and far.sum() < 4
    signed = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    src = M.evaluate_maps(model, x, t, signed, metrics=("sparseness", "insertion"), definitions="source")
    pap = M.evaluate_maps(model, x, t, signed, metrics=("sparseness", "insertion"), definitions="paper")
    assert not torch.allclose(src["sparseness"], pap["sparseness"])
    assert not torch.allclose(src["insertion"], pap["insertion"])


# ---------------------------------------------------------------- the benchmark's configuration ----------
def _peak_method(monkeypatch, calls: list | None = None, name: str = "peak"):
    """Register a method whose map is x[:, 0] plus a peak at (5, 5): known arg-max, input-dependent values."""
    from sae_cafe.evaluation import baselines as B

    def fn(a, x, t):
        if calls is not None:
            calls.append(len(x))
        m = x[:, 0].clone() * 0.1
        m[:, 5, 5] = 10.0
        return m

    monkeypatch.setitem(B.REGISTRY, name, B.Baseline(name, fn, "test"))
    return name


def _bench_inputs(n=3, size=32):
    from test_baselines import tiny_seq

    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 5, 15] = True  # 10 px from the peak
    return tiny_seq(), x, masks


def test_config_refuses_bad_values():
    from sae_cafe.errors import SaeCafeError
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, BenchmarkConfigError

    with pytest.raises(BenchmarkConfigError, match=r"unknown metric\(s\) \['pointng'\].*pointing, localisation"):
        BenchmarkConfig(metrics=("pointng", "sparseness"))
    assert issubclass(BenchmarkConfigError, SaeCafeError)
    with pytest.raises(BenchmarkConfigError, match="definitions.*source, paper"):
        BenchmarkConfig(definitions="quantus")
    with pytest.raises(BenchmarkConfigError, match="at least 16"):
        BenchmarkConfig(steps=10)
    assert BenchmarkConfig(steps=10, definitions="paper").n_steps == 10
    assert BenchmarkConfig().n_steps == 16 and BenchmarkConfig(definitions="paper").n_steps == 10
    with pytest.raises(BenchmarkConfigError, match="tolerance"):
        BenchmarkConfig(tolerance=-1.0)
    with pytest.raises(BenchmarkConfigError, match="n_noise"):
        BenchmarkConfig(n_noise=0)
    assert BenchmarkConfig(metrics=["sparseness"]).metrics == ("sparseness",)
    with pytest.raises(AttributeError):  # frozen
        BenchmarkConfig().tolerance = 3.0


def test_tolerance_reaches_pointing_game_through_the_benchmark(monkeypatch):
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark

    model, x, masks = _bench_inputs()
    m = _peak_method(monkeypatch)
    got = {}
    for tol in (0.0, None, 12.0, 30.0):
        cfg = BenchmarkConfig(metrics=("pointing",), tolerance=tol)
        got[tol] = run_saliency_benchmark(model, x, masks, None, [m], cfg, progress=False).scores[m]["pointing"]
    # the peak is 10 px from the mask: a miss at 0 and at the default 15·32/224 px, a hit at 12 and 30 px
    assert got[0.0].tolist() == got[None].tolist() == [0.0] * 3
    assert got[12.0].tolist() == got[30.0].tolist() == [1.0] * 3


def _observables(res, m):
    s = res.scores[m]
    return {"keys": tuple(sorted(s)), **{k: np.round(v, 6).tolist() for k, v in s.items()},
            "curve": res.curves[m]["insertion_curve"].shape, "ex": None if m not in res.examples
            else res.examples[m].shape}


def test_every_config_field_reaches_the_computation(monkeypatch):
    """Changing any field of BenchmarkConfig changes what the benchmark computes (scores, counts, curves,
    examples) or how it calls the method (batching); a new field without a line here fails the test."""
    from dataclasses import fields

    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark

    model, x, masks = _bench_inputs(n=4)
    calls: list = []
    m = _peak_method(monkeypatch, calls)
    base = dict(n_fidelity=3, n_stability=2, n_subsets=10, n_noise=3, batch_size=2, stability_batch_size=4,
                n_examples=2, tolerance=12.0)
    variants = {"metrics": ("pointing", "sparseness"), "definitions": "paper", "n_fidelity": 1, "n_stability": 1,
                "max_images": {m: 2}, "max_stability": {m: 1}, "n_subsets": 12, "fidelity_grid": 4,
                "fidelity_frac": 0.5, "n_noise": 2, "noise_radius": 0.5, "steps": 20, "tolerance": 0.0,
                "seed": 1, "batch_size": 4, "stability_batch_size": 2, "n_examples": 1}
    assert set(variants) == {f.name for f in fields(BenchmarkConfig)}

    def run(**kw):
        calls.clear()
        res = run_saliency_benchmark(model, x, masks, None, [m], BenchmarkConfig(**(base | kw)), progress=False)
        return _observables(res, m), list(calls)

    ref = run()
    for name, value in variants.items():
        assert run(**{name: value}) != ref, f"BenchmarkConfig.{name} does not reach the computation"


def test_both_definitions_from_one_set_of_explanations(tmp_path, monkeypatch):
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark, run_saliency_definitions
    from sae_cafe.evaluation.outputs import write_saliency_benchmark

    model, x, masks = _bench_inputs()
    calls: list = []
    m = _peak_method(monkeypatch, calls)
    cfg = BenchmarkConfig(n_fidelity=2, n_stability=2, n_subsets=10, n_noise=3, batch_size=3, n_examples=1)
    both = run_saliency_definitions(model, x, masks, None, [m], cfg, state_dir=tmp_path / "state", progress=False)
    # maps of 3 images in one call, then 3 noisy copies of each of 2 images: nothing for the second set
    assert calls == [3, 6]
    src, pap = both["source"], both["paper"]
    assert src.config.definitions == "source" and pap.config.definitions == "paper"
    assert src.curves[m]["insertion_curve"].shape == (3, 17) and pap.curves[m]["insertion_curve"].shape == (3, 11)
    assert not np.allclose(src.scores[m]["stability"][:2], pap.scores[m]["stability"][:2])
    # the paper set from the cache equals a paper run of its own (no cache shared)
    calls.clear()
    alone = run_saliency_benchmark(model, x, masks, None, [m], BenchmarkConfig(**{**cfg.__dict__,
                                   "definitions": "paper"}), progress=False)
    assert calls == [3, 6]
    for k, v in alone.scores[m].items():
        np.testing.assert_allclose(v, pap.scores[m][k], rtol=1e-6, equal_nan=True, err_msg=k)
    # a rerun on the same state explains nothing and gives the same numbers
    calls.clear()
    again = run_saliency_definitions(model, x, masks, None, [m], cfg, state_dir=tmp_path / "state", progress=False)
    assert calls == []
    for d in ("source", "paper"):
        for k, v in both[d].scores[m].items():
            np.testing.assert_array_equal(v, again[d].scores[m][k])
    # every result file names its definitions
    out = tmp_path / "stage"
    write_saliency_benchmark(src, out, others=[pap])
    import csv
    import json

    for d in ("source", "paper"):
        assert json.loads((out / f"results_{d}.json").read_text())["definitions"] == d
        assert {r["definitions"] for r in csv.DictReader((out / f"table_{d}.csv").open())} == {d}
        assert (out / f"table_{d}.txt").read_text().startswith(f"definitions: {d}")
    assert json.loads((out / "results.json").read_text())["definitions"] == "source"
    assert json.loads((out / "manifest.json").read_text())["definitions"] == ["source", "paper"]


def test_map_cache_miss_on_other_target_and_garbled_file(tmp_path):
    from sae_cafe.evaluation.map_cache import MapCache

    for cache in (MapCache(tmp_path), MapCache()):
        cache.put_map("m", "img0", 3, torch.ones(4, 4), 0.5)
        got, sec = cache.get_map("m", "img0", 3)
        assert torch.equal(got, torch.ones(4, 4)) and sec == 0.5
        assert cache.get_map("m", "img0", 2) is None
        tiny = torch.tensor([[[1e-7, -3e-7], [0.0, 2e-7]]])
        back = cache.put_noisy("m", "img0", 3, "k", tiny)
        assert torch.allclose(back, tiny, rtol=1e-3) and torch.equal(cache.get_noisy("m", "img0", 3, "k"), back)
    (tmp_path / "m" / "img0.safetensors").write_bytes(b"cut short")
    assert MapCache(tmp_path).get_map("m", "img0", 3) is None


def test_interrupted_run_resumes_from_its_records_and_maps(tmp_path, monkeypatch):
    from sae_cafe.evaluation import baselines as B
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark

    model, x, masks = _bench_inputs(n=4)
    calls: list = []
    m = _peak_method(monkeypatch, calls)
    real = B.REGISTRY[m]
    cfg = BenchmarkConfig(n_fidelity=4, n_stability=2, n_subsets=10, n_noise=2, batch_size=2, n_examples=1)

    def interrupted(a, xx, t):
        if len(calls) == 2:  # the first batch's maps and its noisy copies are done; then the user hits Ctrl-C
            raise KeyboardInterrupt
        return real.fn(a, xx, t)

    monkeypatch.setitem(B.REGISTRY, m, B.Baseline(m, interrupted, "test"))
    with pytest.raises(KeyboardInterrupt):
        run_saliency_benchmark(model, x, masks, None, [m], cfg, state_dir=tmp_path, progress=False)
    assert calls == [2, 4]
    monkeypatch.setitem(B.REGISTRY, m, real)
    calls.clear()
    resumed = run_saliency_benchmark(model, x, masks, None, [m], cfg, state_dir=tmp_path, progress=False)
    assert calls == [2]  # only the second batch's maps (no stability there)
    calls.clear()
    fresh = run_saliency_benchmark(model, x, masks, None, [m], cfg, progress=False)
    for k, v in fresh.scores[m].items():
        np.testing.assert_array_equal(v, resumed.scores[m][k], err_msg=k)
