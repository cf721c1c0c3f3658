"""Manipulation attack: differentiable maps equal the library maps, surrogate copies, a short attack."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_baselines import _same_state, _state, tiny_resnet, tiny_seq

from sae_cafe.evaluation import attack as A
from sae_cafe.evaluation import baselines as B
from sae_cafe.models import get_adapter

warnings.filterwarnings("ignore")


@pytest.mark.parametrize("make", [tiny_resnet, tiny_seq])
def test_differentiable_versions_equal_library_maps(make, monkeypatch):
    monkeypatch.setattr(B, "IG_STEPS", A.ATTACK_IG_STEPS)  # the attack's IG uses ATTACK_IG_STEPS steps
    model = make()
    adapter = get_adapter(model)
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([2])
    for name, fn in A.DIFFERENTIABLE.items():
        lib = B.explain(name, model, x, t)
        ours = fn(adapter, x, t, create_graph=False).detach()
        scale = lib.abs().max().clamp(min=1e-12)
        assert ((lib - ours).abs().max() / scale).item() < 1e-4, name


def test_surrogate_copy_is_smooth_and_leaves_model_alone():
    model = tiny_resnet()
    before = _state(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sur = A.surrogate_copy(model, beta=None)
    assert sur.model is not model and any(isinstance(m, A.SoftplusReLU) for m in sur.model.modules())
    assert torch.allclose(sur.model(x), model(x), atol=1e-5)  # beta None = exact ReLU
    A.set_beta(sur, 1000.0)
    assert torch.allclose(sur.model(x), model(x), atol=1e-2)
    _same_state(before, _state(model))
    # the gradient map of a ReLU net is piecewise constant: no second derivative without the surrogate
    t = torch.tensor([0, 1])
    xr = x.clone().requires_grad_(True)
    (g_relu,) = torch.autograd.grad(A.diff_saliency(get_adapter(model), xr, t).sum(), xr, allow_unused=True)
    assert g_relu is None or g_relu.abs().max() == 0
    A.set_beta(sur, 10.0)
    (g_soft,) = torch.autograd.grad(A.diff_saliency(sur, xr, t).sum(), xr)
    assert g_soft.abs().max() > 0


def test_short_attack_moves_explanation_toward_target():
    model = tiny_seq()
    before = _state(model)
    g = torch.Generator().manual_seed(2)
    x, xt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    cfg = A.AttackConfig(iterations=15, lr=5e-2)
    res = A.manipulate(model, "input_x_gradient", x, xt, cfg)
    assert res.loss_curve[-1] < res.loss_curve[0]
    adapter = get_adapter(model)
    lo = (0 - torch.tensor(adapter.mean).view(1, 3, 1, 1)) / torch.tensor(adapter.std).view(1, 3, 1, 1)
    assert (res.x_adv >= lo - 1e-6).all()
    for k in ("ssim_to_target", "pearson_to_target", "mse_to_target", "ssim_to_orig", "same_class"):
        assert res.scores[k].shape == (2,)
    start = A.similarity_scores(res.maps["orig"], res.maps["target"])["mse"]
    assert (res.scores["mse_to_target"] < start).all()
    _same_state(before, _state(model))


def test_not_attackable():
    model = tiny_seq()
    assert A.attack_applicability("scorecam", model) == "n/a (not differentiable)"
    assert A.attack_applicability("saliency", model) is None
    with pytest.raises(B.NotApplicable):
        A.manipulate(model, "deeplift", torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))


def test_similarity_scores_known_answers():
    h = torch.rand(2, 16, 16)
    s = A.similarity_scores(h, h)
    assert s["ssim"] == pytest.approx([1, 1]) and s["pearson"] == pytest.approx([1, 1])
    assert s["mse"] == pytest.approx([0, 0])
    # maps are compared as |h| / max|h|: sign and scale do not matter
    s = A.similarity_scores(h, -3 * h)
    assert s["ssim"] == pytest.approx([1, 1]) and s["pearson"] == pytest.approx([1, 1])
    assert s["mse"] == pytest.approx([0, 0])
    # two one-hot maps at different pixels of an 8×8 map: |a − b|² is 1 at two pixels
    a, b = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    a[0, 1, 1], b[0, 6, 6] = 1.0, 5.0
    s = A.similarity_scores(a, b)
    assert s["mse"] == pytest.approx([2 / 64])
    assert s["pearson"] == pytest.approx([-1 / 63])  # two disjoint one-hots of n = 64: −1/(n−1)
    assert s["ssim"][0] < 0.5
    # a map against its complement (1 − a on a ramp): perfectly anti-correlated
    ramp = torch.linspace(0.1, 1, 64).view(1, 8, 8)
    s = A.similarity_scores(ramp, 1.1 - ramp)
    assert s["pearson"] == pytest.approx([-1.0], abs=1e-6)


def test_attack_benchmark_resumes_finished_methods(tmp_path, monkeypatch):
    model = tiny_seq()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cfg = A.AttackConfig(iterations=3, lr=5e-2)
    rows, res = A.run_attack_benchmark(model, x, ["saliency", "gradcam", "scorecam"], n_pairs=2, config=cfg,
                                       progress=False, state_dir=tmp_path)
    (state,) = list(tmp_path.iterdir())
    assert sorted(p.name for p in state.iterdir()) == ["gradcam.json", "gradcam.safetensors",
                                                       "saliency.json", "saliency.safetensors"]
    (state / "gradcam.safetensors").write_bytes(b"cut short")  # an unreadable result is recomputed
    calls = []
    real = A.manipulate
    monkeypatch.setattr(A, "manipulate", lambda model, m, *a, **k: calls.append(m) or real(model, m, *a, **k))
    rows2, res2 = A.run_attack_benchmark(model, x, ["saliency", "gradcam", "scorecam"], n_pairs=2, config=cfg,
                                         progress=False, state_dir=tmp_path)
    assert calls == ["gradcam"]
    assert rows2[0] == rows[0] and rows2[2] == rows[2] == {"method": "scorecam", "status": "n/a (not differentiable)"}
    assert torch.equal(res2["saliency"].x_adv, res["saliency"].x_adv)
    assert torch.allclose(res2["gradcam"].maps["adv"], res["gradcam"].maps["adv"])
    # another configuration does not reuse these results
    A.run_attack_benchmark(model, x, ["saliency"], n_pairs=2, config=A.AttackConfig(iterations=2), progress=False,
                           state_dir=tmp_path)
    assert calls == ["gradcam", "saliency"]
