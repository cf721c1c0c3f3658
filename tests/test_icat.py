"""ICAT attribution: Captum parity, completeness, isolation, ablation by direct recomputation, protocol."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import mini_resnet_32, random_sae

from sae_cafe.icat import attribute, attribute_pair, insertion_deletion, prepare_pair
from sae_cafe.icat.attribute import sae_encode_with_pre
from sae_cafe.models import PFVBatch, make_adapter

torch.set_num_threads(1)  # 2 threads on the shared, busy 2-core box is ~20x slower (spin-waits)


_sae = random_sae


@pytest.fixture(scope="module")
def setup():
    adapter = mini_resnet_32("mini_resnet_test")
    saes = {"layer2": _sae(32, 64, 1), "layer3": _sae(48, 96, 2), "layer4": _sae(64, 64, 3)}
    x = torch.randn(2, 3, 32, 32)
    return adapter, saes, x


def test_ig_matches_captum(setup):
    from captum.attr import IntegratedGradients

    adapter, saes, x = setup
    ctx = prepare_pair(adapter, saes, x[:1], "layer2", "layer3")
    targets = ctx.t_full_BT[0].topk(2).indices
    res = attribute_pair(ctx, "ig", steps=8, targets=targets, rule="riemann_right")
    trap = attribute_pair(ctx, "ig", steps=8, targets=targets, rule="trapezoid")

    def f(a_MNS: torch.Tensor, j: int) -> torch.Tensor:  # the sub-network function T_j(a)
        rows = torch.zeros(len(a_MNS), dtype=torch.long)
        return ctx.evaluate(a_MNS, rows, torch.full((len(a_MNS), 1), j))[:, 0]

    for col, j in enumerate(targets.tolist()):
        ig = IntegratedGradients(lambda a, j=j: f(a, j))
        ref = ig.attribute(ctx.a_BNS, baselines=torch.zeros_like(ctx.a_BNS), n_steps=8,
                           method="riemann_right").sum(1)[0]  # (S,)
        torch.testing.assert_close(res.scores_BSJ[0, :, col], ref, atol=1e-5, rtol=1e-5)
        # Captum's trapezoid uses the same 8 points with weights 1/8 (ends halved), ours 1/7
        ref_t = ig.attribute(ctx.a_BNS, baselines=torch.zeros_like(ctx.a_BNS), n_steps=8,
                             method="riemann_trapezoid").sum(1)[0] * 8 / 7
        torch.testing.assert_close(trap.scores_BSJ[0, :, col], ref_t, atol=1e-5, rtol=1e-5)
    assert res.scores_BSJ.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("pair", [("layer2", "layer3"), ("layer3", "layer4")])
def test_ig_completeness_64_steps(setup, pair):
    adapter, saes, x = setup
    res = attribute(adapter, saes, x[:1], *pair, steps=64, top_k_targets=3, return_result=True)
    assert res.completeness_error() <= 0.01
    # and it is a real check: 2 steps are far off
    coarse = attribute(adapter, saes, x[:1], *pair, steps=2, top_k_targets=3, return_result=True)
    assert coarse.completeness_error() > res.completeness_error()


def test_ig_completeness_converges_over_two_layer_stages(setup):
    adapter, saes, x = setup  # layer3 → logits crosses ReLU kinks of a random net: quadrature error only
    errs = [attribute(adapter, saes, x[:1], "layer3", "logits", steps=s, top_k_targets=3,
                      return_result=True).completeness_error() for s in (8, 128)]
    assert errs[1] < 0.01 and errs[1] < errs[0] / 4


def test_isolation_other_sae_does_not_change_edges(setup):
    adapter, saes, x = setup
    x = x[:1]
    a = attribute(adapter, saes, x, "layer2", "layer3", steps=4, top_k_targets=2)
    other = {**saes, "layer4": _sae(64, 64, 99), "layer1": _sae(16, 32, 98)}
    b = attribute(adapter, other, x, "layer2", "layer3", steps=4, top_k_targets=2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # while changing an SAE of the pair does change them
    c = attribute(adapter, {**saes, "layer3": _sae(48, 96, 7)}, x, "layer2", "layer3", steps=4,
                  top_k_targets=2)
    assert not torch.allclose(a, c)


def _direct_target(adapter, saes, x, src, tgt, pfv_src, extra, j):
    """T_j recomputed without ICAT's machinery: splice PFVs, run on, encode, read at n*."""
    full_t = adapter.capture(x, [tgt])[tgt]
    post, pre = sae_encode_with_pre(saes[tgt], adapter.to_pfv(full_t).pfv)
    n_star = post[0, :, j].argmax() if post[0, :, j].max() > 0 else pre[0, :, j].argmax()
    b = adapter.to_pfv(adapter.capture(x, [src])[src])
    act = adapter.from_pfv(PFVBatch(pfv_src, b.positions, b.grid, extra))
    out = adapter.forward_from(src, act, x, until=tgt)
    _, pre2 = sae_encode_with_pre(saes[tgt], adapter.to_pfv(out).pfv)
    return pre2[0, n_star, j]


@torch.no_grad()
def test_ablation_equals_direct_recomputation(setup):
    adapter, saes, x = setup
    xi = x[:1]
    res = attribute(adapter, saes, xi, "layer2", "layer3", method="ablation", top_k_targets=2,
                    return_result=True)
    b = adapter.to_pfv(adapter.capture(xi, ["layer2"])["layer2"])
    sae = saes["layer2"]
    codes = sae.encode(b.pfv)
    active = (codes[0] != 0).any(0).nonzero()[:, 0][:4]
    assert len(active) > 0
    for col, j in enumerate(res.targets_BJ[0].tolist()):
        t_full = _direct_target(adapter, saes, xi, "layer2", "layer3", b.pfv, b.extra, j)
        for k in active.tolist():
            # remove latent k's decoder contribution from the true PFVs (the error term stays)
            pfv = b.pfv - codes[..., k:k + 1] * sae.W_dec[k]
            t_abl = _direct_target(adapter, saes, xi, "layer2", "layer3", pfv, b.extra, j)
            assert float(res.scores_BSJ[0, k, col]) == pytest.approx(float(t_full - t_abl), abs=1e-4, rel=1e-4)


def test_methods_shapes_targets_and_dense(setup):
    adapter, saes, x = setup
    dense = attribute(adapter, saes, x, "layer3", "layer4", method="grad_x_input")
    assert dense.shape == (2, 96, 64)
    sub = attribute(adapter, saes, x, "layer3", "layer4", method="grad_x_input", targets=[5, 9])
    torch.testing.assert_close(sub[:, :, [5, 9]], dense[:, :, [5, 9]])
    assert sub[:, :, 0].abs().sum() == 0
    sp = attribute(adapter, saes, x, "layer3", "layer4", method="grad_x_input", targets=[5], sparse=True)
    assert sp.is_sparse and torch.equal(sp.to_dense(), sub.where(torch.zeros(64, dtype=bool).index_fill(
        0, torch.tensor([5]), True), torch.zeros(())))
    logit = attribute(adapter, saes, x, "layer4", "logits", method="grad", targets=[0, 1])
    assert logit.shape == (2, 64, 12)
    r1 = attribute(adapter, saes, x, "layer3", "layer4", method="random", targets=[1])
    assert r1.abs().sum() > 0


def test_insertion_deletion_endpoints(setup):
    adapter, saes, x = setup
    ctx = prepare_pair(adapter, saes, x, "layer2", "layer3")
    res = attribute_pair(ctx, "ablation", top_k_targets=3, active_only=True)
    cur = insertion_deletion(ctx, res, n_points=6)
    assert cur.deletion_QP.shape[1] == 6 and len(cur.auc_del_Q) > 0
    torch.testing.assert_close(cur.deletion_QP[:, 0], torch.ones(len(cur.auc_del_Q)), atol=1e-4, rtol=0)
    torch.testing.assert_close(cur.insertion_QP[:, -1], torch.ones(len(cur.auc_del_Q)), atol=1e-4, rtol=0)
    torch.testing.assert_close(cur.insertion_QP[:, 0], torch.zeros(len(cur.auc_del_Q)), atol=1e-6, rtol=0)
    s = cur.summary()
    assert s["n_pairs"] + s["n_degenerate"] == 6


def test_vit_pair_and_topk_sae():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=4).eval()
    with torch.no_grad():
        vit.heads.head.weight.normal_(0, 0.3)
    adapter = make_adapter(vit, "tiny_vit")
    saes = {0: _sae(16, 32, 1, topk=6), 2: _sae(16, 32, 2, topk=6)}
    x = torch.randn(2, 3, 16, 16)
    res = attribute(adapter, saes, x, 0, 2, steps=64, rule="trapezoid", top_k_targets=3, return_result=True)
    assert res.scores_BSJ.shape == (2, 32, 3)
    assert res.completeness_error() <= 0.01
    lg = attribute(adapter, saes, x, 0, "logits", steps=64, top_k_targets=2, return_result=True)
    assert lg.scores_BSJ.abs().sum() > 0 and lg.completeness_error() <= 0.01
    mod = sys.modules["sae_cafe.icat.attribute"]
    ctx = mod.prepare_pair(adapter, saes, x, 0, 2)
    ctx.evaluate(ctx.a_BNS, torch.arange(2), torch.zeros(2, 1, dtype=torch.long))
    assert ctx._prefix_free  # the sub-network after block 0 ignores the input: the prefix runs on 1 image


def test_mean_baseline_completeness_and_latent_means(setup):
    from sae_cafe.icat import latent_means

    adapter, saes, x = setup
    mu = latent_means(adapter, saes["layer3"], x, "layer3")
    assert mu.shape == (96,) and (mu >= 0).all() and mu.sum() > 0
    res = attribute(adapter, saes, x[:1], "layer3", "layer4", baseline=mu, steps=64, top_k_targets=2,
                    active_only=True, return_result=True)
    torch.testing.assert_close(res.baseline_S, mu)
    assert res.completeness_error() <= 0.01  # over all latents, also the inactive ones moved from μ to 0
    inactive = ~(prepare_pair(adapter, saes, x[:1], "layer3", "layer4").a_BNS != 0).any(1)[0]
    assert res.scores_BSJ[0, inactive].abs().sum() == 0
