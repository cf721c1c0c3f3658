"""SRD on open_clip image towers (``open_clip.transformer.VisionTransformer``, the ``.visual`` of
``open_clip.create_model``) at reduced size: ``ln_pre``, fused ``in_proj_weight`` attention, GELU and
QuickGELU, layer scale, 'tok' and 'avg' pooling, ``ln_post`` before or after pooling, the bare ``proj``
parameter. Weights, biases, LayerNorm affines and layer scales are re-randomised. The open_clip attention
layout is checked in float64 against an explicit per-path reference written here from
``nn.MultiheadAttention``'s own weights, and the check is shown to fail on a broken conversion (q/k rows of
``in_proj_weight`` swapped)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from sae_cafe.errors import MismatchError, UnsupportedModuleError
from sae_cafe.models import list_adapters, make_adapter
from sae_cafe.models.openclip_vit import OpenCLIPViTAdapter
from sae_cafe.models.openclip_vit_spec import openclip_spec
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency
from sae_cafe.srd.vit import ViTSRD
from sae_cafe.srd.vit_model import run

F64 = torch.float64
torch.set_num_threads(1)

VARIANTS = {
    "tok": dict(),
    "quickgelu_ls": dict(act_layer=QuickGELU, ls_init_value=0.5),
    "avg_ln_after": dict(pool_type="avg", final_ln_after_pool=True),
    "no_proj_no_ln_pre": dict(no_ln_pre=True),
}


def build(name: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    v = VisionTransformer(image_size=32, patch_size=8, width=16, layers=3, heads=2, mlp_ratio=2, output_dim=12,
                          **VARIANTS[name])
    if name == "no_proj_no_ln_pre":
        v.proj = None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in v.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.LayerNorm) and pname == "weight":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return v.eval()


def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-10):
    assert torch.allclose(a.to(F64), b.to(F64), atol=tol, rtol=0), float((a.to(F64) - b.to(F64)).abs().max())


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request):
    return request.param, build(request.param)


def test_dispatch_layer_ids_and_names():
    a = make_adapter(build("tok"))
    assert isinstance(a, OpenCLIPViTAdapter) and a.input_size == (32, 32) and a.patch_size == 8
    assert a.resolve_layer(2) == a.resolve_layer("blocks.2") == "transformer.resblocks.2"
    assert {"openclip_vit_b_32", "openclip_vit_b_16"} <= set(list_adapters())


def test_forward_and_apop_reproduce_the_tower(variant):
    name, v = variant
    a = make_adapter(v.double())
    x = _x().double()
    with torch.no_grad():
        ref = v(x)
        _close(run(openclip_spec(v), x).logits, ref, 1e-12)
        _close(apop_forward(a, x, x), ref, 1e-11)
    v.float()


def test_float32_conservation_of_direction_saliency_and_ierfs(variant):
    name, v = variant
    a = make_adapter(v.float())
    x = _x(3)
    with torch.no_grad():
        out = v(x)
    d = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(4))  # e.g. a text embedding
    maps, sink = srd_saliency(a, x, d, return_sink=True)
    value = out @ d
    err = (maps.sum((-2, -1)) + sink - value).abs() / (maps.abs().sum((-2, -1)) + sink.abs() + value.abs())
    assert (err <= 1e-5).all(), err
    mi, si = srd_ierf(a, x, 1, (2, 1), return_sink=True)
    assert ((mi.sum((-2, -1)) + si - 1).abs() <= 1e-5).all()
    with pytest.raises(MismatchError, match="direction"):
        srd_saliency(a, x, 0)


def test_batched_equals_per_image():
    a = make_adapter(build("quickgelu_ls"))
    x = _x(3)
    d = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))  # one direction per image
    maps, sink = srd_saliency(a, x, d, return_sink=True)
    for i in range(3):
        mi, si = srd_saliency(a, x[i:i + 1], d[i:i + 1], return_sink=True)
        _close(mi[0], maps[i], 1e-5)
        _close(si[0], sink[i], 1e-5)


def test_unsupported_towers_are_clear_errors():
    v = VisionTransformer(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=2, output_dim=12,
                          attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(UnsupportedModuleError, match="attentional pooling"):
        srd_saliency(make_adapter(v.eval()), _x(1), torch.ones(12))


# ----- explicit per-path float64 reference of the open_clip attention layout --------------------------------
def ref_block_mu(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """μ_{s→t} (T, T) of a ResidualAttentionBlock's attention add (ls_1 included), by loops over (t, s, h),
    from nn.MultiheadAttention's in_proj_weight split as PyTorch documents it: rows [W_q; W_k; W_v]."""
    T_, D = x.shape
    ln, mha = blk.ln_1, blk.attn
    H = mha.num_heads
    dh = D // H
    g1 = blk.ls_1.gamma if hasattr(blk.ls_1, "gamma") else torch.ones(D, dtype=F64)
    Wq, Wk, Wv = mha.in_proj_weight.split(D)
    bq, bk, bv = mha.in_proj_bias.split(D)
    Wo, bo = mha.out_proj.weight, mha.out_proj.bias
    u0 = [ln.weight * (x[s] - x[s].mean()) / torch.sqrt(x[s].var(correction=0) + ln.eps) for s in range(T_)]
    u = [u0[s] + ln.bias for s in range(T_)]
    heads = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    A = torch.zeros(H, T_, T_, dtype=F64)
    for h, sl in enumerate(heads):
        for t in range(T_):
            logit = torch.stack([(Wq[sl] @ u[t] + bq[sl]) @ (Wk[sl] @ u[s] + bk[sl]) for s in range(T_)])
            A[h, t] = torch.softmax(logit / dh ** 0.5, 0)
    y_ref = x + blk.ls_1(mha(ln(x)[None], ln(x)[None], ln(x)[None], need_weights=False)[0][0])
    b_attn = g1 * (Wo @ (Wv @ ln.bias + bv) + bo)
    M = torch.zeros(T_, T_, dtype=F64)
    for t in range(T_):
        paths = [[A[h, t, s] * g1 * (Wo[:, sl] @ (Wv[sl] @ u0[s])) for h, sl in enumerate(heads)] for s in range(T_)]
        norms = [[float(p.norm()) for p in ps] for ps in paths]
        total = sum(map(sum, norms))
        c = [sum(paths[s]) + b_attn * sum(norms[s]) / total for s in range(T_)]
        y = x[t] + sum(c)
        assert torch.allclose(y, y_ref[t], atol=1e-12)
        for s in range(T_):
            M[t, s] = c[s] @ y / (y @ y)
        M[t, t] += x[t] @ y / (y @ y)
    return M


@pytest.mark.parametrize("name", ["tok", "quickgelu_ls"])
def test_in_proj_layout_matches_the_reference_and_a_swapped_split_fails(name):
    v = build(name).double()
    x = _x().double()
    spec = openclip_spec(v)
    with torch.no_grad():
        srd = ViTSRD(spec, x, keep=True)
        for li, (_, rec) in enumerate(srd.records):
            blk = v.transformer.resblocks[li]
            _close(rec.out, blk(rec.x), 1e-12)  # MLP add: GELU / QuickGELU boundary and ls_2
            for b in range(2):
                _close(srd.M[li][b], ref_block_mu(blk, rec.x[b]), 1e-10)
        ref0 = ref_block_mu(v.transformer.resblocks[0], srd.records[0][1].x[0])
        blk = spec.blocks[0]
        D = blk.wqkv.shape[1]
        perm = torch.cat([torch.arange(D, 2 * D), torch.arange(D), torch.arange(2 * D, 3 * D)])  # q ↔ k rows
        bad_blk = dataclasses.replace(blk, wqkv=blk.wqkv[perm], bqkv=blk.bqkv[perm])
        bad = ViTSRD(dataclasses.replace(spec, blocks=[bad_blk, *spec.blocks[1:]]), x, keep=True)
        assert float((bad.M[0][0] - ref0).abs().max()) > 1e-6
        if name == "quickgelu_ls":  # QuickGELU read as GELU: the block no longer reproduces the module
            g = dataclasses.replace(blk, act=nn.GELU())
            bad = ViTSRD(dataclasses.replace(spec, blocks=[g, *spec.blocks[1:]]), x, keep=True)
            r = bad.records[0][1]
            assert float((r.out - v.transformer.resblocks[0](r.x)).abs().max()) > 1e-6
