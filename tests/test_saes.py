"""SAE loading checks, layer encode/decode and splicing (run_with_saes) on CNN and ViT layers."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from tiny_models import tiny_resnet, tiny_vit

from sae_cafe.errors import MismatchError
from sae_cafe.saes import decode_layer, encode_layer, load_sae, run_with_saes, spliced


def identity_sae(d: int, hook: str | None, model: str | None, signed: bool = True) -> SAE:
    """ReLU SAE that reconstructs exactly: latents [x, -x]⁺ (signed) or x⁺ (non-negative inputs)."""
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye], 1) if signed else eye
    cfg = StandardSAEConfig(d_in=d, d_sae=W_enc.shape[1], apply_b_dec_to_input=False,
                            metadata=SAEMetadata(hook_name=hook, model_name=model))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def random_sae(d: int, hook: str, model: str, d_sae: int = 64) -> SAE:
    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook,
                                                                                  model_name=model)))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_identity_splice_changes_nothing_cnn_and_vit(x):
    for adapter, layer, signed in ((tiny_resnet(), "layer2.1", False), (tiny_resnet(), "layer1", True),
                                   (tiny_vit(), "blocks.0", True)):
        d = adapter.layer(layer).channels
        sae = identity_sae(d, layer, adapter.name, signed=signed)
        with torch.no_grad():
            clean = adapter.model(x)
            out = run_with_saes(adapter, x, {layer: sae})
        torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-5)


def test_splice_really_replaces_and_keep_error_restores(x):
    for adapter, layer in ((tiny_resnet(), "layer2"), (tiny_vit(), "0")):
        name = adapter.resolve_layer(layer)
        sae = random_sae(adapter.layer(layer).channels, name, adapter.name)
        with torch.no_grad():
            clean = adapter.model(x)
            act = adapter.capture(x, [name])[name]
            spliced_out = run_with_saes(adapter, x, {layer: sae})
            manual = adapter.forward_from(name, decode_layer(sae, adapter, *encode_layer(
                sae, adapter, act, return_extra=True)[:1], extra=adapter.to_pfv(act).extra), x)
            kept = run_with_saes(adapter, x, {layer: sae}, keep_error=True)
        assert (spliced_out - clean).abs().max() > 1e-3
        torch.testing.assert_close(spliced_out, manual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept, clean, rtol=1e-5, atol=1e-5)
        # ViT class token passes through unchanged
        if adapter.kind == "tokens":
            got = {}
            with spliced(adapter, {layer: sae}), adapter.hooks({name: lambda _m, _i, o, got=got: got.update(o=o)}):
                adapter.model(x)
            torch.testing.assert_close(got["o"][:, 0], act[:, 0])
    # gradients flow through the SAE with keep_error
    adapter = tiny_resnet()
    sae = random_sae(128, "layer2", "resnet18")
    run_with_saes(adapter, x, {"layer2": sae}, keep_error=True).sum().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_encode_layer_shapes(x):
    adapter = tiny_resnet()
    sae = identity_sae(128, "layer2", "resnet18")
    with torch.no_grad():
        act = adapter.capture(x, ["layer2"])["layer2"]
        maps = encode_layer(sae, adapter, act)
        assert maps.shape == (3, 4, 4, 256)
        torch.testing.assert_close(maps[1, 2, 3, :128], act[1, :, 2, 3].relu())
        torch.testing.assert_close(decode_layer(sae, adapter, maps), act)
    vit = tiny_vit()
    with torch.no_grad():
        tok = vit.capture(x, ["blocks.1"])["blocks.1"]
        maps, extra = encode_layer(identity_sae(32, "blocks.1", "tiny_vit"), vit, tok, return_extra=True)
    assert maps.shape == (3, 4, 4, 64) and extra.shape == (3, 1, 64)


def test_load_sae_checks_dims_layer_and_model(tmp_path):
    adapter = tiny_resnet()
    d = tmp_path / "sae"
    identity_sae(128, "layer2", "resnet18").save_model(d)
    sae = load_sae(d, adapter)  # layer from metadata.hook_name
    assert isinstance(sae, SAE) and sae.cfg.d_in == 128
    load_sae(d, adapter, layer="layer2")
    with pytest.raises(MismatchError, match=r"trained on layer 'layer2'.*used at layer 'layer3'"):
        load_sae(d, adapter, layer="layer3")
    other = tmp_path / "sae_other_model"
    identity_sae(128, "layer2", "vgg11").save_model(other)
    with pytest.raises(MismatchError, match=r"model 'vgg11'.*'resnet18'"):
        load_sae(other, adapter)
    load_sae(other, adapter, check_model=False)
    wrong_d = tmp_path / "sae_wrong_d"
    identity_sae(64, None, None).save_model(wrong_d)
    with pytest.raises(MismatchError, match=r"d_in=64 but layer 'layer2'.* 128 channels"):
        load_sae(wrong_d, adapter, layer="layer2")
    with pytest.raises(MismatchError, match="no metadata.hook_name"):
        load_sae(wrong_d, adapter)
    vit = tiny_vit()
    vd = tmp_path / "vit_sae"
    identity_sae(32, "blocks.1", "tiny_vit").save_model(vd)
    assert load_sae(vd, vit, layer=1).cfg.d_in == 32  # block index alias
    with pytest.raises(MismatchError):
        run_with_saes(vit, torch.zeros(1, 3, 32, 32), {"blocks.0": load_sae(vd)})


def test_one_encode_function(x):
    """encode_images (images → PFVs, latents), encode_layer (layer output → maps) and the ICAT pre/post read go
    through the same encoder call; float64 SAEs get float64 inputs."""
    from sae_cafe.icat.attribute import sae_encode_with_pre
    from sae_cafe.saes import encode_images, encode_pfv

    adapter = tiny_resnet()
    sae = random_sae(128, "layer2", "resnet18")
    pfv, lat, grid = encode_images(sae, adapter, "layer2", x)
    with torch.no_grad():
        act = adapter.capture(x, ["layer2"])["layer2"]
        maps = encode_layer(sae, adapter, act)
        assert grid == (4, 4) and pfv.shape == (3, 16, 128) and lat.shape == (3, 16, 64)
        torch.testing.assert_close(lat, maps.reshape(3, 16, 64))
        post, pre = sae_encode_with_pre(sae, pfv)
        torch.testing.assert_close(post, lat)
        ref_pre = pfv @ sae.W_enc + sae.b_enc - (sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else 0)
        torch.testing.assert_close(pre, ref_pre, rtol=1e-5, atol=1e-5)
        sae64 = random_sae(128, "layer2", "resnet18").double()
        out = encode_pfv(sae64, pfv[0])
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, (pfv[0].double() @ sae64.W_enc + sae64.b_enc
                                         - (sae64.b_dec @ sae64.W_enc if sae64.cfg.apply_b_dec_to_input else 0)
                                         ).relu())


def test_pre_activation_never_falls_back_to_post(x):
    """An SAE whose encoder does not run hook_sae_acts_pre cannot give pre-activations: a clear error, not the
    post-activation in its place."""
    from sae_cafe.icat.attribute import sae_encode_with_pre

    class NoPreHook(StandardSAE):
        def encode(self, x):
            return (x @ self.W_enc + self.b_enc).relu()

    sae = NoPreHook(StandardSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(MismatchError, match=r"NoPreHook.*hook_sae_acts_pre.*pre-activation cannot be read"):
        sae_encode_with_pre(sae, torch.randn(4, 8))
    from sae_cafe.icat import attribute

    adapter = tiny_resnet()
    src, tgt = NoPreHook(StandardSAEConfig(d_in=128, d_sae=32)), NoPreHook(StandardSAEConfig(d_in=256, d_sae=16))
    good_src, good_tgt = random_sae(128, "layer2", "resnet18"), random_sae(256, "layer3", "resnet18")
    # the source SAE needs only its activation; a target read at n* needs the pre-activation
    assert attribute(adapter, {"layer2": src, "layer3": good_tgt}, x[:1], "layer2", "layer3", method="grad"
                     ).shape == (1, 32, 64)
    with pytest.raises(MismatchError, match="pre-activation cannot be read"):
        attribute(adapter, {"layer2": good_src, "layer3": tgt}, x[:1], "layer2", "layer3", method="grad")
    assert attribute(adapter, {"layer2": good_src, "layer3": tgt}, x[:1], "layer2", "layer3", method="grad",
                     target_fn="post", aggregate="sum").shape == (1, 64, 16)


def test_sae_width_mismatch_is_one_clear_error_everywhere(tmp_path, x):
    """CAFE, ICAT and the SAE evaluation use the one check: a wrong-width SAE names both widths."""
    from sae_cafe.activations.extract import extract_activations
    from sae_cafe.cafe import build_cafe
    from sae_cafe.icat import attribute
    from sae_training.evaluate import evaluate_sae

    adapter = tiny_resnet()
    wrong = identity_sae(64, None, None)
    both = r"d_in=64 but .*layer 'layer2'.* 128 channels"
    with pytest.raises(MismatchError, match=both):
        build_cafe(adapter, wrong, "layer2", x, out_dir=tmp_path / "cafe", progress=False)
    good = random_sae(256, "layer3", "resnet18")
    with pytest.raises(MismatchError, match=both):
        attribute(adapter, {"layer2": wrong, "layer3": good}, x[:1], "layer2", "layer3", method="grad")
    acts = extract_activations(adapter, x, "layer2", root=tmp_path, progress=False)["layer2"]
    sae_dir = tmp_path / "sae64"
    identity_sae(64, "layer2", "resnet18").save_model(sae_dir)
    with pytest.raises(MismatchError, match=rf"d_in=64 but the PFVs at {acts}.* 128 channels"):
        evaluate_sae(sae_dir, acts=acts)
    other = tmp_path / "sae_l3"
    identity_sae(128, "layer3", "resnet18").save_model(other)
    with pytest.raises(MismatchError, match=r"trained on layer 'layer3'.*used at layer 'layer2'"):
        evaluate_sae(other, acts=acts)
