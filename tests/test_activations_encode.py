"""The one images → PFV rows path (``sae_cafe.activations.rows``) against an explicit slow loop in float64: a
forward hook on the layer's module, then the rows read one token at a time in the documented order (prefix
tokens, then grid positions row-major). CNN (mini ResNet), torchvision ViT (mini ViT: class token) and a timm
ViT with register tokens; ``tokens`` patch / all / cls. The shard path's ``layer_rows`` (also the stream's),
``saes.encode_images`` / ``token_rows`` and the concept probe give those rows and their SAE codes. Random
weights, seconds."""

from __future__ import annotations

import pytest
import torch
from tiny_models import mini_resnet_32, random_sae

from sae_cafe.activations import capture_pfv, layer_pfv, pfv_rows, token_pfv
from sae_cafe.activations.extract import ExtractConfig, layer_rows
from sae_cafe.activations.shards import TOKEN_KINDS
from sae_cafe.concepts.evidence import LatentProbe
from sae_cafe.errors import MismatchError, SaeCafeError
from sae_cafe.models import make_adapter
from sae_cafe.saes import encode_images, encode_pfv, token_rows


def mini_vit():
    from sae_cafe.models.mini import make_mini_vit

    torch.manual_seed(0)
    return make_adapter(make_mini_vit().eval(), "mini_vit", input_size=(64, 64), resize=None)


def reg_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, reg_tokens=2)
    return make_adapter(m.eval(), "reg_vit", resize=None)


#: adapter factory, layer, input side, the prefix tokens' kinds in token order (what the model is built with)
MODELS = {"mini_resnet": (mini_resnet_32, "layer2", 32, []),
          "mini_vit": (mini_vit, "encoder.layers.encoder_layer_2", 64, ["cls"]),
          "reg_vit": (reg_vit, "blocks.1", 32, ["cls", "register", "register"])}
CASES = [(m, t) for m in MODELS for t in ("patch", "all", "cls")]


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, (make, layer, px, prefix) in MODELS.items():
        ad = make()
        ad.model.double()
        x = torch.randn(3, 3, px, px, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        out[name] = (ad, layer, x, prefix)
    return out


def slow_rows(ad, layer: str, x: torch.Tensor, prefix: list[str], tokens: str):
    """The layer output by a plain forward hook, read token by token: rows (B, T, D) and, per row, its position
    (row, col) — (-1, token index) for a prefix token — and kind."""
    got = {}
    handle = ad.model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: got.__setitem__("out", o))
    try:
        with torch.no_grad():
            ad.model(x)
    finally:
        handle.remove()
    out = got["out"]
    if out.ndim == 4:  # CNN (B, C, h, w)
        h, w = out.shape[2:]
        patch = [[out[b, :, r, c] for r in range(h) for c in range(w)] for b in range(out.shape[0])]
    else:  # tokens (B, T, D): prefix tokens, then the patches row-major
        side = int(round((out.shape[1] - len(prefix)) ** 0.5))
        h = w = side
        patch = [[out[b, len(prefix) + r * w + c] for r in range(h) for c in range(w)] for b in range(out.shape[0])]
    keep = [j for j, k in enumerate(prefix) if tokens == "all" or (tokens == "cls" and k == "cls")]
    rows, pos, kind = [], [], []
    for b in range(out.shape[0]):
        r_b = [out[b, j] for j in keep]
        pos_b = [(-1, j) for j in keep]
        kind_b = [prefix[j] for j in keep]
        if tokens != "cls":
            r_b += patch[b]
            pos_b += [(r, c) for r in range(h) for c in range(w)]
            kind_b += ["patch"] * (h * w)
        rows.append(torch.stack(r_b))
        pos.append(pos_b)
        kind.append(kind_b)
    return torch.stack(rows), pos, kind


@pytest.mark.parametrize(("model", "tokens"), CASES)
def test_rows_equal_the_slow_loop(models, model, tokens):
    ad, layer, x, prefix = models[model]
    if tokens == "cls" and not prefix:  # a CNN has no class token: a clear error, never patch rows instead
        with pytest.raises(SaeCafeError, match="no class token"):
            pfv_rows(ad, x, layer, tokens)
        return
    want, pos, kind = slow_rows(ad, layer, x, prefix, tokens)
    with torch.no_grad():
        got = pfv_rows(ad, x, layer, tokens)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    # one forward for several layers gives the same batches as one layer at a time
    other = list(ad.layers())[0]
    with torch.no_grad():
        both = capture_pfv(ad, x, [other, layer])
        assert torch.equal(token_pfv(ad, both[layer], tokens), want)
        assert torch.equal(both[other].pfv, layer_pfv(ad, x, other).pfv)
    # the shard path (and the stream, which reuses it): the same rows, with their positions and kinds
    rows, img, p, k, _flag = layer_rows(ad, both[layer], 5, ExtractConfig(tokens=tokens), None)
    B, T, D = want.shape
    assert torch.equal(rows, want.reshape(B * T, D))
    assert img.tolist() == [5 + b for b in range(B) for _ in range(T)]
    assert [tuple(q) for q in p.tolist()] == [q for pb in pos for q in pb]
    assert k.tolist() == [TOKEN_KINDS.index(s) for kb in kind for s in kb]
    # SAE codes of those rows: the one encoder call against sae-lens's own encode, row by row
    sae = random_sae(D, 24, 3).double()
    sae.cfg.metadata.sae_cafe = {"tokens": tokens}
    with torch.no_grad():
        slow_z = torch.stack([torch.stack([sae.encode(want[b, t][None])[0] for t in range(T)]) for b in range(B)])
        assert torch.equal(token_rows(sae, ad, both[layer]), want.reshape(B * T, D))
        torch.testing.assert_close(encode_pfv(sae, got), slow_z, rtol=1e-12, atol=1e-12)
        if tokens == "cls":  # CAFE mines grid positions: an SAE that never saw them is refused
            with pytest.raises(MismatchError, match="class tokens only"):
                encode_images(sae, ad, layer, x)
            return
        pfv, lat, grid = encode_images(sae, ad, layer, x)
    E = T - pfv.shape[1]  # prefix rows come first
    assert torch.equal(pfv, want[:, E:].float()) and grid == tuple(ad.layer(layer).grid)
    torch.testing.assert_close(lat, slow_z[:, E:].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", list(MODELS))
def test_sampled_rows_and_probe_read_the_same_pfvs(models, model):
    """positions_per_image keeps, per image, the grid positions it names (the slow rows there, prefix tokens
    first); the concept probe's PFVs, maps and exemplar activations are the same rows and codes."""
    ad, layer, x, prefix = models[model]
    tokens = "all"
    want, pos, _ = slow_rows(ad, layer, x, prefix, tokens)
    B, T, D = want.shape
    weights = torch.rand(B, T - len(prefix), generator=torch.Generator().manual_seed(2))
    for w in (None, weights):
        with torch.no_grad():
            rows, img, p, _k, _f = layer_rows(ad, capture_pfv(ad, x, layer)[layer], 0,
                                              ExtractConfig(tokens=tokens, positions_per_image=3, seed=1), w)
        assert rows.shape == (B * (len(prefix) + 3), D)
        for r, i, q in zip(rows, img.tolist(), p.tolist(), strict=True):
            assert torch.equal(r, want[i, pos[i].index(tuple(q))])
    sae = random_sae(D, 24, 3).double()
    probe = LatentProbe(ad, sae, layer, batch=2)
    E = len(prefix)
    with torch.no_grad():
        assert torch.equal(probe.pfv(x), want[:, E:])
    # with autograd (the probe's gradients): the same PFVs up to the last bits (nn.MultiheadAttention runs
    # another kernel without grad)
    torch.testing.assert_close(probe.pfv(x), want[:, E:], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        slow_z = torch.stack([torch.stack([sae.encode(want[b, t][None])[0] for t in range(E, T)]) for b in range(B)])
        torch.testing.assert_close(probe.maps(x), slow_z.float(), rtol=1e-6, atol=1e-6)
    lat_i, pos_i = torch.tensor([0, 5, 23]), torch.tensor([0, T - E - 1, 2])
    xg = x.clone().requires_grad_(True)
    a = probe(xg, lat_i, pos_i)  # the exemplar activations, with the graph kept
    torch.testing.assert_close(a.detach(), slow_z[torch.arange(B), pos_i, lat_i], rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(a.sum(), xg)
    assert g.shape == x.shape and bool(torch.isfinite(g).all())
