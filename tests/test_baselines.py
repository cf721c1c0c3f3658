"""Saliency baseline registry: shapes, library equivalence, n/a reasons, and no side effects on the model."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sae_cafe.evaluation import baselines as B
from sae_cafe.models import get_adapter

warnings.filterwarnings("ignore")


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def tiny_seq() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5).eval()


def _state(model: nn.Module):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())
    kinds = [(n, type(m).__name__, getattr(m, "inplace", None), m.training) for n, m in model.named_modules()]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    fwd = type(model).forward, [type(m).forward for m in model.modules()]
    return hooks, kinds, params, grads, fwd


def _same_state(a, b) -> None:
    assert a[0] == 0 and b[0] == 0, f"hooks left behind: {b[0]}"
    assert a[1] == b[1], "modules replaced, re-flagged or switched to training"
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3] == b[3] and a[4] == b[4]


@pytest.mark.parametrize("make,size,cheap", [pytest.param(tiny_resnet, 48, True, marks=pytest.mark.slow),
                                             (tiny_seq, 32, False)])
def test_every_method_runs_and_leaves_no_trace(make, size, cheap):
    model = make()
    before = _state(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    y0 = model(x).detach()
    for name in B.list_baselines(cheap_only=cheap):
        if B.applicability(name, model):
            continue
        maps = B.explain(name, model, x, torch.tensor([3]))
        assert maps.shape == (1, size, size) and torch.isfinite(maps).all(), name
        assert maps.abs().sum() > 0, name
        _same_state(before, _state(model))
        if any(m.__dict__.get("forward") for m in model.modules()):
            pytest.fail(f"{name} left a patched forward on an instance")
    assert torch.equal(model(x), y0)


def test_registry_equals_captum():
    from captum.attr import DeepLift, GuidedBackprop, InputXGradient, Saliency

    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 4])
    assert torch.allclose(B.explain("saliency", model, x, t), Saliency(model).attribute(x, t, abs=True).sum(1))
    assert torch.allclose(B.explain("input_x_gradient", model, x, t),
                          InputXGradient(model).attribute(x, t).sum(1))

    class Reused(nn.Module):  # one ReLU module, two call sites
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            h = self.relu(self.c2(self.relu(self.c1(x))))
            return self.fc(h.mean((2, 3)))

    class Unique(Reused):
        def __init__(self):
            super().__init__()
            self.r1, self.r2 = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.fc(self.r2(self.c2(self.r1(self.c1(x)))).mean((2, 3)))

    torch.manual_seed(3)
    reused = Reused().eval()
    unique = Unique().eval()
    unique.load_state_dict(reused.state_dict())
    adapter = SimpleNamespace(model=reused)  # these two methods only use ``.model``
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 2])
    ref = DeepLift(unique).attribute(x, target=t).sum(1)
    assert torch.allclose(B.deeplift(adapter, x, t), ref, atol=1e-6)
    ref = GuidedBackprop(unique).attribute(x, target=t).sum(1)
    assert torch.allclose(B.guided_backprop(adapter, x, t), ref, atol=1e-6)
    assert sum(isinstance(m, nn.ReLU) for m in reused.modules()) == 1  # the user's model is untouched


def test_per_site_copy_and_cam_layer():
    model = tiny_resnet()
    copy = B.per_site_relu_copy(model)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(copy(x), model(x), atol=1e-6)
    relus = [m for m in copy.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 4 * 2 and not any(r.inplace for r in relus)  # stem + 2 sites per BasicBlock
    assert model.relu.inplace  # original unchanged
    assert B.cam_target_layer(get_adapter(model))[0] == "layer4"
    assert B.cam_target_layer(get_adapter(tiny_seq()))[0] == "5"


def test_not_applicable_on_vit():
    vit = tiny_vit()
    reasons = {n: B.applicability(n, vit) for n in B.REGISTRY}
    for name in ("lrp_epsilon_plus", "deeplift", "guided_backprop", "fullgrad", "ablationcam"):
        assert reasons[name], name
    assert "LRP rules" in reasons["lrp_epsilon_plus"]
    with pytest.raises(B.NotApplicable, match="lrp_epsilon_plus"):
        B.explain("lrp_epsilon_plus", vit, torch.randn(1, 3, 32, 32), 0)
    before = _state(vit)
    maps = B.explain("gradcam", vit, torch.randn(2, 3, 32, 32), None)
    assert maps.shape == (2, 32, 32) and maps.max() > 0
    _same_state(before, _state(vit))


def test_srd_entries_call_srd():
    from sae_cafe.srd import srd_saliency

    model = tiny_seq()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 1])
    assert torch.allclose(B.explain("srd", model, x, t), srd_saliency(model, x, t, contrast="mean"))
    assert torch.allclose(B.explain("srd_none", model, x, t), srd_saliency(model, x, t, contrast="none"))


def test_unknown_method():
    with pytest.raises(B.SaeCafeError, match="available"):
        B.explain("nope", tiny_seq(), torch.randn(1, 3, 8, 8), 0)


# ---------------------------------------------------------------- benchmark (registry end to end) -----------
def test_benchmark_resume_and_outputs(tmp_path, monkeypatch):
    from sae_cafe.artifacts import read_manifest
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark, write_saliency_benchmark

    model = tiny_seq()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 32, 32, generator=g)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 8:20] = True
    cfg = BenchmarkConfig(n_fidelity=2, n_subsets=10, n_noise=2, n_examples=2, batch_size=2)
    methods = ["input_x_gradient", "gradcam"]
    res = run_saliency_benchmark(model, x, masks, None, methods, cfg, state_dir=tmp_path / "state",
                                 progress=False)
    for m in methods:
        assert np.isfinite(res.scores[m]["pointing"]).all() and np.isfinite(res.seconds[m]).all()
        assert np.isfinite(res.scores[m]["fidelity"][:2]).all() and np.isnan(res.scores[m]["fidelity"][2])
        assert res.examples[m].shape == (2, 32, 32)
    # rerun: everything comes from the per-image state, no method is called again
    monkeypatch.setitem(B.REGISTRY, "gradcam", B.Baseline("gradcam", _boom, "x"))
    again = run_saliency_benchmark(model, x, masks, None, methods, cfg, state_dir=tmp_path / "state",
                                   progress=False)
    for m in methods:
        for k, v in res.scores[m].items():
            assert np.allclose(v, again.scores[m][k], equal_nan=True), (m, k)
    out = tmp_path / "stage"
    write_saliency_benchmark(again, out)
    for f in ("table.csv", "results.json", "table.txt", "curves.png", "examples.png"):
        assert (out / f).stat().st_size > 0, f
    assert read_manifest(out, "saliency")["methods"] == methods
    assert "input_x_gradient" in (out / "table.txt").read_text()


def test_benchmark_caps_and_extension(tmp_path, monkeypatch):
    """Per-method caps, a separate stability count, and a rerun on more images that reuses what it has."""
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark

    model = tiny_seq()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:, 4:16, 4:16] = True
    methods = ["input_x_gradient", "saliency"]
    cfg = BenchmarkConfig(n_fidelity=2, n_stability=1, max_images={"saliency": 3}, max_stability={"saliency": 0},
                          n_subsets=10, n_noise=2, n_examples=1, batch_size=2)
    res = run_saliency_benchmark(model, x[:3], masks[:3], None, methods, cfg, state_dir=tmp_path, progress=False)
    ixg, sal = res.scores["input_x_gradient"], res.scores["saliency"]
    assert np.isfinite(ixg["fidelity"][:2]).all() and np.isnan(ixg["fidelity"][2])
    assert np.isfinite(ixg["stability"][0]) and np.isnan(ixg["stability"][1:]).all()
    assert np.isnan(sal["stability"]).all() and np.isfinite(sal["sparseness"]).all()
    rows = {r["method"]: r for r in res.table()}
    assert rows["input_x_gradient"]["stability_n"] == 1 and rows["saliency"]["fidelity_n"] == 2

    calls = []
    real = B.REGISTRY["input_x_gradient"]
    monkeypatch.setitem(B.REGISTRY, "input_x_gradient", B.Baseline(
        "input_x_gradient", lambda a, xx, t: calls.append(len(xx)) or real.fn(a, xx, t), "captum"))
    monkeypatch.setitem(B.REGISTRY, "saliency", B.Baseline("saliency", _boom, "x"))  # capped at 3: all stored
    cfg2 = BenchmarkConfig(n_fidelity=2, n_stability=2, max_images={"saliency": 3}, max_stability={"saliency": 0},
                           n_subsets=10, n_noise=2, n_examples=1, batch_size=2)
    more = run_saliency_benchmark(model, x, masks, None, methods, cfg2, state_dir=tmp_path, progress=False)
    # image 1 now needs stability (its map is cached) and image 3 is new: one map, then 2 noisy copies of image 1
    assert calls == [1, 2] and np.isfinite(more.scores["input_x_gradient"]["stability"][:2]).all()
    assert np.isnan(more.scores["saliency"]["sparseness"][3])
    for k in ("pointing", "sparseness", "fidelity"):
        assert np.allclose(more.scores["input_x_gradient"][k][:3], ixg[k], equal_nan=True), k


def _boom(*_a):
    raise AssertionError("recomputed although the per-image result was saved")


def test_benchmark_reports_not_applicable():
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark

    res = run_saliency_benchmark(tiny_vit(), torch.randn(2, 3, 32, 32), None, None,
                                 ["lrp_epsilon_plus", "gradcam"], BenchmarkConfig(n_fidelity=0), progress=False)
    rows = {r["method"]: r for r in res.table()}
    assert rows["lrp_epsilon_plus"]["status"].startswith("n/a (zennit has no LRP rules")
    assert rows["gradcam"]["status"] == "ok" and np.isfinite(rows["gradcam"]["sparseness_mean"])
    assert "n/a" in res.format_table()


@pytest.mark.slow
def test_cli_benchmark_on_world(tmp_path):
    from sae_cafe.artifacts import read_manifest
    from sae_cafe.cli import main

    rc = main(["benchmark-saliency", "--model", "mini_resnet", "--n", "2", "--n-fidelity", "1", "--subsets", "8",
               "--noise-samples", "2", "--methods", "input_x_gradient,deeplift", "--run", "t",
               "--root", str(tmp_path), "--attack-pairs", "1", "--attack-iters", "2", "--no-progress"])
    assert rc == 0
    stage = tmp_path / "t" / "saliency" / "mini_resnet"
    manifest = read_manifest(stage, "saliency")
    assert manifest["n_images"] == 2
    timing = manifest["config"]["timing"]  # wall/CPU seconds of this invocation, recorded for the README
    assert timing["table_wall_s"] > 0 and timing["table_cpu_s"] > 0 and timing["attack_wall_s"] > 0
    assert "deeplift" in (stage / "table.csv").read_text()
    assert "n/a (not differentiable)" in (stage / "attack.csv").read_text()
    assert (stage / "attack.png").exists() and not (tmp_path / "t" / "saliency" / ".mini_resnet.tmp").exists()


def test_benchmark_stochastic_method_is_reproducible_and_leaves_global_rng():
    from sae_cafe.evaluation.benchmark import BenchmarkConfig, run_saliency_benchmark

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    cfg = BenchmarkConfig(metrics=("sparseness", "stability"), n_stability=3, n_noise=2, batch_size=2)
    model = tiny_seq()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run_saliency_benchmark(model, x, None, None, ["smoothgrad"], cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: the same scores
    b = run_saliency_benchmark(model, x, None, None, ["smoothgrad"], cfg, progress=False)
    for k in ("sparseness", "stability"):
        assert np.isfinite(a.scores["smoothgrad"][k]).all()
        np.testing.assert_array_equal(a.scores["smoothgrad"][k], b.scores["smoothgrad"][k])


# ---------------------------------------------------------------- known answers -----------------------------
class _Linear(nn.Sequential):  # a Sequential subclass: the adapter registry knows it
    """f_k(x) = Σ W_k ⊙ x + b_k: gradient W_t, input×gradient x ⊙ W_t, IG (zero baseline) x ⊙ W_t."""

    def __init__(self, K=3, C=3, H=8, W=8):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.w = nn.Parameter(torch.randn(K, C, H, W, generator=g))
        self.b = nn.Parameter(torch.randn(K, generator=g))

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.w) + self.b


class _Quadratic(_Linear):
    """f_k(x) = Σ A_k ⊙ x²: gradient 2 A_t ⊙ x, input×gradient 2 A_t ⊙ x², IG (zero baseline) A_t ⊙ x²."""

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x * x, self.w)


def _xt():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11)), torch.tensor([0, 2])


def test_gradient_methods_on_linear_and_quadratic_nets_equal_closed_forms():
    x, t = _xt()
    lin, quad = _Linear().eval(), _Quadratic().eval()
    W, A = lin.w.detach()[t], quad.w.detach()[t]  # (N, C, H, W)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    assert close(B.explain("saliency", lin, x, t), W.abs().sum(1))
    assert close(B.explain("input_x_gradient", lin, x, t), (x * W).sum(1))
    assert close(B.explain("integrated_gradients", lin, x, t), (x * W).sum(1))
    assert close(B.explain("saliency", quad, x, t), (2 * A * x).abs().sum(1))
    assert close(B.explain("input_x_gradient", quad, x, t), (2 * A * x * x).sum(1))
    ig = B.explain("integrated_gradients", quad, x, t)
    assert close(ig, (A * x * x).sum(1))
    # completeness: IG sums to f_t(x) − f_t(0)
    f = quad(x).gather(1, t[:, None])[:, 0] - quad(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    assert torch.allclose(ig.flatten(1).sum(1), f.detach(), rtol=1e-4)


def test_smoothgrad_with_fixed_noise_equals_closed_form():
    """Captum's NoiseTunnel draws torch.normal(0, σ) for the 16 copies (repeat_interleave order) from the
    global RNG: seeded, the map is mean_s |2 A_t ⊙ (x + n_s)| summed over channels."""
    x, t = _xt()
    quad = _Quadratic().eval()
    A = quad.w.detach()[t]
    sd = 0.15 * float(x.max() - x.min())
    torch.manual_seed(5)
    got = B.explain("smoothgrad", quad, x, t)
    torch.manual_seed(5)
    noise = torch.normal(0, torch.tensor(sd).repeat(2 * 16, 3, 8, 8))
    noisy = (x.repeat_interleave(16, 0) + noise).view(2, 16, 3, 8, 8)
    expect = (2 * A[:, None] * noisy).abs().mean(1).sum(1)
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, B.explain("saliency", quad, x, t), rtol=1e-2)  # the noise matters


def test_rise_with_fixed_masks_equals_closed_form(monkeypatch):
    """RISE map = Σ_i p_t(x ⊙ m_i) m_i / (N·p). With every grid cell kept (the mask draws fixed to 0 < p), every
    mask is 1 and the map is p_t(x) / 0.5 at every pixel."""
    model = tiny_seq()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    t = torch.tensor([1, 3])
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *s, **k: torch.zeros(*s) if s[:1] == (B.RISE_MASKS,)
                        else real_rand(*s, **k))
    got = B.explain("rise", model, x, t)
    p = model(x).softmax(1).gather(1, t[:, None])[:, 0].detach()
    assert torch.allclose(got, (p / B.RISE_P)[:, None, None].expand(2, 16, 16), rtol=1e-5)
    # one fixed 7×7 cell pattern G for every mask, no shift: every mask is m = bilinear upsampling of G (cells of
    # ⌈16/7⌉ = 3 px, cropped to 16×16) and the map is p_t(x ⊙ m) · m / p
    G = (torch.arange(49).view(1, 1, 7, 7) % 3 == 0).float()
    monkeypatch.setattr(torch, "rand", lambda *s, **k: (1 - G).expand(s[0], 1, 7, 7).clone()
                        if s[:1] == (B.RISE_MASKS,) else real_rand(*s, **k))
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, **k: torch.zeros(size, dtype=torch.long))
    got = B.explain("rise", model, x, t)
    m = F.interpolate(G, size=(24, 24), mode="bilinear", align_corners=False)[0, 0, :16, :16]
    pm = model(x * m).softmax(1).gather(1, t[:, None])[:, 0].detach()
    assert torch.allclose(got, pm[:, None, None] * m / B.RISE_P, rtol=1e-5, atol=1e-7)


def _cam_net() -> nn.Module:
    """1×1 conv (positive weights) → ReLU → global average pool → linear: the CAM layer is the ReLU output A
    (N, 2, H, W) and ∂y_t/∂A_kp = W_tk / HW."""
    net = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.1, 0.9]]).view(2, 3, 1, 1))
        net[4].weight.copy_(torch.tensor([[1.0, -0.5], [-0.4, 2.0], [0.7, 0.7]]))
    return net.eval()


def test_gradcam_and_lrp_on_a_hand_built_net_equal_closed_forms():
    net = _cam_net()
    assert B.cam_target_layer(get_adapter(net))[0] == "1"
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(13)) + 0.1  # positive inputs
    t = torch.tensor([0, 1])
    A = net[1](net[0](x)).detach()  # (N, 2, H, W)
    Wt = net[4].weight.detach()[t]  # (N, 2)
    lin = (Wt[:, :, None, None] * A).sum(1)  # Σ_k W_tk A_kp
    # Grad-CAM: ReLU(Σ_k mean_p(∂y/∂A_k) A_k) = ReLU(lin) / HW, min–max scaled per image by pytorch-grad-cam
    cam = lin.clamp(min=0) / 36
    cam = cam - cam.flatten(1).amin(1)[:, None, None]
    cam = cam / (1e-7 + cam.flatten(1).amax(1)[:, None, None])
    assert torch.allclose(B.explain("gradcam", net, x, t), cam, atol=1e-5)
    # LRP-ε (dense) / z⁺ (conv, positive weights and inputs = LRP-0) / avg-pool proportional / ReLU pass:
    # R_p = Σ_k A_kp W_tk / (HW · y_t), the relevance of the one-hot output (1) conserved
    y = net(x).gather(1, t[:, None])[:, 0].detach()
    lrp = B.explain("lrp_epsilon_plus", net, x, t)
    assert torch.allclose(lrp, lin / (36 * y[:, None, None]), rtol=1e-4, atol=1e-6)
    assert torch.allclose(lrp.flatten(1).sum(1), torch.ones(2), atol=1e-4)


# ---------------------------------------------------------------- ViT baselines -----------------------------
def tv_tiny_vit() -> nn.Module:
    torch.manual_seed(4)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                             mlp_dim=32, num_classes=5).eval()
    with torch.no_grad():  # torchvision zero-initialises the head; a random head gives non-trivial gradients
        m.heads.head.weight.normal_()
    return m


def _tv_reference(model: nn.Module, x: torch.Tensor, t: torch.Tensor):
    """float64 forward through the torchvision modules, attention probabilities from nn.MultiheadAttention
    (need_weights) plus a zero leaf E_l per block, so that ∂y_t/∂E_l is the total gradient of y_t by A_l."""
    m = copy.deepcopy(model).double()
    x = x.double()
    z = m._process_input(x)
    z = torch.cat([m.class_token.expand(len(x), -1, -1), z], 1) + m.encoder.pos_embedding
    attn, leaves = [], []
    for blk in m.encoder.layers:
        y = blk.ln_1(z)
        _, A = blk.self_attention(y, y, y, need_weights=True, average_attn_weights=False)  # (N, h, T, T)
        E = torch.zeros_like(A, requires_grad=True)
        A = A + E
        mha = blk.self_attention
        N, T, D = y.shape
        h = mha.num_heads
        v = F.linear(y, mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:]).view(N, T, h, D // h).transpose(1, 2)
        o = (A @ v).transpose(1, 2).reshape(N, T, D)
        z = z + mha.out_proj(o)
        z = z + blk.mlp(blk.ln_2(z))
        attn.append(A.detach())
        leaves.append(E)
    logits = m.heads(m.encoder.ln(z)[:, 0])
    grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), leaves)
    return logits.detach(), [a.numpy() for a in attn], [g.numpy() for g in grads]


def _cls_row_to_pixels(row: np.ndarray, size: int) -> torch.Tensor:
    g = int(round((row.shape[-1] - 1) ** 0.5))
    return F.interpolate(torch.from_numpy(row[:, 1:]).reshape(-1, 1, g, g), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].float()


def test_attention_rollout_equals_explicit_matrix_product():
    from sae_cafe.evaluation.vit_baselines import attention_forward

    model = tv_tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(20))
    t = torch.tensor([1, 3])
    logits, _, _ = attention_forward(get_adapter(model), x)
    assert torch.allclose(logits, model(x), atol=1e-5)  # the functional forward is the model's
    ref_logits, attn, _ = _tv_reference(model, x, t)
    assert torch.allclose(ref_logits.float(), model(x), atol=1e-5)
    T = attn[0].shape[-1]
    rows = []
    for n in range(2):
        R = np.eye(T)
        for A in attn:  # Â_l = ½ mean_h A_l + ½ I, R = Â_L ⋯ Â_1
            R = (0.5 * A[n].mean(0) + 0.5 * np.eye(T)) @ R
        rows.append(R[0])
    expect = _cls_row_to_pixels(np.stack(rows), 32)
    got = B.explain("attention_rollout", model, x, t)
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-6)
    # class-agnostic: another target, the same map
    assert torch.allclose(B.explain("attention_rollout", model, x, torch.tensor([0, 0])), got)


def test_chefer2021_equals_hand_computation():
    model = tv_tiny_vit()
    before = _state(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    t = torch.tensor([1, 3])
    _, attn, grads = _tv_reference(model, x, t)
    T = attn[0].shape[-1]
    rows = []
    for n in range(2):
        R = np.eye(T)
        for A, G in zip(attn, grads):  # R ← R + mean_h (∇A ⊙ A)⁺ R
            R = R + np.maximum(G[n] * A[n], 0).mean(0) @ R
        rows.append(R[0])
    expect = _cls_row_to_pixels(np.stack(rows), 32)
    got = B.explain("chefer2021", model, x, t)
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, B.explain("chefer2021", model, x, torch.tensor([0, 0])))  # class-specific
    _same_state(before, _state(model))


def test_vit_baselines_on_timm_and_not_applicable_elsewhere():
    vit = tiny_vit()  # timm
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(22))
    for name in ("attention_rollout", "chefer2021"):
        maps = B.explain(name, vit, x, torch.tensor([0, 1]))
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0
        assert "vision transformer" in B.applicability(name, tiny_seq())
    assert "lxt" in B.applicability("attnlrp", vit) and "lxt" in B.applicability("attnlrp", tiny_seq())
    with pytest.raises(B.NotApplicable, match="process-wide"):
        B.explain("attnlrp", vit, x, 0)
