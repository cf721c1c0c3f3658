"""SRD on the timm ViT variants people audit, built by timm.create_model at reduced size: CLIP (norm_pre),
SigLIP (attention-pool head), DINOv2 (layer scale, registers, dynamic_img_size), distilled DeiT, headless
towers and direction targets. Every new rule is checked in float64 against an explicit per-path reference
written here from the timm modules (loops over tokens, heads and pixels), and each check is shown to fail on
a deliberately broken rule. Weights, biases, LayerNorm affines, layer scales and attention scales are
re-randomised, so no rule can hide behind initialisation (DINOv2's layer scales start at 1e-5)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
from torch import nn

from sae_cafe.errors import MismatchError
from sae_cafe.models import get_adapter, list_adapters, load_model, make_adapter
from sae_cafe.srd import apop_forward, srd_ierf, srd_relevance, srd_saliency, vit_share
from sae_cafe.srd.vit import ViTSRD
from sae_cafe.srd.vit_model import make_spec, run
from sae_cafe.srd.vit_types import Spec

F64 = torch.float64
torch.set_num_threads(1)


def _randomise(m: nn.Module, seed: int) -> nn.Module:
    """Every parameter re-drawn (LayerNorm weights around 1), attention scales random (unfused paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if hasattr(mod, "fused_attn") and hasattr(mod, "scale"):
                mod.fused_attn = False
                mod.scale = float(0.2 + 0.6 * torch.rand(1, generator=g))
    return m.eval()


def build(name: str, seed: int = 1, **kw) -> nn.Module:
    args = dict(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2.0)
    args.update(kw)
    return _randomise(timm.create_model(name, pretrained=False, **args), seed)


VARIANTS = {
    "clip": lambda: build("vit_base_patch16_clip_224", img_size=32, patch_size=8, num_classes=5),
    "clip_headless": lambda: build("vit_base_patch16_clip_224", img_size=32, patch_size=8, num_classes=0),
    "siglip": lambda: build("vit_base_patch16_siglip_224", img_size=32, patch_size=8),
    "siglip_cls": lambda: build("vit_base_patch16_siglip_224", img_size=32, patch_size=8, num_classes=5),
    "dinov2": lambda: build("vit_small_patch14_dinov2", img_size=28, patch_size=7),
    "dinov2_reg4": lambda: build("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7),
    "dinov2_dynamic": lambda: build("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7,
                                    dynamic_img_size=True),
    "deit_distilled": lambda: build("deit_small_distilled_patch16_224", img_size=32, patch_size=8, num_classes=5),
    "deit_distilled_headless": lambda: build("deit_small_distilled_patch16_224", img_size=32, patch_size=8,
                                             num_classes=0),
}
#: input side per variant (the dynamic model runs at another size than it was built for)
SIDE = {"dinov2": 28, "dinov2_reg4": 28, "dinov2_dynamic": 42}


def _x(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = SIDE.get(name, 32)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-10):
    assert torch.allclose(a.to(F64), b.to(F64), atol=tol, rtol=0), float((a.to(F64) - b.to(F64)).abs().max())


def _target(m: nn.Module, out: torch.Tensor, seed: int = 5):
    """A class id for a classifier, a random direction for a headless tower; returns (target, value (N,))."""
    if m.num_classes > 0:
        return 1, out[:, 1]
    d = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(seed))
    return d, out @ d


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request):
    return request.param, VARIANTS[request.param]()


# ----- the functional forward, conservation, batching -----------------------------------------------------
def test_forward_and_apop_reproduce_the_model(variant):
    name, m = variant
    a = get_adapter(m)
    x = _x(name).double()
    ref = m.double()(x)
    spec = make_spec(a.model, (x.shape[-2] // a.patch_size, x.shape[-1] // a.patch_size))
    _close(run(spec, x).logits, ref, 1e-12)
    _close(apop_forward(a, x, x), ref, 1e-12)
    x1, x2 = _x(name, seed=1).double(), _x(name, seed=2).double()
    _close(apop_forward(a, x, 0.3 * x1 + 0.7 * x2),
           0.3 * apop_forward(a, x, x1) + 0.7 * apop_forward(a, x, x2), 1e-10)
    m.float()


def test_float32_conservation_of_saliency_and_ierfs(variant):
    name, m = variant
    a = get_adapter(m.float())
    x = _x(name, 3)
    with torch.no_grad():
        out = m(x)
    target, value = _target(m, out)
    maps, sink = srd_saliency(a, x, target, contrast="none", return_sink=True)
    assert maps.dtype == torch.float32 and maps.shape == (3, *x.shape[-2:])
    err = (maps.sum((-2, -1)) + sink - value).abs() / (maps.abs().sum((-2, -1)) + sink.abs() + value.abs())
    assert (err <= 1e-5).all(), err
    for layer in (0, 1):  # middle and last block of the 2-block instances
        mi, si = srd_ierf(a, x, layer, (1, 2), return_sink=True)
        assert ((mi.sum((-2, -1)) + si - 1).abs() <= 1e-5).all()
    if m.num_classes == 0:  # the default contrast for a direction is "none": the same conservation
        m2, s2 = srd_saliency(a, x, target, return_sink=True)
        _close(m2, maps, 0)
        _close(s2, sink, 0)


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2_dynamic", "deit_distilled"])
def test_batched_equals_per_image(name):
    m = VARIANTS[name]()
    a = get_adapter(m)
    x = _x(name, 3)
    K = m(x[:1]).shape[1]
    d = torch.randn(3, K, generator=torch.Generator().manual_seed(3), dtype=F64)
    maps, sink = srd_saliency(a, x, d, return_sink=True, dtype=F64)
    ierf = srd_ierf(a, x, 0, (2, 1), dtype=F64)
    for i in range(3):
        mi, si = srd_saliency(a, x[i:i + 1], d[i], return_sink=True, dtype=F64)
        _close(mi[0], maps[i], 1e-12)
        _close(si[0], sink[i], 1e-12)
        _close(srd_ierf(a, x[i:i + 1], 0, (2, 1), dtype=F64)[0], ierf[i], 1e-12)


# ----- direction targets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "siglip_cls", "deit_distilled"])
def test_direction_target_is_linear_and_a_one_hot_equals_the_class(name):
    m = VARIANTS[name]()
    a = get_adapter(m)
    x = _x(name)
    e2 = torch.zeros(5, dtype=F64)
    e2[2] = 1
    for contrast in ("none", "mean"):
        cls = srd_saliency(a, x, 2, contrast=contrast, dtype=F64)
        _close(srd_saliency(a, x, e2, contrast=contrast, dtype=F64), cls, 1e-12)
    g = torch.Generator().manual_seed(4)
    d1, d2 = torch.randn(5, generator=g, dtype=F64), torch.randn(2, 5, generator=g, dtype=F64)
    lhs = srd_saliency(a, x, d1 + 2 * d2, dtype=F64)
    _close(lhs, srd_saliency(a, x, d1, dtype=F64) + 2 * srd_saliency(a, x, d2, dtype=F64), 1e-10)
    # hidden relevance with a direction: re-propagated it gives the same total as the saliency map + sink
    rel, sinks = srd_relevance(a, x, d1, [0], return_sink=True, dtype=F64)
    maps, sink = srd_saliency(a, x, d1, return_sink=True, dtype=F64)
    _close(rel["0"].sum((-2, -1)) + sinks["0"], maps.sum((-2, -1)) + sink, 1e-10)


def test_headless_class_id_is_a_clear_error_and_bad_directions_too():
    m = VARIANTS["siglip"]()
    a = get_adapter(m)
    x = _x("siglip")
    with pytest.raises(MismatchError, match="direction"):
        srd_saliency(a, x, 0)
    with pytest.raises(MismatchError, match="direction"):
        srd_relevance(a, x, torch.tensor([0, 1]), [0])
    with pytest.raises(MismatchError):
        srd_saliency(a, x, torch.randn(3, 16))  # 3 directions for 2 images
    with pytest.raises(MismatchError):
        srd_saliency(a, x, torch.randn(2, 7))  # wrong width
    with pytest.raises(MismatchError):
        srd_saliency(get_adapter(VARIANTS["clip"]()), x, torch.randn(7))  # not the output width → not a class


def test_direction_target_on_a_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    a = make_adapter(net, "tiny_dir_cnn", input_size=(16, 16), resize=None)
    x = torch.randn(2, 3, 16, 16)
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64)
    _close(srd_saliency(a, x, e1, contrast="none", dtype=F64), srd_saliency(a, x, 1, contrast="none", dtype=F64),
           1e-12)
    d = torch.randn(2, 4, dtype=F64)
    maps = srd_saliency(a, x, d, dtype=F64)
    with torch.no_grad():
        value = net.double()(x.double()) @ d.T
    _close(maps.sum((-2, -1)), value.diagonal(), 1e-9)


# ----- dynamic input size, load_model names ----------------------------------------------------------------
def test_dynamic_img_size_uses_timm_resampled_position_embeddings():
    m = VARIANTS["dinov2_dynamic"]().double()
    a = get_adapter(m)
    for side in (28, 42, 56):
        x = torch.randn(2, 3, side, side, dtype=F64)
        g = side // 7
        _close(run(make_spec(m, (g, g)), x).logits, m(x), 1e-12)
        mi, si = srd_ierf(a, x, 1, (g - 1, 0), return_sink=True, dtype=F64)
        _close(mi.sum((-2, -1)) + si, torch.ones(2, dtype=F64), 1e-12)
    with pytest.raises(MismatchError):
        srd_ierf(a, torch.randn(1, 3, 30, 30), 0, (0, 0))  # not a multiple of the patch size
    fixed = get_adapter(VARIANTS["dinov2"]())
    with pytest.raises(MismatchError):
        srd_ierf(fixed, torch.randn(1, 3, 42, 42), 0, (0, 0))  # built without dynamic_img_size


def test_foundation_names_are_registered():
    names = {"vit_base_patch16_clip_224", "vit_base_patch16_siglip_224", "vit_small_patch14_dinov2",
             "vit_small_patch14_reg4_dinov2", "deit_small_distilled_patch16_224"}
    assert names <= set(list_adapters())
    with pytest.warns(UserWarning, match="random"):
        a = load_model("vit_small_patch14_reg4_dinov2", depth=1, embed_dim=16, num_heads=2)
    assert a.input_size == (224, 224) and a.num_prefix_tokens == 5 and a.model.dynamic_img_size
    x = torch.randn(1, 3, 224, 224)
    m, s = srd_ierf(a, x, 0, (3, 4), return_sink=True)
    assert abs(float(m.sum() + s) - 1) < 1e-5


# ----- explicit per-path float64 references of each new rule ------------------------------------------------
def _ln_parts(ln: nn.LayerNorm, v: torch.Tensor):
    """(bias-free map with σ of v frozen, σ) of a LayerNorm at vector v."""
    sigma = torch.sqrt(v.var(correction=0) + ln.eps)
    return (lambda u: ln.weight * (u - u.mean()) / sigma), sigma


@torch.no_grad()
def ref_prenorm_pixel_mu(m: nn.Module, x1: torch.Tensor) -> torch.Tensor:
    """μ of every pixel in its patch token after norm_pre (H, W), by loops over patches and pixels."""
    P = m.patch_embed.patch_size[0]
    W, b = m.patch_embed.proj.weight, m.patch_embed.proj.bias  # CLIP: no conv bias
    b = b if b is not None else torch.zeros(W.shape[0], dtype=F64)
    E = m.num_prefix_tokens
    tokens = m.norm_pre(m._pos_embed(m.patch_embed(x1[None])))[0]  # the model's own tokens
    pos = m.pos_embed[0, E:]
    h, w = m.patch_embed.grid_size
    mu = torch.zeros(h * P, w * P, dtype=F64)
    for t in range(h * w):
        i, j = divmod(t, w)
        raw = [W[:, :, di, dj] @ x1[:, i * P + di, j * P + dj] for di in range(P) for dj in range(P)]
        G, _ = _ln_parts(m.norm_pre, sum(raw) + b + pos[t])
        cs = [G(r) for r in raw]
        bias = G(b + pos[t]) + m.norm_pre.bias
        z = tokens[E + t]
        assert torch.allclose(sum(cs) + bias, z, atol=1e-12)
        norms = torch.stack([c.norm() for c in cs])
        for k, c in enumerate(cs):
            di, dj = divmod(k, P)
            mu[i * P + di, j * P + dj] = (c + bias * norms[k] / norms.sum()) @ z / (z @ z)
    return mu


def test_prenorm_pixel_rule_matches_the_per_path_reference_and_a_broken_rule_fails(monkeypatch):
    m = VARIANTS["clip"]().double()
    x = _x("clip").double()
    with torch.no_grad():
        mu = ViTSRD(make_spec(m), x).mu_pix
        refs = [ref_prenorm_pixel_mu(m, x[i]) for i in range(2)]
        for i in range(2):
            _close(mu[i], refs[i], 1e-10)
        monkeypatch.setattr(vit_share, "_pre_kernel", lambda spec: spec.patch_w)  # norms outside norm_pre
        broken = ViTSRD(make_spec(m), x).mu_pix
    assert float((broken[0] - refs[0]).abs().max()) > 1e-6


@torch.no_grad()
def ref_block_mu_layerscale(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """μ_{s→t} (T, T) of a timm Block's attention add with layer scale γ₁, by loops over (t, s, head)."""
    T, D = x.shape
    at, ln, g1 = blk.attn, blk.norm1, blk.ls1.gamma
    H, dh = at.num_heads, D // at.num_heads
    Wq, Wk, Wv = at.qkv.weight.split(D)
    bq, bk, bv = at.qkv.bias.split(D)
    Wo, bo = at.proj.weight, at.proj.bias
    u0 = [_ln_parts(ln, x[s])[0](x[s]) for s in range(T)]
    u = [u0[s] + ln.bias for s in range(T)]
    heads = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    A = torch.zeros(H, T, T, dtype=F64)
    for h, sl in enumerate(heads):
        for t in range(T):
            logits = torch.stack([(Wq[sl] @ u[t] + bq[sl]) @ (Wk[sl] @ u[s] + bk[sl]) for s in range(T)])
            A[h, t] = torch.softmax(logits * at.scale, 0)
    y_ref = x + blk.ls1(at(ln(x)[None]))[0]
    b_attn = g1 * (Wo @ (Wv @ ln.bias + bv) + bo)
    M = torch.zeros(T, T, dtype=F64)
    for t in range(T):
        paths = [[A[h, t, s] * g1 * (Wo[:, sl] @ (Wv[sl] @ u0[s])) for h, sl in enumerate(heads)]
                 for s in range(T)]
        norms = [[float(v.norm()) for v in ps] for ps in paths]
        total = sum(map(sum, norms))
        c = [sum(paths[s]) + b_attn * sum(norms[s]) / total for s in range(T)]
        y = x[t] + sum(c)
        assert torch.allclose(y, y_ref[t], atol=1e-12)
        for s in range(T):
            M[t, s] = c[s] @ y / (y @ y)
        M[t, t] += x[t] @ y / (y @ y)
    return M


def test_layerscale_rule_matches_the_per_path_reference_and_a_broken_rule_fails():
    m = VARIANTS["dinov2_reg4"]().double()
    assert all(float(b.ls1.gamma.detach().abs().min()) > 1e-3 for b in m.blocks)  # not the 1e-5 init
    x = _x("dinov2_reg4").double()
    spec = make_spec(m)
    with torch.no_grad():
        srd = ViTSRD(spec, x, keep=True)
        for li, (_, rec) in enumerate(srd.records):
            blk = m.blocks[li]
            _close(rec.out, blk(rec.x), 1e-12)  # the MLP add with γ₂
            for b in range(2):
                _close(srd.M[li][b], ref_block_mu_layerscale(blk, rec.x[b]), 1e-10)
        # broken rule: layer scale γ₁ left out of the attention contributions (the forward is unchanged)
        plain = [dataclasses.replace(b, wo=m.blocks[i].attn.proj.weight, bo=m.blocks[i].attn.proj.bias)
                 for i, b in enumerate(spec.blocks)]
        bad = ViTSRD(dataclasses.replace(spec, blocks=plain), x, keep=True)
    ref0 = ref_block_mu_layerscale(m.blocks[0], srd.records[0][1].x[0])
    assert float((bad.M[0][0] - ref0).abs().max()) > 1e-6


def _final_stream(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.blocks(m.norm_pre(m._pos_embed(m.patch_embed(x))))


@torch.no_grad()
def ref_attnpool_relevance(m: nn.Module, x1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per final-stream token share (T,) of ⟨output, d⟩ through a SigLIP attention-pool head, by loops over
    tokens and heads: contributions through the latent attention (probabilities frozen), then the MLP residual
    with LayerNorm σ and GELU gates frozen, then the head; the bias b̃ = output − Σ F(c_s) is shared by
    ‖F(c_s)‖."""
    ap, nf = m.attn_pool, m.norm
    z = _final_stream(m, x1[None])[0]  # (T, D)
    T, D = z.shape
    H, dh = ap.num_heads, D // ap.num_heads
    hn = nf(z)
    q = ap.q(ap.latent)[0, 0]
    Wk, Wv = ap.kv.weight.split(D)
    bk, _ = ap.kv.bias.split(D)
    heads = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    A = torch.stack([torch.softmax(torch.stack([q[sl] @ (Wk[sl] @ hn[s] + bk[sl]) for s in range(T)]) * ap.scale,
                                   0) for sl in heads])  # (H, T)
    c = [sum(A[h, s] * (ap.proj.weight[:, sl] @ (Wv[sl] @ _ln_parts(nf, z[s])[0](z[s])))
             for h, sl in enumerate(heads)) for s in range(T)]
    vals = ap.kv(hn)[:, D:]  # values (T, D)
    p = ap.proj(torch.cat([(A[h][:, None] * vals[:, sl]).sum(0) for h, sl in enumerate(heads)]))  # pooled
    Gp, _ = _ln_parts(ap.norm, p)
    hid = ap.mlp.fc1(ap.norm(p))
    gate = ap.mlp.act(hid) / hid

    def F(v):
        v = v + ap.mlp.fc2.weight @ (gate * (ap.mlp.fc1.weight @ Gp(v)))
        return m.head.weight @ v if isinstance(m.head, nn.Linear) else v

    Fc = [F(v) for v in c]
    out = m(x1[None])[0]
    btil = out - sum(Fc)
    norms = torch.stack([f.norm() for f in Fc])
    return torch.stack([Fc[s] @ d + norms[s] / norms.sum() * (btil @ d) for s in range(T)])


@pytest.mark.parametrize("name", ["siglip", "siglip_cls"])
def test_attention_pool_head_matches_the_per_path_reference_and_a_broken_rule_fails(name, monkeypatch):
    m = VARIANTS[name]().double()
    x = _x(name).double()
    K = m(x[:1]).shape[1]
    d = torch.randn(2, K, dtype=F64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        R, node = ViTSRD(make_spec(m), x).class_relevance(d, "none")
        assert node == len(m.blocks)
        refs = [ref_attnpool_relevance(m, x[i], d[i]) for i in range(2)]
        for i in range(2):
            _close(R[i], refs[i], 1e-10)
        real = vit_share._pool_affine

        def no_mlp(spec, tr, v, token, b):  # broken: the MLP residual's linear part left out
            ap = spec.attn_pool
            return real(dataclasses.replace(spec, attn_pool=dataclasses.replace(ap, fc1=None)), tr, v, token, b)

        monkeypatch.setattr(vit_share, "_pool_affine", no_mlp)
        bad, _ = ViTSRD(make_spec(m), x).class_relevance(d, "none")
    assert float((bad[0] - refs[0]).abs().max()) > 1e-6


@torch.no_grad()
def ref_distilled_relevance(m: nn.Module, x1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-token share (T,) of ⟨output, d⟩ at the last block's input of a distilled DeiT, by loops: for each
    readout r (class token → head, distillation token → head_dist, ½ each) the sources of its final vector are
    the attention paths c_{s→r}, the skip x_r and the MLP term m_r (sent on by y_r's sharing ratios); the
    head bias b̃_r = ½ head_r(norm(out_r)) − Σ F_r(sources) is shared by ‖F_r‖."""
    blk = m.blocks[-1]
    xs = m.blocks[:-1](m.norm_pre(m._pos_embed(m.patch_embed(x1[None]))))[0]  # (T, D) last block input
    T, D = xs.shape
    at, ln = blk.attn, blk.norm1
    H, dh = at.num_heads, D // at.num_heads
    Wq, Wk, Wv = at.qkv.weight.split(D)
    bq, bk, bv = at.qkv.bias.split(D)
    Wo, bo = at.proj.weight, at.proj.bias
    u0 = [_ln_parts(ln, xs[s])[0](xs[s]) for s in range(T)]
    u = [u0[s] + ln.bias for s in range(T)]
    heads = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    b_attn = Wo @ (Wv @ ln.bias + bv) + bo
    final = _final_stream(m, x1[None])[0]
    R = torch.zeros(T, dtype=F64)
    for r, head in ((0, m.head), (1, m.head_dist)):
        A = torch.stack([torch.softmax(torch.stack([(Wq[sl] @ u[r] + bq[sl]) @ (Wk[sl] @ u[s] + bk[sl])
                                                    for s in range(T)]) * at.scale, 0) for sl in heads])
        paths = [[A[h, s] * (Wo[:, sl] @ (Wv[sl] @ u0[s])) for h, sl in enumerate(heads)] for s in range(T)]
        norms = [[float(v.norm()) for v in ps] for ps in paths]
        total = sum(map(sum, norms))
        c = [sum(paths[s]) + b_attn * sum(norms[s]) / total for s in range(T)]
        y = xs[r] + sum(c)
        mr = blk.mlp(blk.norm2(y))
        _close(y + mr, final[r], 1e-12)
        Gf, _ = _ln_parts(m.norm, final[r])

        def F(v, head=head, Gf=Gf):
            v = Gf(v)
            return 0.5 * (head.weight @ v if isinstance(head, nn.Linear) else v)

        src = [*c, xs[r], mr]
        Fc = [F(v) for v in src]
        btil = 0.5 * head(m.norm(final[r])) - sum(Fc)
        fn = torch.stack([f.norm() for f in Fc])
        share = [Fc[i] @ d + fn[i] / fn.sum() * (btil @ d) for i in range(T + 2)]
        mu = torch.stack([c[s] @ y / (y @ y) for s in range(T)])
        mu[r] += xs[r] @ y / (y @ y)
        R = R + torch.stack(share[:T]) + share[T + 1] * mu
        R[r] += share[T]
    return R


@pytest.mark.parametrize("name", ["deit_distilled", "deit_distilled_headless"])
def test_distillation_token_matches_the_per_path_reference_and_a_broken_rule_fails(name, monkeypatch):
    m = VARIANTS[name]().double()
    x = _x(name).double()
    K = m(x[:1]).shape[1]
    d = torch.randn(2, K, dtype=F64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        R, node = ViTSRD(make_spec(m), x).class_relevance(d, "none")
        assert node == len(m.blocks) - 1
        refs = [ref_distilled_relevance(m, x[i], d[i]) for i in range(2)]
        for i in range(2):
            _close(R[i], refs[i], 1e-10)
        _close(R.sum(-1), (m(x) * d).sum(-1), 1e-10)
        # broken: the distillation readout ignored (a plain class-token head)
        monkeypatch.setattr(Spec, "readouts", lambda self: [(0, self.head, 1.0)])
        bad, _ = ViTSRD(make_spec(m), x).class_relevance(d, "none")
    assert float((bad[0] - refs[0]).abs().max()) > 1e-6


def test_sink_is_reported_per_prefix_token():
    m = VARIANTS["deit_distilled"]()
    a = get_adapter(m)
    x = _x("deit_distilled")
    maps, sink = srd_saliency(a, x, 3, contrast="none", return_sink="tokens", dtype=F64)
    assert sink.shape == (2, 2)  # class and distillation tokens
    with torch.no_grad():
        logit = m.double()(x.double())[:, 3]
    _close(maps.sum((-2, -1)) + sink.sum(-1), logit, 1e-10)
    assert math.isfinite(float(sink.abs().sum()))


@pytest.mark.parametrize("name", ["clip", "siglip", "deit_distilled"])
def test_differentiable_maps_and_the_model_untouched(name):
    m = VARIANTS[name]().requires_grad_(False)
    a = get_adapter(m)
    before = [p.detach().clone() for p in m.parameters()]
    xg = _x(name).requires_grad_(True)
    K = m(xg[:1]).shape[1]
    srd_saliency(a, xg, torch.ones(K), differentiable=True).pow(2).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters(), strict=True))
    assert all(p.grad is None for p in m.parameters())
