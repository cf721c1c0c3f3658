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


# ----- token kinds and activation normalisation ---------------------------------------------------------------
def _vit_reg():
    from timm.models.vision_transformer import VisionTransformer

    from sae_cafe.models import make_adapter

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                          reg_tokens=1)
    return make_adapter(m.double().eval(), "tiny_vit_reg", resize=None)


def test_splice_reconstructs_the_token_kinds_the_sae_was_trained_on(x):
    """tokens='patch' (also: not recorded) reconstructs patch tokens, 'all' every token, 'cls' only the class
    token (not the register token); the other tokens pass through bit-exactly. Float64 against sae-lens's
    own encode/decode."""
    from sae_cafe.interventions import Intervention
    from sae_cafe.saes import encode_images, intervene_layer, reconstruct_layer, sae_tokens, token_rows

    vit = _vit_reg()
    xd = x.double()
    with torch.no_grad():
        act = vit.capture(xd, ["blocks.0"])["blocks.0"]  # (3, 2 + 16, 32): cls, register, patches
        sae = random_sae(32, "blocks.0", vit.name).double()
        ref = sae.decode(sae.encode(act))
        for tokens, redone in ((None, slice(2, None)), ("patch", slice(2, None)), ("all", slice(0, None)),
                               ("cls", slice(0, 1))):
            if tokens is not None:
                sae.cfg.metadata.sae_cafe = {"tokens": tokens}
            assert sae_tokens(sae) == (tokens or "patch")
            out = reconstruct_layer(sae, vit, act)
            want = act.clone()
            want[:, redone] = ref[:, redone]
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
            kept = torch.ones(act.shape[1], dtype=torch.bool)
            kept[redone] = False
            assert torch.equal(out[:, kept], act[:, kept])
            with_error = reconstruct_layer(sae, vit, act, keep_error=True)
            torch.testing.assert_close(with_error, act, rtol=1e-12, atol=1e-12)
            # the rows an evaluation encodes are the same tokens
            assert torch.equal(token_rows(sae, vit, vit.to_pfv(act)), act[:, redone].reshape(-1, 32))
        # an SAE that saw only class tokens has no patch latents to mine or edit
        with pytest.raises(MismatchError, match="class tokens only"):
            encode_images(sae, vit, "blocks.0", xd)
        with pytest.raises(MismatchError, match="class tokens only"):
            intervene_layer(sae, vit, act, [Intervention(layer="blocks.0", latent=0, op="zero")])
        sae.cfg.metadata.sae_cafe = {"tokens": "all"}
        pfv, lat, grid = encode_images(sae, vit, "blocks.0", xd)
        assert pfv.shape == (3, 16, 32) and grid == (4, 4)
        sae.cfg.metadata.sae_cafe = {"tokens": "pixels"}
        with pytest.raises(MismatchError, match="sae_cafe.tokens='pixels'"):
            sae_tokens(sae)


def _normalised_export(tmp_path, factor: float | None):
    """A float64 standard SAE saved as trained on normalised activations, the factor not folded in."""
    torch.manual_seed(3)
    cfg = StandardSAEConfig(d_in=16, d_sae=40, dtype="float64", normalize_activations="expected_average_only_in",
                            metadata=SAEMetadata(hook_name="layer1", model_name="m"))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.save_model(str(tmp_path))
    if factor is not None:
        import json

        c = json.loads((tmp_path / "cfg.json").read_text())
        c["norm_scaling_factor"] = factor
        (tmp_path / "cfg.json").write_text(json.dumps(c))
    return sae.eval()


def test_load_sae_folds_a_recorded_norm_factor_exactly(tmp_path):
    """An export still carrying normalize_activations='expected_average_only_in' and its factor s: load_sae
    folds s into the weights, so encode_pfv/decode in model units equal the SAE on x·s with the output ÷ s
    (float64, 1e-12); without the factor the load is refused."""
    from sae_cafe.saes import decode, encode_pfv

    s = 0.37
    trained = _normalised_export(tmp_path / "a", s)
    sae = load_sae(tmp_path / "a")
    assert sae.cfg.normalize_activations == "none" and sae.W_enc.dtype == torch.float64
    xx = torch.randn(50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        z_ref = trained.encode(xx * s)
        rec_ref = trained.decode(z_ref) / s
        z = encode_pfv(sae, xx)
        rec = decode(sae, z)
    assert (z_ref != 0).any() and (z_ref == 0).any()
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rec, rec_ref, rtol=1e-12, atol=1e-12)
    _normalised_export(tmp_path / "b", None)
    with pytest.raises(MismatchError, match="holds no norm_scaling_factor"):
        load_sae(tmp_path / "b")


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_per_input_normalised_sae_decodes_any_number_of_times(tmp_path, x, norm):
    """A ViT-Prisma SAE with a per-input normalisation, converted by sae_cafe.sae_import: decode un-normalises
    with the statistics of the PFVs the latents came from, as often as asked (float64 against the formula);
    interventions (two decodes) and ICAT (many) run; decoding without those PFVs is a clear error."""
    import copy
    import json

    from sae_cafe.icat import attribute
    from sae_cafe.interventions import Intervention
    from sae_cafe.sae_import import convert_sae
    from sae_cafe.saes import decode, encode_pfv, intervene_layer, reconstruct_layer

    vit = tiny_vit()
    g = torch.Generator().manual_seed(0)
    saes = {}
    for layer, d_sae in (("blocks.0", 24), ("blocks.1", 20)):
        st = {"W_enc": torch.randn(32, d_sae, generator=g) * 32 ** -0.5,
              "W_dec": torch.randn(d_sae, 32, generator=g) * d_sae ** -0.5,
              "b_dec": torch.randn(32, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.3 + 0.3}
        src = tmp_path / f"prisma_{layer}"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({
            "model_class_name": "HookedViT", "model_name": "open-clip:laion/CLIP-ViT-B-32",
            "hook_point_layer": int(layer[-1]), "layer_subtype": "hook_resid_post", "d_in": 32,
            "activation_fn_str": "relu", "activation_fn_kwargs": {}, "cls_token_only": False,
            "use_patches_only": True, "normalize_activations": norm, "architecture": "standard"}))
        torch.save(st, src / "n_images_1000.pt")
        out = convert_sae(src, "vit-prisma", vit, out=tmp_path / "saes" / layer)
        saes[layer] = load_sae(out, vit, layer)
    sae = copy.deepcopy(saes["blocks.0"]).to(torch.float64)  # .to also moves sae-lens's input dtype
    # the formula on the converted weights (the conversion itself is checked in test_sae_import)
    sd = {k: getattr(sae, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sd["b_dec_in"] = sd["b_dec"] * sae.cfg.apply_b_dec_to_input
    v = torch.randn(4, 16, 32, generator=g, dtype=torch.float64) * 3 + 1
    if norm == "layer_norm":
        vn = (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-5)
    else:
        vn = v * 32 ** 0.5 / v.norm(dim=-1, keepdim=True)
    z_ref = ((vn - sd["b_dec_in"]) @ sd["W_enc"] + sd["b_enc"]).relu()
    rec_n = z_ref @ sd["W_dec"] + sd["b_dec"]
    rec_ref = rec_n * v.std(-1, keepdim=True) + v.mean(-1, keepdim=True) if norm == "layer_norm" else \
        rec_n * v.norm(dim=-1, keepdim=True) / 32 ** 0.5
    with torch.no_grad():
        z = encode_pfv(sae, v)
        torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
        for _ in range(3):  # sae-lens alone fails on the second decode
            torch.testing.assert_close(decode(sae, z, v), rec_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(decode(sae, z[:2], v[:2]), rec_ref[:2], rtol=1e-10, atol=1e-10)
        with pytest.raises(MismatchError, match="pass x= to decode"):
            decode(sae, z)
        with pytest.raises(MismatchError, match="16 PFV rows"):
            decode(sae, z[:1, :3], v[:1])
        act = vit.capture(x, ["blocks.0"])["blocks.0"].double()
        same = intervene_layer(sae, vit, act, [Intervention(layer="blocks.0", latent=0, op="scale", value=1.0)])
        torch.testing.assert_close(same, act, rtol=1e-12, atol=1e-12)
        rec = reconstruct_layer(sae, vit, act)
        assert not torch.allclose(rec, act)
    a = attribute(vit, saes, x[:2], "blocks.0", "blocks.1", steps=4)
    assert a.shape == (2, 24, 20) and torch.isfinite(a).all() and a.abs().sum() > 0
