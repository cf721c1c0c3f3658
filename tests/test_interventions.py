"""Interventions on SAE latents (``run_with_saes(..., interventions=...)``): known answers in float64 against the
decoder direction written out by hand, no-op edits reproducing the model bit for bit, boxes / masks / tokens,
downstream activations, and clear errors."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from tiny_models import tiny_resnet, tiny_vit

from sae_cafe.errors import SaeCafeError, UnknownLayerError
from sae_cafe.interventions import Box, Intervention, InterventionError, Tokens
from sae_cafe.saes import encode_layer, run_with_saes


def sae64(d: int, hook: str, model: str, d_sae: int = 48, seed: int = 1) -> StandardSAE:
    """A float64 Standard SAE with random weights and a positive encoder bias (many latents fire)."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, model_name=model)))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        sae.b_enc.abs_()
    return sae.double().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.fixture(scope="module")
def cnn():
    ad = tiny_resnet()
    ad.model.double()
    return ad, "layer2", sae64(128, "layer2", ad.name)


def _layer_out(ad, layer, sae, x, ivs):
    """The intervened layer's output and the clean one (via return_activations)."""
    with torch.no_grad():
        clean = ad.capture(x, [layer])[layer]
        _, acts = run_with_saes(ad, x, {layer: sae}, interventions=ivs, return_activations=[layer])
    return acts[layer], clean


def _contribution(ad, sae, act, k):
    """Independent reference: a_k(h, w) · W_dec[k] as a (B, C, h, w) map (codes from encode_layer)."""
    a = encode_layer(sae, ad, act)[..., k]  # (B, h, w)
    return a[:, None] * sae.W_dec[k][None, :, None, None]


def test_noop_interventions_reproduce_the_model_exactly(cnn, x):
    ad, layer, sae = cnn
    with torch.no_grad():
        clean = ad.model(x)
        out = run_with_saes(ad, x, {layer: sae}, interventions=[Intervention(layer, 3, "scale", 1.0),
                                                                Intervention(layer, 5, "add", 0.0, Box(0, 0, 2, 2))])
        spliced = run_with_saes(ad, x, {layer: sae})
        noop_spliced = run_with_saes(ad, x, {layer: sae}, keep_error=False,
                                     interventions=[Intervention(layer, 3, "scale", 1.0)])
    assert torch.equal(out, clean)  # bit for bit: the error term is kept
    assert torch.equal(noop_spliced, spliced)  # without the error term: equals the plain splice
    assert (spliced - clean).abs().max() > 1e-3  # the splice itself is not a no-op


def test_zero_scale_clamp_add_known_answers(cnn, x):
    ad, layer, sae = cnn
    with torch.no_grad():
        clean = ad.capture(x, [layer])[layer]
        a = encode_layer(sae, ad, clean)
    k = int(a.gt(0).flatten(0, 2).sum(0).argmax())  # a latent that fires on many positions
    box = Box(1, 0, 3, 2)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 0:2] = True
    contrib = _contribution(ad, sae, clean, k)
    assert contrib[:, :, inside].abs().max() > 1e-3, "the chosen latent must fire inside the box"
    d = sae.W_dec[k][None, :, None, None]
    expected = {"zero": clean - contrib, "scale": clean + contrib,  # scale 2 = its contribution once more
                "clamp": clean + (1.5 - a[..., k])[:, None] * d, "add": clean + 0.7 * d}
    for op, val in (("zero", 0.0), ("scale", 2.0), ("clamp", 1.5), ("add", 0.7)):
        got, _ = _layer_out(ad, layer, sae, x, [Intervention(layer, k, op, val, box)])
        want = torch.where(inside, expected[op], clean)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert torch.equal(got[:, :, ~inside], clean[:, :, ~inside]), f"{op}: positions outside the box changed"


def test_mask_tokens_and_several_at_once(cnn, x):
    ad, layer, sae = cnn
    with torch.no_grad():
        clean = ad.capture(x, [layer])[layer]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 3] = mask[2, 1] = mask[3, 3] = True
    via_mask, _ = _layer_out(ad, layer, sae, x, [Intervention(layer, 7, "zero", where=mask)])
    via_tokens, _ = _layer_out(ad, layer, sae, x, [Intervention(layer, 7, "zero", where=Tokens((3, 9, 15)))])
    assert torch.equal(via_mask, via_tokens)
    torch.testing.assert_close(via_mask, clean - _contribution(ad, sae, clean, 7) * mask, rtol=1e-10, atol=1e-10)
    both, _ = _layer_out(ad, layer, sae, x, [Intervention(layer, 7, "zero"), Intervention(layer, 11, "scale", 3.0)])
    want = clean - _contribution(ad, sae, clean, 7) + 2 * _contribution(ad, sae, clean, 11)
    torch.testing.assert_close(both, want, rtol=1e-10, atol=1e-10)


def test_downstream_activations_and_logits_follow_the_edit(cnn, x):
    ad, layer, sae = cnn
    iv = [Intervention(layer, 2, "scale", -1.0, Box(0, 0, 4, 2))]
    with torch.no_grad():
        logits, acts = run_with_saes(ad, x, {layer: sae}, interventions=iv, return_activations=[layer, "layer3"])
        ref3 = ad.forward_from(layer, acts[layer], x, until="layer3")
        ref_logits = ad.forward_from(layer, acts[layer], x)
    torch.testing.assert_close(acts["layer3"], ref3, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    assert set(acts) == {layer, "layer3"}


def test_vit_tokens_edit_patches_only():
    vit = tiny_vit()
    vit.model.double()
    layer = vit.resolve_layer("blocks.0")
    sae = sae64(32, layer, vit.name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        clean = vit.capture(x, [layer])[layer]  # (B, 1 + 16, 32)
        assert torch.equal(run_with_saes(vit, x, {layer: sae}, interventions=[Intervention(layer, 1, "add", 0.0)]),
                           vit.model(x))
        _, acts = run_with_saes(vit, x, {layer: sae}, interventions=[Intervention(layer, 4, "zero",
                                                                                  where=Tokens((0, 5)))],
                                return_activations=[layer])
    got = acts[layer]
    a = encode_layer(sae, vit, clean)[..., 4].reshape(2, 16)
    want = clean.clone()
    for t in (0, 5):
        want[:, 1 + t] -= a[:, t, None] * sae.W_dec[4]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[:, 0], clean[:, 0])  # the class token is never edited


def test_contract_without_interventions_unchanged(cnn, x):
    ad, layer, sae = cnn
    with torch.no_grad():
        a = run_with_saes(ad, x, {layer: sae})
        b = run_with_saes(ad, x, {layer: sae}, interventions=[])
        c, acts = run_with_saes(ad, x, {layer: sae}, return_activations=["layer4"])
    assert isinstance(a, torch.Tensor) and torch.equal(a, b) and torch.equal(a, c) and "layer4" in acts


def test_bad_interventions_give_clear_errors(cnn, x):
    ad, layer, sae = cnn
    saes = {layer: sae}
    cases = [
        (Intervention("layer9", 0), UnknownLayerError, "unknown layer 'layer9'"),
        (Intervention(layer, 48), InterventionError, r"latent 48 out of range .*d_sae=48"),
        (Intervention(layer, -1), InterventionError, "out of range"),
        (Intervention(layer, 0, where=Box(0, 0, 5, 2)), InterventionError, r"outside the 4×4 grid"),
        (Intervention(layer, 0, where=(2, 2, 2, 3)), InterventionError, "empty or outside"),
        (Intervention(layer, 0, where=torch.ones(3, 4, dtype=torch.bool)), InterventionError,
         r"shape \(3, 4\) does not fit the 4×4 grid"),
        (Intervention(layer, 0, where=Tokens((16,))), InterventionError, "outside the 16 grid positions"),
        (Intervention("layer3", 0), InterventionError, "no SAE for it"),
    ]
    for iv, err, msg in cases:
        with pytest.raises(err, match=msg):
            run_with_saes(ad, x, saes, interventions=[iv])
    with pytest.raises(InterventionError, match="unknown intervention op 'mute'"):
        Intervention(layer, 0, "mute")
    with pytest.raises(InterventionError, match="boolean"):
        Intervention(layer, 0, where=torch.zeros(4, 4))
    with pytest.raises(InterventionError, match="finite"):
        Intervention(layer, 0, "scale", float("nan"))
    with pytest.raises(InterventionError, match="integer"):
        Intervention(layer, 1.5)
    with pytest.raises(InterventionError, match="number"):
        Intervention(layer, 0, "add", "much")
    for where in ("box", {"r0": 1}):
        with pytest.raises(InterventionError, match="where="):
            Intervention(layer, 0, where=where)
    assert issubclass(InterventionError, SaeCafeError)
    with pytest.raises(InterventionError, match="Intervention objects"):
        run_with_saes(ad, x, saes, interventions=[(layer, 0, "zero")])
