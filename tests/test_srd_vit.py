"""SRD for ViTs on tiny torchvision / timm models (float64 exactness, conservation, sink, no mutation)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from sae_cafe.errors import MismatchError, NonFiniteError, SaeCafeError, UnknownLayerError
from sae_cafe.models import get_adapter
from sae_cafe.srd.vit import (
    ViTSRD,
    vit_apop_forward,
    vit_srd_ierf,
    vit_srd_ierf_from_relevance,
    vit_srd_relevance,
    vit_srd_saliency,
    vit_srd_sharing,
)
from sae_cafe.srd.vit_model import make_spec, run
from sae_cafe.srd.vit_share import block_contributions, head_affine, pixel_contributions, pixel_share

F64 = torch.float64


def _randomise(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def tv_vit() -> nn.Module:
    return _randomise(torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                           hidden_dim=16, mlp_dim=32, num_classes=5), 1)


def timm_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return _randomise(VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                        mlp_ratio=2.0, num_classes=5, **kw), 2)


MODELS = {
    "tv": tv_vit,
    "timm": timm_vit,
    "timm_reg": lambda: timm_vit(reg_tokens=2),
    "timm_avg": lambda: timm_vit(global_pool="avg"),
    "timm_ls": lambda: timm_vit(init_values=0.7, no_embed_class=True, qkv_bias=False),
}


@pytest.fixture(params=list(MODELS))
def vit(request):
    return get_adapter(MODELS[request.param]())


def _x(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-10):
    assert torch.allclose(a.to(F64), b.to(F64), atol=tol, rtol=0), float((a - b).abs().max())


# ----- the recomputed forward ---------------------------------------------------------------------------
def test_recomputed_forward_and_apop_equal_model(vit):
    model = vit.model.double()
    x = _x().double()
    ref = model(x)
    _close(run(make_spec(model), x).logits, ref, 1e-12)
    _close(vit_apop_forward(vit, x, x), ref, 1e-12)
    # APOP is affine in x′ given x's frozen pattern
    x1, x2 = _x(seed=1).double(), _x(seed=2).double()
    mix = vit_apop_forward(vit, x, 0.3 * x1 + 0.7 * x2)
    _close(mix, 0.3 * vit_apop_forward(vit, x, x1) + 0.7 * vit_apop_forward(vit, x, x2), 1e-10)


def test_block0_input_tokens_match_torchvision():
    m = tv_vit().double()
    x = _x().double()
    ref = torch.cat([m.class_token.expand(3, -1, -1), m._process_input(x)], 1) + m.encoder.pos_embedding
    _close(run(make_spec(m), x, upto=0).tokens0, ref, 1e-13)


# ----- exact decomposition ----------------------------------------------------------------------------
def test_contributions_sum_to_every_residual_vector_and_mu_sums_to_one(vit):
    model = vit.model.double()
    x = _x().double()
    spec = make_spec(model)
    with torch.no_grad():
        srd = ViTSRD(spec, x, keep=True)
    for bs, rec in srd.records:
        c = block_contributions(bs, rec)  # (B,T,S,D)
        _close(rec.x + c.sum(2), rec.y, 1e-12)  # attention add: skip + Σ_s c_{s→t}
        _close(rec.y + rec.m, rec.out, 1e-12)  # MLP add
        yy = (rec.y ** 2).sum(-1)
        mu = torch.einsum("btsd,btd->bts", c, rec.y) / yy[..., None]
        mu = mu + torch.diag_embed((rec.x * rec.y).sum(-1) / yy)
        _close(mu, bs.M, 1e-12)
        _close(bs.M.sum(-1), torch.ones_like(yy), 1e-12)
    # patch embedding: per-pixel contributions sum to each patch token; pixel μ sum to 1 per patch
    E, P = spec.n_prefix, spec.patch
    cp = pixel_contributions(spec, x, srd.trace.tokens0)  # (B, h·w, P², D)
    e = srd.trace.tokens0[:, E:]
    _close(cp.sum(2), e, 1e-12)
    mu_ref = torch.einsum("blpd,bld->blp", cp, e) / (e ** 2).sum(-1)[..., None]
    mu = pixel_share(spec, x, srd.trace.tokens0)
    blocks = mu.view(3, 4, P, 4, P).permute(0, 1, 3, 2, 4).reshape(3, 16, P * P)
    _close(blocks, mu_ref, 1e-12)
    _close(blocks.sum(-1), torch.ones(3, 16, dtype=F64), 1e-12)
    # head: the affine image of the final stream gives the logits exactly
    tr = srd.trace
    T = tr.last.shape[1]
    if spec.pool == "token":
        Fc, b = head_affine(spec, tr, tr.last[:, :1], 0, torch.ones(1, dtype=F64))
    else:
        from sae_cafe.srd.vit_model import pool_weights

        Fc, b = head_affine(spec, tr, tr.last, torch.arange(T), pool_weights(spec, T, tr.last))
    _close(Fc.sum(1) + b, tr.logits, 1e-12)


def _slow_reference_block_mu(blk, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-token float64 reference of μ_{s→t} for one torchvision EncoderBlock (one image).

    Independent of the engine: loops over targets, sources and heads and builds every contribution vector.
    """
    T, D = x.shape
    ln, mha = blk.ln_1, blk.self_attention
    H, dh = mha.num_heads, D // mha.num_heads
    Wq, Wk, Wv = mha.in_proj_weight.split(D)
    bq, bk, bv = mha.in_proj_bias.split(D)
    Wo, bo = mha.out_proj.weight, mha.out_proj.bias
    u0 = [(x[s] - x[s].mean()) / torch.sqrt(x[s].var(correction=0) + ln.eps) * ln.weight for s in range(T)]
    u = [u0[s] + ln.bias for s in range(T)]
    heads = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    A = torch.zeros(H, T, T, dtype=F64)
    for h, sl in enumerate(heads):
        for t in range(T):
            logits = torch.stack([(Wq[sl] @ u[t] + bq[sl]) @ (Wk[sl] @ u[s] + bk[sl]) for s in range(T)])
            A[h, t] = torch.softmax(logits / math.sqrt(dh), 0)
    y_ref = x + mha(ln(x)[None], ln(x)[None], ln(x)[None], need_weights=False)[0][0]
    b_attn = Wo @ (Wv @ ln.bias + bv) + bo
    M = torch.zeros(T, T, dtype=F64)
    for t in range(T):
        paths = [[A[h, t, s] * (Wo[:, sl] @ (Wv[sl] @ u0[s])) for h, sl in enumerate(heads)] for s in range(T)]
        norms = [[float(torch.linalg.vector_norm(v)) for v in ps] for ps in paths]  # per (token, head) path
        total = sum(map(sum, norms))
        c = [sum(paths[s]) + b_attn * sum(norms[s]) / total for s in range(T)]
        y = x[t] + sum(c)
        assert torch.allclose(y, y_ref[t], atol=1e-12)
        for s in range(T):
            M[t, s] = c[s] @ y / (y @ y)
        M[t, t] += x[t] @ y / (y @ y)
    return M


def test_slow_per_token_reference_one_block():
    model = tv_vit().double()
    vit = get_adapter(model)
    x = _x(2).double()
    with torch.no_grad():
        srd = ViTSRD(make_spec(model), x, keep=True)
        for i, (_, rec) in enumerate(srd.records):
            blk = model.encoder.layers[i]
            for b in range(2):
                _close(srd.M[i][b], _slow_reference_block_mu(blk, rec.x[b]), 1e-12)
    assert vit.block_index(1) == 1


# ----- conservation and the sink -------------------------------------------------------------------------
def test_conservation_head_to_pixels_plus_sink(vit):
    x = _x()
    logits = vit.model(x).detach()
    t = torch.tensor([0, 3, 4])
    maps, sink = vit_srd_saliency(vit, x, t, contrast="none", return_sink=True, dtype=F64)
    assert maps.shape == (3, 32, 32) and sink.shape == (3,) and maps.dtype == F64
    _close(maps.sum((-2, -1)) + sink, logits.gather(1, t[:, None])[:, 0].double(), 1e-6)  # float32 model
    maps_t, sink_t = vit_srd_saliency(vit, x, t, contrast="none", return_sink="tokens", dtype=F64)
    _close(sink_t.sum(-1), sink)
    assert sink_t.shape == (3, vit.num_prefix_tokens)
    # float32 conservation within 1e-5 relative
    m32, s32 = vit_srd_saliency(vit, x, t, contrast="none", return_sink=True)
    assert m32.dtype == torch.float32
    lg = logits.gather(1, t[:, None])[:, 0]
    scale = m32.abs().sum((-2, -1)) + s32.abs() + lg.abs()
    assert ((m32.sum((-2, -1)) + s32 - lg).abs() <= 1e-5 * scale).all()
    # iERFs of any block, patch or class token: maps + sink = 1
    for layer, pos in ((0, (1, 2)), ("1", 5), (1, torch.tensor([[0, 0], [3, 3], [2, 1]]))):
        m, s = vit_srd_ierf(vit, x, layer, pos, return_sink=True, dtype=F64)
        _close(m.sum((-2, -1)) + s, torch.ones(3, dtype=F64), 1e-12)
    if vit.model.__class__.__module__.startswith("torchvision") or vit.model.cls_token is not None:
        m, s = vit_srd_ierf(vit, x, 0, "cls", return_sink=True, dtype=F64)
        _close(m.sum((-2, -1)) + s, torch.ones(3, dtype=F64), 1e-12)


def test_contrast_mean_conserves_prefix_share(vit):
    x = _x()
    spec = make_spec(vit.model.double())
    xd = x.double()
    with torch.no_grad():
        srd = ViTSRD(spec, xd)
        R, _ = srd.class_relevance(torch.tensor([2, 2, 2]), "mean")
    maps, sink = vit_srd_saliency(vit, xd, 2, contrast="mean", return_sink=True)
    E = spec.n_prefix
    expect = R[:, :E].sum(-1)  # class/register tokens keep their share; patch tokens sum to 0
    _close(R[:, E:].sum(-1), torch.zeros(3, dtype=F64), 1e-12)
    _close(maps.sum((-2, -1)) + sink, expect, 1e-12)
    if spec.pool == "avg":
        _close(expect, torch.zeros(3, dtype=F64), 0)


@pytest.mark.parametrize("name", ["tv", "timm_reg", "timm_avg"])
def test_batched_equals_per_image(name):
    vit = get_adapter(MODELS[name]())
    x = _x(3)
    t = torch.tensor([1, 2, 0])
    maps, sink = vit_srd_saliency(vit, x, t, return_sink=True, dtype=F64)
    ierf = vit_srd_ierf(vit, x, 1, (2, 3), dtype=F64)
    for i in range(3):
        mi, si = vit_srd_saliency(vit, x[i:i + 1], int(t[i]), return_sink=True, dtype=F64)
        _close(mi[0], maps[i], 1e-12)
        _close(si[0], sink[i], 1e-12)
        _close(vit_srd_ierf(vit, x[i:i + 1], 1, (2, 3), dtype=F64)[0], ierf[i], 1e-12)


@pytest.mark.parametrize("name", ["tv", "timm_reg", "timm_avg"])
def test_many_seeds_reuse_and_relevance_consistency(name):
    vit = get_adapter(MODELS[name]())
    x = _x(2)
    h, w = vit.patch_grid()
    seeds = torch.eye(h * w, dtype=F64).view(1, h * w, h, w).expand(2, -1, -1, -1)
    maps, sink = vit_srd_ierf_from_relevance(vit, x, 0, seeds, return_sink=True, dtype=F64)
    assert maps.shape == (2, h * w, 32, 32) and sink.shape == (2, h * w)
    for i in (0, 7, h * w - 1):
        _close(maps[:, i], vit_srd_ierf(vit, x, 0, i, dtype=F64), 1e-12)
    # hidden relevance (patch + prefix tokens) propagated down reproduces the saliency map
    rel, sinks = vit_srd_relevance(vit, x, 3, [0, "1"], contrast="mean", return_sink=True, dtype=F64)
    assert set(rel) == {"0", "1"} and rel["0"].shape == (2, h, w) and sinks["1"].shape == (2, vit.num_prefix_tokens)
    full = torch.cat([sinks["0"], rel["0"].flatten(1)], 1)[:, None]
    m0, s0 = vit_srd_ierf_from_relevance(vit, x, 0, full, return_sink=True, dtype=F64)
    sal, ssal = vit_srd_saliency(vit, x, 3, contrast="mean", return_sink=True, dtype=F64)
    _close(m0[:, 0], sal, 1e-12)
    _close(s0[:, 0], ssal, 1e-12)
    if name == "tv":  # class-token head: the last block's output holds the whole logit on the class token
        logit = vit.model.double()(x.double())[:, 3]
        _close(rel["1"].abs().sum((-2, -1)), torch.zeros(2, dtype=F64), 0)
        _close(sinks["1"][:, 0], logit, 1e-12)
    # reuse: sharing ratios built once, many seeds propagated
    srd = vit_srd_sharing(vit, x, 0, dtype=F64)
    E = vit.num_prefix_tokens
    R = torch.cat([torch.zeros(2, h * w, E, dtype=F64), seeds.flatten(2)], 2)  # (N, S, T)
    mm, ss = srd.to_pixels(srd.down(R, 1))
    _close(mm, maps, 1e-12)
    _close(ss.sum(-1), sink, 1e-12)


# ----- a hand-built attention pattern ---------------------------------------------------------------------
def test_hand_built_attention_moves_the_ierf_to_the_attended_patch():
    """Block 0: the token of patch (0,0) attends to the distant patch (3,3); its iERF must land there."""
    m = timm_vit()
    src, dst = 1 + 0, 1 + 15  # token indices of patches (0,0) and (3,3) (class token first)
    blk = m.blocks[0]
    with torch.no_grad():
        m.pos_embed[0, :, :2] = 0
        m.pos_embed[0, src, 0] = 6.0  # query marker
        m.pos_embed[0, dst, 1] = 6.0  # key marker
        m.patch_embed.proj.weight.mul_(0.05)
        m.blocks[0].norm1.weight.fill_(1.0)
        m.blocks[0].norm1.bias.zero_()
        qkv = blk.attn.qkv.weight
        qkv[:32].zero_()
        blk.attn.qkv.bias[:32].zero_()
        qkv[0, 0] = 4.0  # head 0: q ∝ marker 0, k ∝ marker 1
        qkv[16, 1] = 4.0
        qkv[8, 0] = 4.0  # head 1 likewise
        qkv[24, 1] = 4.0
        blk.attn.proj.weight.mul_(20.0)  # the attended value dominates the target token
    vit = get_adapter(m)
    x = _x(2)
    xd = x.double()
    spec = make_spec(m.double())
    with torch.no_grad():
        srd = ViTSRD(spec, xd, keep=True)
    A = srd.records[0][1].attn
    assert (A[:, :, src, dst] > 0.9).all()  # the pattern is in place
    maps = vit_srd_ierf(vit, x, 0, (0, 0), dtype=F64)
    per_patch = maps.view(2, 4, 8, 4, 8).sum((2, 4)).flatten(1)  # (2, 16) relevance per patch
    assert (per_patch.abs().argmax(1) == 15).all()
    assert (per_patch[:, 15] > 0.5).all() and (per_patch[:, 15].abs() > 5 * per_patch[:, 0].abs()).all()
    _close(per_patch[:, 15], srd.M[0][:, src, dst], 1e-12)  # the patch's pixels carry μ_{dst→src}


# ----- API contract ---------------------------------------------------------------------------------------
def _state(m: nn.Module):
    return ([(n, p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()],
            [(n, b.clone()) for n, b in m.named_buffers()],
            [n for n, _ in m.named_modules()],
            [(len(k._forward_hooks), len(k._forward_pre_hooks), len(k._backward_hooks)) for k in m.modules()])


def _same(a, b):
    assert [n for n, *_ in a[0]] == [n for n, *_ in b[0]]
    assert all(torch.equal(p, q) and p.dtype == q.dtype and r == s for (_, p, r), (_, q, s) in zip(a[0], b[0],
                                                                                                  strict=True))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a[1], b[1], strict=True))
    assert a[2] == b[2] and a[3] == b[3]


def test_model_untouched_no_grad_frozen_and_differentiable():
    m = timm_vit(reg_tokens=2)
    m.requires_grad_(False)
    vit = get_adapter(m)
    before = _state(m)
    x = _x(2)
    with torch.no_grad():
        vit_srd_saliency(vit, x, 1, dtype=F64)
        vit_srd_ierf(vit, x, 1, "cls")
    with pytest.raises(MismatchError):
        vit_srd_ierf(vit, x, 1, (4, 0), dtype=F64)
    _same(before, _state(m))
    xg = x.clone().requires_grad_(True)
    maps = vit_srd_saliency(vit, xg, 1, differentiable=True)
    maps.pow(2).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    _same(before, _state(m))


def test_errors():
    vit = get_adapter(timm_vit())
    x = _x(2)
    with pytest.raises(UnknownLayerError):
        vit_srd_ierf(vit, x, 7, (0, 0))
    with pytest.raises(UnknownLayerError):
        vit_srd_ierf(vit, x, "blocks.9", (0, 0))
    for bad in ((4, 0), (0, -1), 16, -1, "reg", torch.tensor([[0, 0]]), torch.tensor([[0, 0], [0, 4]])):
        with pytest.raises(MismatchError):
            vit_srd_ierf(vit, x, 0, bad)
    with pytest.raises(MismatchError):
        vit_srd_ierf_from_relevance(vit, x, 0, torch.ones(2, 1, 3, 4))
    with pytest.raises(MismatchError):
        vit_srd_saliency(vit, x, 5)
    with pytest.raises(SaeCafeError):
        vit_srd_saliency(vit, x, 0, contrast="max")
    with pytest.raises(MismatchError):
        vit_srd_saliency(vit, torch.randn(2, 3, 40, 40), 0)
    xn = x.clone()
    xn[0, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        vit_srd_saliency(vit, xn, 0)
    m = timm_vit()
    with torch.no_grad():
        m.blocks[1].mlp.fc1.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        vit_srd_saliency(get_adapter(m), x, 0)


def test_public_api_dispatch():
    import sae_cafe.srd as api
    m = tv_vit()
    x = _x(2)
    maps, sink = api.srd_saliency(m, x, 1, contrast="none", return_sink=True)
    ours, ours_sink = vit_srd_saliency(get_adapter(m), x, 1, contrast="none", return_sink=True)
    _close(maps, ours, 1e-6)
    _close(sink, ours_sink, 1e-6)
