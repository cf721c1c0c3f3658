"""SRD on Hugging Face vision transformers built from small configs: ViT (classifier, pooler, no pooler), CLIP
(pre_layrnorm, quick_gelu, post_layernorm, projection), DINOv2 (layer scale, interpolated position embeddings,
[cls, mean patch] classifier) and SigLIP (tanh-GELU, attention-pool head). Weights, biases, LayerNorm affines,
layer scales and attention scales are re-randomised. The HF attention layout (separate q/k/v projections) and
the activation boundaries are checked in float64 against an explicit per-path reference written here from
the HF modules, and each check is shown to fail on a deliberately broken conversion."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import transformers as T
from torch import nn

from sae_cafe.errors import MismatchError
from sae_cafe.models import list_adapters, make_adapter
from sae_cafe.models.hf_vit import HFViTAdapter
from sae_cafe.models.hf_vit_spec import hf_spec
from sae_cafe.srd import apop_forward, srd_ierf, srd_saliency
from sae_cafe.srd.vit import ViTSRD
from sae_cafe.srd.vit_model import run

F64 = torch.float64
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*random initialisation.*")

SMALL = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=32,
             patch_size=8)


def _randomise(m: nn.Module, seed: int) -> nn.Module:
    """Every parameter re-drawn (LayerNorm weights around 1), attention scales random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
            for attr in ("scaling", "scale"):
                if isinstance(getattr(mod, attr, None), float):
                    setattr(mod, attr, float(0.2 + 0.6 * torch.rand(1, generator=g)))
    return m.eval()


def _dino_cfg(**kw):
    args = {k: v for k, v in SMALL.items() if k != "intermediate_size"}
    return T.Dinov2Config(mlp_ratio=2, **{**args, **kw})


BUILD = {
    "vit_cls": lambda: T.ViTForImageClassification(T.ViTConfig(**SMALL, num_labels=5)),
    "vit_pooler": lambda: T.ViTModel(T.ViTConfig(**SMALL)),
    "vit_bare": lambda: T.ViTModel(T.ViTConfig(**SMALL), add_pooling_layer=False),
    "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)),
    "clip_proj": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**SMALL, projection_dim=12)),
    "dinov2": lambda: T.Dinov2Model(_dino_cfg()),
    "dinov2_cls": lambda: T.Dinov2ForImageClassification(_dino_cfg(num_labels=5)),
    "dinov2_reg_cls": lambda: T.Dinov2WithRegistersForImageClassification(
        T.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, num_labels=4,
                                    **{k: v for k, v in SMALL.items() if k != "intermediate_size"})),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)),
}
SIDE = {"dinov2": 40}  # DINOv2 interpolates its position embeddings: run it off its config size


def build(name: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return _randomise(BUILD[name](), seed)


def _x(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = SIDE.get(name, 32)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-10):
    assert torch.allclose(a.to(F64), b.to(F64), atol=tol, rtol=0), float((a.to(F64) - b.to(F64)).abs().max())


def _target(a, out: torch.Tensor, seed: int = 5):
    """A class id for a classifier, a random direction for a headless tower; returns (target, value (N,))."""
    if a.num_classes:
        return 1, out[:, 1]
    d = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(seed))
    return d, out @ d


@pytest.fixture(params=list(BUILD), scope="module")
def variant(request):
    return request.param, build(request.param)


def test_dispatch_by_class_layer_ids_and_names():
    for name in BUILD:
        a = make_adapter(build(name))
        assert isinstance(a, HFViTAdapter) and len(a.block_names()) == 3
        assert a.resolve_layer(1) == a.resolve_layer("blocks.1") == a.block_names()[1]
        assert a.resolve_layer(a.block_names()[1][3:]) == a.block_names()[1]  # the HF model's own path
    a = make_adapter(build("clip_proj"))
    assert a.block_names()[0] == "hf.vision_model.encoder.layers.0" and a.num_prefix_tokens == 1
    again = make_adapter(a.model)  # the wrapper itself is accepted and not wrapped twice
    assert again.model is a.model and again.block_names() == a.block_names()
    assert make_adapter(build("siglip")).num_prefix_tokens == 0
    assert make_adapter(build("dinov2_reg_cls")).num_prefix_tokens == 3
    for n in ("hf_vit_base_patch16_224", "hf_clip_vit_base_patch16", "hf_dinov2_small", "hf_siglip_base_patch16_224"):
        assert n in list_adapters()


def test_forward_and_apop_reproduce_the_model(variant):
    name, m = variant
    a = make_adapter(m.double())
    x = _x(name).double()
    with torch.no_grad():
        ref = a.model(x)
        g = (x.shape[-2] // a.patch_size, x.shape[-1] // a.patch_size)
        _close(run(hf_spec(a.model, g), x).logits, ref, 1e-12)
        _close(apop_forward(a, x, x), ref, 1e-11)
    m.float()


def test_float32_conservation_of_saliency_and_ierfs(variant):
    name, m = variant
    a = make_adapter(m.float())
    x = _x(name, 3)
    with torch.no_grad():
        out = a(x)
    target, value = _target(a, out)
    maps, sink = srd_saliency(a, x, target, contrast="none", return_sink=True)
    assert maps.dtype == torch.float32 and maps.shape == (3, *x.shape[-2:])
    err = (maps.sum((-2, -1)) + sink - value).abs() / (maps.abs().sum((-2, -1)) + sink.abs() + value.abs())
    assert (err <= 1e-5).all(), err
    mi, si = srd_ierf(a, x, 1, (1, 2), return_sink=True)  # the middle block
    assert ((mi.sum((-2, -1)) + si - 1).abs() <= 1e-5).all()


@pytest.mark.parametrize("name", ["clip_proj", "dinov2_cls", "siglip"])
def test_batched_equals_per_image(name):
    a = make_adapter(build(name))
    x = _x(name, 3)
    with torch.no_grad():
        target, _ = _target(a, a(x))
    maps, sink = srd_saliency(a, x, target, return_sink=True)
    for i in range(3):
        mi, si = srd_saliency(a, x[i:i + 1], target, return_sink=True)
        _close(mi[0], maps[i], 1e-5)
        _close(si[0], sink[i], 1e-5)


def test_headless_class_id_is_a_clear_error():
    a = make_adapter(build("clip"))
    with pytest.raises(MismatchError, match="direction"):
        srd_saliency(a, _x("clip"), 0)


def test_pfvs_round_trip_and_keep_the_class_token_apart():
    a = make_adapter(build("clip_proj"))
    x = _x("clip_proj")
    layer = a.block_names()[1]
    act = a.capture(x, [layer])[layer]
    b = a.to_pfv(act)
    assert b.pfv.shape == (2, 16, 16) and b.extra.shape == (2, 1, 16)
    _close(a.from_pfv(b), act, 0)


# ----- explicit per-path float64 reference of the HF attention layout and activation boundaries -------------
def _parts(layer: nn.Module, name: str):
    """(LN₁, q, k, v, o Linear, heads, scale, γ₁ or None) read from an HF layer, independent of the converter."""
    if name.startswith("dinov2"):
        at = layer.attention
        return (layer.norm1, at.q_proj, at.k_proj, at.v_proj, at.o_proj, at.num_attention_heads, at.scaling,
                layer.layer_scale1.lambda1)
    if name.startswith("vit"):
        at = layer.attention
        return (layer.layernorm_before, at.q_proj, at.k_proj, at.v_proj, at.o_proj, at.num_attention_heads,
                at.scaling, None)
    at = layer.self_attn
    return layer.layer_norm1, at.q_proj, at.k_proj, at.v_proj, at.out_proj, at.num_heads, at.scale, None


def ref_block_mu(layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """μ_{s→t} (T, T) of an HF layer's attention add, by loops over (target t, source s, head h)."""
    T_, D = x.shape
    ln, q, k, v, o, H, scale, g1 = _parts(layer, name)
    g1 = g1 if g1 is not None else torch.ones(D, dtype=F64)
    dh = q.out_features // H

    def lin0(u):  # LN₁ without its shift, σ frozen at u
        return ln.weight * (u - u.mean()) / torch.sqrt(u.var(correction=0) + ln.eps)

    u0 = [lin0(x[s]) for s in range(T_)]
    u = [u0[s] + ln.bias for s in range(T_)]
    heads = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    A = torch.zeros(H, T_, T_, dtype=F64)
    for h, sl in enumerate(heads):
        for t in range(T_):
            logit = torch.stack([(q(u[t])[sl]) @ (k(u[s])[sl]) for s in range(T_)])
            A[h, t] = torch.softmax(logit * scale, 0)
    b_attn = g1 * (o.weight @ v(ln.bias) + o.bias)
    M = torch.zeros(T_, T_, dtype=F64)
    for t in range(T_):
        paths = [[A[h, t, s] * g1 * (o.weight[:, sl] @ (v.weight[sl] @ u0[s])) for h, sl in enumerate(heads)]
                 for s in range(T_)]
        norms = [[float(p.norm()) for p in ps] for ps in paths]
        total = sum(map(sum, norms))
        c = [sum(paths[s]) + b_attn * sum(norms[s]) / total for s in range(T_)]
        y = x[t] + sum(c)
        for s in range(T_):
            M[t, s] = c[s] @ y / (y @ y)
        M[t, t] += x[t] @ y / (y @ y)
    return M


@pytest.mark.parametrize("name", ["vit_cls", "clip_proj", "dinov2_cls", "siglip"])
def test_attention_layout_and_activation_boundary_match_the_reference_and_broken_conversions_fail(name):
    m = build(name).double()
    a = make_adapter(m)
    layers = [a.model.get_submodule(n) for n in a.block_names()]
    x = _x(name).double()
    spec = hf_spec(a.model, (x.shape[-2] // a.patch_size, x.shape[-1] // a.patch_size))
    with torch.no_grad():
        srd = ViTSRD(spec, x, keep=True)
        for li, (_, rec) in enumerate(srd.records):
            _close(rec.out, layers[li](rec.x, None), 1e-12)  # quick_gelu / tanh-GELU / GELU and layer scale γ₂
            for b in range(2):
                _close(srd.M[li][b], ref_block_mu(layers[li], name, rec.x[b]), 1e-10)
        ref0 = ref_block_mu(layers[0], name, srd.records[0][1].x[0])
        # broken conversion 1: q and k swapped in the fused (3A, D) weight (attention transposed)
        blk = spec.blocks[0]
        A3 = blk.wqkv.shape[0] // 3
        perm = torch.cat([torch.arange(A3, 2 * A3), torch.arange(A3), torch.arange(2 * A3, 3 * A3)])
        swapped = dataclasses.replace(blk, wqkv=blk.wqkv[perm], bqkv=blk.bqkv[perm])
        bad = ViTSRD(dataclasses.replace(spec, blocks=[swapped, *spec.blocks[1:]]), x, keep=True)
        assert float((bad.M[0][0] - ref0).abs().max()) > 1e-6
        # broken conversion 2: the activation read as exact-erf GELU (quick_gelu / tanh-GELU boundary lost)
        if name in ("clip_proj", "siglip"):
            gelu = dataclasses.replace(blk, act=nn.GELU())
            bad = ViTSRD(dataclasses.replace(spec, blocks=[gelu, *spec.blocks[1:]]), x, keep=True)
            assert float((bad.records[0][1].out - layers[0](bad.records[0][1].x, None)).abs().max()) > 1e-6


def test_eager_attention_model_is_explained_in_float64_without_touching_it():
    m = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, attn_implementation="eager"))
    _randomise(m, 3)
    a = make_adapter(m)
    x = _x("clip")
    d = torch.randn(16, generator=torch.Generator().manual_seed(1))
    maps, sink = srd_saliency(a, x, d, return_sink=True, dtype=F64)
    with torch.no_grad():
        val = (a(x.double().float()).double() @ d.double())
    assert maps.dtype == F64
    _close(maps.sum((-2, -1)) + sink, val, 1e-4)  # the float32 model vs the float64 explanation
    assert m.config._attn_implementation == "eager"


def ref_cls_mean_relevance(m: nn.Module, z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(T,) share of ⟨logits, d⟩ of each final-stream token of an HF DINOv2 classifier (logits = W·[LN(z_0),
    mean_{patches} LN(z_t)] + b), σ frozen, bias shared by ‖F_t‖; by a loop over tokens, from the HF modules."""
    base = m.dinov2_with_registers if hasattr(m, "dinov2_with_registers") else m.dinov2
    ln, W, b = base.layernorm, m.classifier.weight, m.classifier.bias
    T_, D = z.shape
    E = 1 + getattr(m.config, "num_register_tokens", 0)
    Fs = []
    for t in range(T_):
        lin = ln.weight * (z[t] - z[t].mean()) / torch.sqrt(z[t].var(correction=0) + ln.eps)
        Fs.append(W[:, :D] @ lin if t == 0 else (W[:, D:] @ lin / (T_ - E) if t >= E else torch.zeros_like(b)))
    bias = W[:, :D] @ ln.bias + W[:, D:] @ ln.bias + b
    norms = torch.stack([f.norm() for f in Fs])
    return torch.stack([Fs[t] @ d + norms[t] / norms.sum() * (bias @ d) for t in range(T_)])


@pytest.mark.parametrize("name", ["dinov2_cls", "dinov2_reg_cls"])
def test_cls_mean_readout_matches_the_reference_and_a_broken_head_fails(name):
    from sae_cafe.srd import vit_share

    m = build(name).double()
    a = make_adapter(m)
    x = _x(name).double()
    spec = hf_spec(a.model)
    d = torch.randn(2, a.num_classes, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        srd = ViTSRD(spec, x)
        R, node = vit_share.class_relevance(spec, srd.trace, d, srd.last)
        assert node == len(spec.blocks)
        _close(R.sum(1), (a(x) * d).sum(1), 1e-12)
        refs = [ref_cls_mean_relevance(m, srd.trace.last[i], d[i]) for i in range(2)]
        for i in range(2):
            _close(R[i], refs[i], 1e-10)
        W, b = spec.head[0][1], spec.head[0][2]
        D = W.shape[1] // 2
        swapped = [("lin", torch.cat([W[:, D:], W[:, :D]], 1), b)]  # the two halves of [cls, mean] confused
        bad_spec = dataclasses.replace(spec, head=swapped)
        bad = vit_share.class_relevance(bad_spec, run(bad_spec, x), d, None)[0]
    assert float((bad[0] - refs[0]).abs().max()) > 1e-6
