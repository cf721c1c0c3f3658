"""Import of SAEs trained elsewhere (sae_cafe.sae_import): small checkpoints written from scratch in the on-disk
layouts of SAELens (6.x and older flat configs), saev (JSON header line + torch state dict, schemas 1/2) and
ViT-Prisma (config.json + state-dict weights), converted for a tiny timm ViT. Each converted SAE's encoder is
checked in float64 against the outside library's formula (written out here, independent of sae-lens), each
runs through a 2-latent CAFE build, and the errors (wrong d_in, unknown hooks, pickled files) are clear."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import mini_resnet_32, tiny_vit

import sae_cafe.srd  # noqa: F401  (CAFE anchoring needs SRD)
from sae_cafe.artifacts import read_manifest
from sae_cafe.cafe import build_cafe
from sae_cafe.errors import MismatchError, SaeCafeError, UnknownLayerError
from sae_cafe.sae_import import ImportFormatError, convert_sae, load_foreign_sae, map_hook_name
from sae_cafe.saes import encode_pfv, load_sae

torch.set_num_threads(1)
D = 32  # tiny_vit width


@pytest.fixture(scope="module")
def ad():
    return tiny_vit()


def rand_state(d_in=D, d_sae=24, seed=0, gated=False, b_enc_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    st = {"W_enc": torch.randn(d_in, d_sae, generator=g) * d_in ** -0.5,
          "W_dec": torch.randn(d_sae, d_in, generator=g) * d_sae ** -0.5,
          "b_dec": torch.randn(d_in, generator=g) * 0.3}
    if gated:
        st.update(b_gate=torch.randn(d_sae, generator=g) * 0.3, r_mag=torch.randn(d_sae, generator=g) * 0.2,
                  b_mag=torch.randn(d_sae, generator=g) * 0.3)
    else:
        st["b_enc"] = torch.randn(d_sae, generator=g) * 0.3 + b_enc_shift
    return st


# ----- writers of the outside layouts ------------------------------------------------------------------
def write_saelens(d: Path, st, hook, *, old=True, arch="standard", norm="none", apply_b_dec=True, k=None):
    d.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = st["W_enc"].shape
    if old:  # flat pre-6 config (sae-lens ≤ 5 / vision forks)
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "model_name": "vit-b-16", "hook_name": hook, "hook_layer": 1, "hook_head_index": None,
               "activation_fn_str": "topk" if k else "relu", "activation_fn_kwargs": {"k": k} if k else {},
               "apply_b_dec_to_input": apply_b_dec, "finetuning_scaling_factor": False, "context_size": 17,
               "normalize_activations": norm, "prepend_bos": False, "dataset_path": "imagenet"}
    else:
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec, "normalize_activations": norm, "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.5.0", "hook_name": hook, "model_name": "vit-b-16"},
               **({"k": k} if k else {})}
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: v.contiguous() for n, v in st.items()}, str(d / "sae_weights.safetensors"))
    return d


def write_saev(path: Path, st, schema=2, act="Relu", k=4):
    params = {"top_k": k} if act != "Relu" else {}
    if schema == 2:
        header = {"schema": 2, "cfg": {"d_vit": st["W_enc"].shape[0], "exp_factor": 1, "seed": 0,
                                       "activation": {"cls": act, "params": params}}, "commit": "abc", "lib": "1.0"}
    else:  # schema 1, format 1A: the activation class name in "cls"
        header = {"schema": 1, "cfg": {"d_vit": st["W_enc"].shape[0], "exp_factor": 1, **params}, "cls": act,
                  "commit": "abc", "lib": "0.9"}
    buf = io.BytesIO()
    torch.save(st, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((json.dumps(header) + "\n").encode() + buf.getvalue())
    return path


def write_prisma(d: Path, st, **cfg_over):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_class_name": "HookedViT", "model_name": "open-clip:laion/CLIP-ViT-B-32", "hook_point_layer": 1,
           "layer_subtype": "hook_resid_post", "d_in": st["W_enc"].shape[0], "activation_fn_str": "relu",
           "activation_fn_kwargs": {}, "cls_token_only": False, "use_patches_only": False,
           "normalize_activations": "layer_norm", "architecture": "standard", "expansion_factor": 1,
           "dtype": {"__type__": "torch.dtype", "value": "torch.float32"},
           "device": {"__type__": "torch.device", "value": "cuda"}, **cfg_over}
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save(st, d / "n_images_1300000.pt")
    return d


# ----- the outside formulas, float64 (from the libraries' source, independent of sae-lens) ---------------
def topk_mask(h, k):
    return torch.zeros_like(h).scatter_(-1, h.topk(k, dim=-1).indices, 1.0)


def ref_saev(st, x, schema, act="Relu", k=4):
    s = {n: v.double() for n, v in st.items()}
    h = ((x - s["b_dec"]) if schema < 2 else x) @ s["W_enc"] + s["b_enc"]
    return h.relu() if act == "Relu" else topk_mask(h, k) * h  # saev TopK keeps the values unclamped


def ref_prisma(st, x, norm="none", act="relu", k=None, arch="standard"):
    s = {n: v.double() for n, v in st.items()}
    if norm == "constant_norm_rescale":
        x = x * (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True)
    elif norm == "layer_norm":
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.std(-1, keepdim=True) + 1e-5)
    sae_in = x - s["b_dec"]
    if arch == "gated":
        gate = (sae_in @ s["W_enc"] + s["b_gate"] > 0).double()
        return gate * (sae_in @ (s["W_enc"] * s["r_mag"].exp()) + s["b_mag"]).relu()
    h = sae_in @ s["W_enc"] + s["b_enc"]
    return h.relu() if act == "relu" else topk_mask(h, k) * h.relu()


def ref_saelens(st, x, scale=1.0, apply_b_dec=True, norm="none", k=None):
    s = {n: v.double() for n, v in st.items()}
    x = x * scale
    if norm == "layer_norm":
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.std(-1, keepdim=True) + 1e-5)
    h = (x - s["b_dec"] * apply_b_dec) @ s["W_enc"] + s["b_enc"]
    return h.relu() if k is None else topk_mask(h, k) * h.relu()


def x_in(n=200, d=D, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def ours(stage: Path, adapter, x):
    sae = load_sae(stage, adapter).double()
    return encode_pfv(sae, x)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * (1 + float(b.abs().max())))


# ----- SAELens ---------------------------------------------------------------------------------------------
def test_saelens_old_config_with_dataset_scaling(ad, tmp_path):
    st = rand_state(seed=2)
    src = write_saelens(tmp_path / "sl", st, "blocks.1.hook_resid_post", norm=True)  # old boolean form
    with pytest.raises(ImportFormatError, match="norm-scaling-factor"):
        convert_sae(src, "saelens", ad, out=tmp_path / "x")
    out = convert_sae(src, "saelens", ad, out=tmp_path / "out", norm_scaling_factor=2.5)
    x = x_in()
    close(ours(out, ad, x), ref_saelens(st, x, scale=2.5))
    assert not torch.allclose(ours(out, ad, x), ref_saelens(st, x, scale=1.0), atol=1e-3)  # the scale matters
    m = read_manifest(out, "saes")
    assert (m["layer"], m["source"]["hook"], m["imported"]) == ("blocks.1", "blocks.1.hook_resid_post", True)
    assert m["source"]["normalization"] == {"kind": "expected_average_only_in", "per_input": False, "scale": 2.5}
    files = {Path(f["path"]).name: f["sha256"] for f in m["source"]["files"]}
    assert files["sae_weights.safetensors"] == hashlib.sha256((src / "sae_weights.safetensors").read_bytes()
                                                              ).hexdigest()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1" and cfg["normalize_activations"] == "none"


def test_saelens_old_finetuning_scaling_factor_is_folded_into_the_decoder(ad, tmp_path):
    st = rand_state(seed=10)
    sf = torch.rand(24, generator=torch.Generator().manual_seed(3)) + 0.5
    src = write_saelens(tmp_path / "sl", {**st, "scaling_factor": sf}, "blocks.1.hook_resid_post")
    out = convert_sae(src, "saelens", ad, out=tmp_path / "out")
    sae, x = load_sae(out, ad).double(), x_in()
    with torch.no_grad():
        f = encode_pfv(sae, x)
        close(f, ref_saelens(st, x))
        close(sae.decode(f), (f * sf.double()) @ st["W_dec"].double() + st["b_dec"].double())  # old decode


def test_saelens6_topk_with_layer_norm_and_no_b_dec_subtraction(ad, tmp_path):
    st = rand_state(seed=3)
    src = write_saelens(tmp_path / "sl6", st, "blocks.0", old=False, arch="topk", norm="layer_norm",
                        apply_b_dec=False, k=5)
    out = convert_sae(src, "saelens", ad, out=tmp_path / "out")
    x = x_in()
    close(ours(out, ad, x), ref_saelens(st, x, apply_b_dec=False, norm="layer_norm", k=5))
    m = read_manifest(out, "saes")
    assert m["layer"] == "blocks.0" and m["architecture"] == "topk"
    assert any("per-input normalisation 'layer_norm'" in w for w in m["warnings"])


# ----- saev ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema,act", [(2, "Relu"), (1, "Relu"), (2, "TopK"), (2, "BatchTopK")])
def test_saev_checkpoints(ad, tmp_path, schema, act):
    st = rand_state(seed=4)
    src = write_saev(tmp_path / "run" / "checkpoint" / "sae.pt", st, schema, act, k=4)
    with pytest.raises(SaeCafeError, match="does not record its layer"):
        convert_sae(src, "saev", ad, out=tmp_path / "x")
    out = convert_sae(tmp_path / "run", "saev", ad, "-1", out=tmp_path / "out", tokens="patch")
    x = x_in()
    got, ref = ours(out, ad, x), ref_saev(st, x, schema, act, k=4)
    m = read_manifest(out, "saes")
    assert m["layer"] == "blocks.1" and m["trained_on_tokens"] == "patch"
    if act == "Relu":
        close(got, ref)
        # the b_dec rule of the schema is what makes them equal: the other rule differs
        assert not torch.allclose(got, ref_saev(st, x, 3 - schema, act), atol=1e-3)
    else:  # sae-lens clamps negative kept values to 0; saev keeps them: equal up to that clamp, and recorded
        close(got, ref.relu())
        kept_positive = ((ref != 0).sum(-1) == 4)
        assert kept_positive.sum() > 50
        close(got[kept_positive], ref[kept_positive])
        assert any("unclamped" in w for w in m["warnings"])


def test_saev_batch_level_topk_is_refused(tmp_path):
    src = write_saev(tmp_path / "sae.pt", rand_state(), schema=1, act="BatchTopK")
    with pytest.raises(ImportFormatError, match="whole batch"):
        load_foreign_sae(src, "saev")


# ----- ViT-Prisma -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,act,arch", [("layer_norm", "relu", "standard"),
                                            ("constant_norm_rescale", "topk", "standard"),
                                            ("none", "relu", "gated")])
def test_prisma_saes(ad, tmp_path, norm, act, arch):
    st = rand_state(seed=5, gated=arch == "gated")
    if arch == "gated":
        st["b_enc"] = torch.zeros(24)  # ViT-Prisma creates (and never uses) b_enc for gated SAEs too
    src = write_prisma(tmp_path / "pr", st, normalize_activations=norm, activation_fn_str=act,
                       activation_fn_kwargs={"k": 6} if act == "topk" else {}, architecture=arch,
                       use_patches_only=True)
    out = convert_sae(src, "vit-prisma", ad, out=tmp_path / "out")
    x = x_in()
    close(ours(out, ad, x), ref_prisma(st, x, norm, act, 6, arch))
    m = read_manifest(out, "saes")
    assert (m["layer"], m["source"]["hook"]) == ("blocks.1", "blocks.1.hook_resid_post")
    assert m["trained_on_tokens"] == "patch" and m["architecture"] == arch.replace("standard", act.replace(
        "relu", "standard"))
    with pytest.raises(MismatchError, match="tokens='cls'"):
        convert_sae(src, "vit-prisma", ad, out=tmp_path / "o2", tokens="cls")


# ----- CAFE on each format -----------------------------------------------------------------------------------
def test_cafe_builds_on_each_format(ad, tmp_path):
    st = rand_state(d_sae=2, seed=6, b_enc_shift=1.0)  # two latents that fire
    srcs = {"saelens": write_saelens(tmp_path / "sl", st, "blocks.1.hook_resid_post"),
            "saev": write_saev(tmp_path / "sae.pt", st),
            "vit-prisma": write_prisma(tmp_path / "pr", st)}
    imgs = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for fmt, src in srcs.items():
        out = convert_sae(src, fmt, ad, "1", out=tmp_path / "saes" / fmt)
        sae = load_sae(out, ad, "blocks.1")
        cafe = build_cafe(ad, sae, "blocks.1", imgs, out_dir=tmp_path / "cafe" / fmt, k=2, n_sample=0,
                          progress=False)
        assert len(cafe.latent_rows) == 2, fmt


def test_icat_attributes_between_saes_converted_from_two_formats(ad, tmp_path):
    from sae_cafe.icat import attribute

    s0 = convert_sae(write_saev(tmp_path / "sae.pt", rand_state(d_sae=6, seed=8, b_enc_shift=0.5)), "saev", ad,
                     "blocks.0", out=tmp_path / "s0")
    s1 = convert_sae(write_prisma(tmp_path / "pr", rand_state(d_sae=5, seed=9, b_enc_shift=0.5),
                                  normalize_activations="none"), "vit-prisma", ad, out=tmp_path / "s1")
    saes = {"blocks.0": load_sae(s0, ad, "blocks.0"), "blocks.1": load_sae(s1, ad, "blocks.1")}
    a = attribute(ad, saes, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), "blocks.0",
                  "blocks.1", steps=4)
    assert a.shape == (2, 6, 5) and torch.isfinite(a).all() and a.abs().sum() > 0


# ----- hook mapping and errors -----------------------------------------------------------------------------
def test_hook_names_map_to_blocks(ad):
    table = {"blocks.1.hook_resid_post": "blocks.1", "blocks.1.hook_resid_pre": "blocks.0", "1": "blocks.1",
             "-2": "blocks.0", "encoder.layer.1": "blocks.1", "vision_model.encoder.layers.0": "blocks.0",
             "visual.transformer.resblocks.1": "blocks.1", "encoder.layers.encoder_layer_0": "blocks.0",
             "blocks.0": "blocks.0"}
    assert {k: map_hook_name(k, ad) for k in table} == table
    for bad, match in [("blocks.0.hook_resid_pre", "patch embedding"), ("blocks.1.hook_mlp_out", "inside block 1"),
                       ("blocks.0.attn.hook_z", "inside block 0"), ("blocks.7.hook_resid_post", "has 2 blocks"),
                       ("-3", "has 2 blocks")]:
        with pytest.raises(MismatchError, match=match):
            map_hook_name(bad, ad)
    with pytest.raises(UnknownLayerError, match="valid PFV layers"):
        map_hook_name("resid_stream_9", ad)
    with pytest.raises(MismatchError, match="has no blocks"):
        map_hook_name("blocks.1.hook_resid_post", mini_resnet_32())


def test_one_hook_maps_to_the_same_block_of_every_vit_family():
    from test_srd_hf_vit import build as build_hf
    from test_srd_openclip import build as build_oc

    from sae_cafe.models import make_adapter

    for model in (build_hf("clip"), build_hf("dinov2_cls"), build_oc("tok")):
        a = make_adapter(model)
        blocks = list(a.layers())
        assert map_hook_name("blocks.1.hook_resid_post", a) == blocks[1] != blocks[0]
        assert map_hook_name("blocks.1.hook_resid_pre", a) == map_hook_name("-3", a) == blocks[0]
        assert map_hook_name("transformer.resblocks.2", a) == map_hook_name("encoder.layer.2", a) == blocks[2]


def test_wrong_width_unknown_hook_and_layer_conflict_are_clear(ad, tmp_path):
    src = write_prisma(tmp_path / "narrow", rand_state(d_in=16), hook_point_layer=1)
    with pytest.raises(MismatchError, match=r"d_in=16 .* PFV width 32"):
        convert_sae(src, "vit-prisma", ad, out=tmp_path / "o")
    src = write_prisma(tmp_path / "mlp", rand_state(), layer_subtype="hook_mlp_out")
    with pytest.raises(MismatchError, match="inside block 1"):
        convert_sae(src, "vit-prisma", ad, out=tmp_path / "o")
    src = write_prisma(tmp_path / "ok", rand_state())
    with pytest.raises(MismatchError, match="trained on hook 'blocks.1.hook_resid_post'"):
        convert_sae(src, "vit-prisma", ad, "0", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@dataclass
class LegacyCfg:  # stands in for ViT-Prisma's pickled VisionModelSAERunnerConfig
    d_in: int = D


def test_pickled_files_are_refused(ad, tmp_path):
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hook_point_layer": 1, "layer_subtype": "hook_resid_post"}))
    torch.save({"cfg": LegacyCfg(), "state_dict": rand_state()}, d / "sae.pt")
    with pytest.raises(ImportFormatError, match=r"weights_only=True.*never unpickles"):
        convert_sae(d, "vit-prisma", ad, out=tmp_path / "o")
    buf = io.BytesIO()
    torch.save({"W_enc": LegacyCfg()}, buf)
    (tmp_path / "s.pt").write_bytes(b'{"schema": 2, "cfg": {}}\n' + buf.getvalue())
    with pytest.raises(ImportFormatError, match="never unpickles"):
        load_foreign_sae(tmp_path / "s.pt", "saev")
    (d / "sae.pt").unlink()
    (d / "sae.pkl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ImportFormatError, match="pickle"):
        load_foreign_sae(d, "vit-prisma")
    (tmp_path / "not_saev.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ImportFormatError, match="JSON header"):
        load_foreign_sae(tmp_path / "not_saev.pt", "saev")


# ----- CLI: convert into a run, then build-index reads it like a trained SAE ----------------------------------
def test_cli_convert_then_build_index_on_mini_vit(tmp_path, capsys):
    from PIL import Image

    from sae_cafe.cafe.cli import register as register_cafe
    from sae_cafe.models import load_model
    from sae_cafe.sae_import.cli import register
    from sae_cafe.world import generate

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    register_cafe(sub)
    st = rand_state(d_in=96, d_sae=3, seed=7, b_enc_shift=1.0)
    src = write_prisma(tmp_path / "pr", st, hook_point_layer=2, normalize_activations="none")
    common = ["--run", "r", "--root", str(tmp_path / "idx"), "--model", "mini_vit"]
    args = parser.parse_args(["convert-sae", str(src), "--from", "vit-prisma", *common])
    assert args.func(args) == 0
    assert "-> " in capsys.readouterr().out
    stage = tmp_path / "idx" / "r" / "saes" / "mini_vit" / "encoder.layers.encoder_layer_2"
    m = read_manifest(stage, "saes")
    assert m["model_record"]["name"] == "mini_vit" and m["model_record"]["weights_sha256"]
    adapter = load_model("mini_vit")
    load_sae(stage, adapter, "2")  # the check ICAT and the viewer run (model name, layer, width)
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(generate(4, seed=4).images):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i}.png")
    args = parser.parse_args(["build-index", *common, "--layer", "2", "--sae", str(stage), "--images",
                              str(tmp_path / "imgs"), "--k", "2", "--n-sample", "0", "--no-progress"])
    assert args.func(args) == 0
    assert (tmp_path / "idx" / "r" / "cafe" / "mini_vit" / "encoder.layers.encoder_layer_2" / "manifest.json").exists()


def test_convert_sae_is_declared_as_a_sae_cafe_command():
    import importlib

    import tomllib

    eps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    module, func = eps["sae_cafe.commands"]["sae-import"].split(":")
    parser = argparse.ArgumentParser()
    getattr(importlib.import_module(module), func)(parser.add_subparsers())
    assert parser.parse_args(["convert-sae", "x", "--from", "saev", "--model", "m"]).fmt == "saev"
