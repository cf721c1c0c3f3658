"""PFV extraction and activation shards: round trip, provenance, resume after a crash, mismatches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_resnet, tiny_vit

from sae_cafe.activations.extract import extract_activations
from sae_cafe.activations.shards import ShardReader, ShardWriter
from sae_cafe.errors import ArtifactError, MismatchError


@pytest.fixture(scope="module")
def resnet():
    return tiny_resnet()


@pytest.fixture(scope="module")
def images():
    return torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_round_trip_two_layers_one_pass(tmp_path, resnet, images):
    calls = []
    resnet.layers()  # the adapter's one-off probe forward
    h = resnet.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        dirs = extract_activations(resnet, images, ["layer2", "layer3.1"], run="r", root=tmp_path,
                                   shard_size=30, batch_size=4, progress=False)
    finally:
        h.remove()
    assert len(calls) == 3  # ceil(10 / 4) batches, both layers in one forward pass each
    with torch.no_grad():
        ref = resnet.capture(images, ["layer2", "layer3.1"])
    for layer, d in dirs.items():
        assert d == tmp_path / "r" / "acts" / "resnet18" / layer
        r = ShardReader(d)
        pf = resnet.to_pfv(ref[layer])
        B, N, D = pf.pfv.shape
        assert (r.n, r.d_in, r.n_images, r.layer, r.model) == (B * N, D, 10, layer, "resnet18")
        assert r.grid == pf.grid and len(r.shards) > 1
        torch.testing.assert_close(r[torch.arange(r.n)], pf.pfv.reshape(-1, D), rtol=0, atol=0)
        torch.testing.assert_close(torch.cat(list(r.iter_batches(7))), pf.pfv.reshape(-1, D), rtol=0, atol=0)
        prov = r.provenance(torch.arange(r.n))
        assert torch.equal(prov[:, 0], torch.arange(B).repeat_interleave(N))
        assert torch.equal(prov[:, 1:], pf.positions.repeat(B, 1))
        i = 3 * N + N - 1  # random access by int
        torch.testing.assert_close(r[i], pf.pfv[3, N - 1])
        assert r.provenance(i).tolist() == [3, *pf.positions[N - 1].tolist()]
        assert r.image_ids == [f"image_{k:06d}" for k in range(10)]
        m = r.manifest
        assert m["kind"] == "acts" and m["d_in"] == D and m["counts"]["n"] == B * N
        assert m["preprocessing"]["input_size"] == [32, 32] and "weights_hash" in m
        assert not list(d.parent.glob(".*.tmp"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_shards(tmp_path, resnet, images, dtype):
    d = extract_activations(resnet, images[:3], "layer2", root=tmp_path, dtype=dtype, progress=False)["layer2"]
    r = ShardReader(d)
    assert r[0].dtype == getattr(torch, dtype)
    with torch.no_grad():
        ref = resnet.to_pfv(resnet.capture(images[:3], ["layer2"])["layer2"]).pfv.reshape(-1, r.d_in)
    torch.testing.assert_close(r[torch.arange(r.n)].float(), ref, rtol=2e-2, atol=2e-2)


def test_resume_after_crash_loses_and_duplicates_nothing(tmp_path, resnet, images):
    # 32 px: layer2 has 16 PFVs per image (a shard per batch of 2), layer3 has 4 (a shard per 2 batches)
    kw = dict(run="r", shard_size=12, batch_size=2, progress=False)
    ref = extract_activations(resnet, images, ["layer2", "layer3"], root=tmp_path / "ref", **kw)
    n_calls = {"n": 0}

    def boom(*_):
        n_calls["n"] += 1
        if n_calls["n"] == 4:
            raise RuntimeError("simulated crash")

    h = resnet.model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_activations(resnet, images, ["layer2", "layer3"], root=tmp_path / "x", **kw)
    h.remove()
    resnet.layers()
    tmp = tmp_path / "x" / "r" / "acts" / "resnet18" / ".layer2.tmp"
    prog = json.loads((tmp / "progress.json").read_text())
    assert prog["shards"], "finished shards are kept in the temporary stage"
    assert not (tmp.parent / "layer2").exists()
    seen = []
    h = resnet.model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].shape[0]))
    out = extract_activations(resnet, images, ["layer2", "layer3"], root=tmp_path / "x", **kw)
    h.remove()
    # 3 batches ran before the crash: layer2 committed images 0-5, layer3 images 0-3 → resume at image 4
    assert sum(seen) == 6
    for layer in ("layer2", "layer3"):
        a, b = ShardReader(ref[layer]), ShardReader(out[layer])
        assert a.n == b.n
        torch.testing.assert_close(b[torch.arange(b.n)], a[torch.arange(a.n)], rtol=0, atol=0)
        pb = b.provenance(torch.arange(b.n))
        assert torch.equal(pb, a.provenance(torch.arange(a.n)))
        assert torch.unique(pb, dim=0).shape[0] == b.n  # no duplicates
        assert b.image_ids == a.image_ids


def test_folder_source_skip_bad_and_ids(tmp_path, resnet):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            arr = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="bad.png"):
        d = extract_activations(resnet, root, "layer3", root=tmp_path, skip_bad=True, batch_size=3,
                                progress=False)["layer3"]
    r = ShardReader(d)
    assert r.image_ids == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert r.manifest["counts"]["skipped_images"] == 1 and r.manifest["dataset"]["fingerprint"]


def test_resume_keeps_skipped_images_and_drops_partial_files(tmp_path, resnet):
    """A resumed extraction still reports the images skipped before the crash (once), and the temporary
    file of a shard write cut short by the crash does not end up in the stage."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(6):
        arr = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "a" / f"{i}.png")
    (root / "a" / "0bad.png").write_bytes(b"not an image")  # sorted first: skipped in the first batch
    kw = dict(root=tmp_path / "x", run="r", skip_bad=True, batch_size=2, shard_size=1, progress=False)
    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")

    h = resnet.model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_activations(resnet, root, "layer3", **kw)
    h.remove()
    resnet.layers()
    tmp = tmp_path / "x" / "r" / "acts" / "resnet18" / ".layer3.tmp"
    assert json.loads((tmp / "progress.json").read_text())["skipped"]
    (tmp / ".shard_00009.safetensors.tmp4242").write_bytes(b"half a shard")
    with pytest.warns(UserWarning, match="0bad.png"):
        d = extract_activations(resnet, root, "layer3", **kw)["layer3"]
    r = ShardReader(d)
    assert r.manifest["counts"]["skipped_images"] == 1 and r.manifest["skipped"][0][0] == "a/0bad.png"
    assert r.image_ids == [f"a/{i}.png" for i in range(6)]
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []


def test_vit_class_token_and_sampling(tmp_path, images):
    vit = tiny_vit()
    d = extract_activations(vit, images[:4], "blocks.1", root=tmp_path, include_cls=True, progress=False)
    r = ShardReader(d["blocks.1"])
    assert r.n == 4 * (16 + 1) and r.d_in == 32 and r.grid == (4, 4)
    prov = r.provenance(torch.arange(r.n))
    assert (prov[:, 1] == -1).sum() == 4  # one class token per image, row = -1
    with torch.no_grad():
        tok = vit.capture(images[:4], ["blocks.1"])["blocks.1"]
    torch.testing.assert_close(r[0], tok[0, 0])  # class token first
    torch.testing.assert_close(r[1], tok[0, 1])
    for sampling in ("uniform", "logit"):
        d2 = extract_activations(vit, images[:4], "blocks.1", root=tmp_path / sampling, positions_per_image=5,
                                 sampling=sampling, progress=False)
        r2 = ShardReader(d2["blocks.1"])
        prov = r2.provenance(torch.arange(r2.n))
        assert r2.n == 20 and torch.equal(torch.bincount(prov[:, 0]), torch.full((4,), 5))
        assert torch.unique(prov, dim=0).shape[0] == 20
        j = 7
        img, row, col = prov[j].tolist()
        torch.testing.assert_close(r2[j], tok[img, 1 + row * 4 + col])


def test_finished_stage_reused_or_refused(tmp_path, resnet, images):
    d = extract_activations(resnet, images[:2], "layer2", root=tmp_path, progress=False)["layer2"]
    mtime = (d / "manifest.json").stat().st_mtime_ns
    extract_activations(resnet, images[:2], "layer2", root=tmp_path, progress=False)
    assert (d / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(ArtifactError, match="other settings"):
        extract_activations(resnet, images[:2], "layer2", root=tmp_path, dtype="float16", progress=False)
    extract_activations(resnet, images[:2], "layer2", root=tmp_path, dtype="float16", overwrite=True,
                        progress=False)
    assert ShardReader(d).manifest["dtype"] == "float16"


def test_manifest_mismatch_is_clear(tmp_path, resnet, images):
    d = extract_activations(resnet, images[:2], "layer2", root=tmp_path, progress=False)["layer2"]
    r = ShardReader(d)
    r.check(model="resnet18", layer="layer2", d_in=128)
    with pytest.raises(MismatchError, match=r"d_in 128 \(expected 256\)"):
        r.check(d_in=256)
    with pytest.raises(MismatchError, match=r"layer 'layer2' \(expected 'layer3'\)"):
        r.check(layer="layer3")
    with pytest.raises(MismatchError, match=r"model 'resnet18' \(expected 'vgg11'\)"):
        r.check(model="vgg11")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        ShardReader(tmp_path / "nowhere")


def test_shard_writer_bounds_memory(tmp_path):
    w = ShardWriter(tmp_path, 4, shard_size=10)
    for i in range(7):
        w.add(torch.randn(3, 4), torch.full((3,), i), torch.zeros(3, 2, dtype=torch.long), images_end=i + 1)
        assert w._rows < 10 + 3
    w.flush(images_end=7)
    assert [s["n"] for s in w.shards] == [12, 9] and w.images_done == 7
    with pytest.raises(MismatchError):
        w.add(torch.randn(2, 5), torch.zeros(2), torch.zeros(2, 2))


def test_logit_sampling_records_its_relevance(tmp_path, resnet, images, monkeypatch):
    """sampling='logit' weights positions by SRD; a model SRD has no rules for uses gradient × activation, and
    the manifest says so (with a warning) instead of switching silently."""
    from sae_cafe.activations import extract
    from sae_cafe.errors import UnsupportedModuleError

    kw = dict(positions_per_image=3, sampling="logit", progress=False, batch_size=4)
    d = extract_activations(resnet, images[:6], "layer3", root=tmp_path / "srd", **kw)["layer3"]
    m = ShardReader(d).manifest
    assert m["sampling_relevance"] == "srd" and m["warnings"] == []

    def no_rules(adapter, *a, **k):
        raise UnsupportedModuleError(f"SRD has no rules for model family {adapter.family!r}")

    monkeypatch.setattr(extract, "srd_relevance", no_rules)
    with pytest.warns(UserWarning, match="gradient_x_activation"):
        d = extract_activations(resnet, images[:6], "layer3", root=tmp_path / "gxa", **kw)["layer3"]
    m = ShardReader(d).manifest
    assert m["sampling_relevance"].startswith("gradient_x_activation (SRD unavailable")
    assert len(m["warnings"]) == 1 and "no rules" in m["warnings"][0]
    u = extract_activations(resnet, images[:6], "layer3", root=tmp_path / "uni", positions_per_image=3,
                            progress=False)["layer3"]
    assert ShardReader(u).manifest["sampling_relevance"] is None  # uniform sampling uses no relevance


# ----- token kinds and high-norm outliers --------------------------------------------------------------------
def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    from sae_cafe.models import make_adapter

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw)
    return make_adapter(m.eval(), "tiny_vit_reg", resize=None)


def test_token_kinds_round_trip_through_shards(tmp_path, images):
    """Every stored row keeps its token kind; tokens='all' / 'cls' / 'patch' store exactly those rows, equal to
    the layer's tokens; include_cls=True is tokens='all'."""
    from sae_cafe.activations.shards import TOKEN_KINDS

    vit = _vit(reg_tokens=2)
    x = images[:3]
    with torch.no_grad():
        tok = vit.capture(x, ["blocks.1"])["blocks.1"]  # (3, 3 + 16, 32): cls, 2 registers, 16 patches
    kinds_img = ["cls", "register", "register"] + ["patch"] * 16
    for tokens, sel in (("all", list(range(19))), ("cls", [0]), ("patch", list(range(3, 19)))):
        d = extract_activations(vit, x, "blocks.1", root=tmp_path / tokens, tokens=tokens, progress=False)
        r = ShardReader(d["blocks.1"])
        assert r.tokens == tokens and r.manifest["config"]["tokens"] == tokens
        assert r.manifest["pfv_layout"]["prefix_kinds"] == ["cls", "register", "register"]
        assert r.n == 3 * len(sel)
        got = r.kinds(torch.arange(r.n))
        assert got == [kinds_img[j] for j in sel] * 3
        want = tok[:, sel].reshape(-1, 32)
        assert torch.equal(r[torch.arange(r.n)], want)
        by_kind = {k: got.count(k) for k in TOKEN_KINDS if got.count(k)}
        assert r.manifest["counts"]["by_kind"] == by_kind
        prov = r.provenance(torch.arange(r.n))
        prefix = torch.tensor([k != "patch" for k in got])
        assert bool((prov[prefix, 1] == -1).all()) and bool((prov[~prefix, 1] >= 0).all())
    old = extract_activations(vit, x, "blocks.1", root=tmp_path / "old", include_cls=True, progress=False)
    assert ShardReader(old["blocks.1"]).tokens == "all"


def test_distillation_token_kind(tmp_path, images):
    from timm.models.deit import VisionTransformerDistilled

    from sae_cafe.models import make_adapter

    torch.manual_seed(0)
    m = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    vit = make_adapter(m.eval(), "tiny_deit_distilled", resize=None)
    d = extract_activations(vit, images[:2], "blocks.0", root=tmp_path, tokens="all", progress=False)
    r = ShardReader(d["blocks.0"])
    assert r.kinds(torch.arange(r.n))[:3] == ["cls", "dist", "patch"]
    assert r.manifest["counts"]["by_kind"] == {"patch": 32, "cls": 2, "dist": 2}


def test_token_settings_are_checked(tmp_path, resnet, images):
    from sae_cafe.errors import SaeCafeError

    with pytest.raises(SaeCafeError, match="tokens='pixels' is not a token setting"):
        extract_activations(resnet, images[:2], "layer2", root=tmp_path, tokens="pixels", progress=False)
    with pytest.raises(SaeCafeError, match="has no class token"):
        extract_activations(resnet, images[:2], "layer2", root=tmp_path, tokens="cls", progress=False)
    with pytest.raises(SaeCafeError, match="leave it unset"):
        extract_activations(_vit(), images[:2], "blocks.1", root=tmp_path, tokens="cls", positions_per_image=3,
                            progress=False)


def test_old_shards_without_kind_column_stay_readable(tmp_path, images):
    """Shards written before the kind/outlier columns: grid rows read as patch, prefix rows as cls (token 0)
    or register; nothing is flagged; the extraction setting is read from include_cls."""
    from safetensors.torch import load_file, save_file

    vit = _vit(reg_tokens=1)
    d = extract_activations(vit, images[:2], "blocks.1", root=tmp_path, tokens="all", progress=False)["blocks.1"]
    new = ShardReader(d)
    kinds_new = new.kinds(torch.arange(new.n))
    for f in d.glob("shard_*.safetensors"):
        t = load_file(str(f))
        save_file({k: t[k] for k in ("acts", "image", "pos")}, str(f))
    man = json.loads((d / "manifest.json").read_text())
    del man["config"]["tokens"], man["outliers"]
    (d / "manifest.json").write_text(json.dumps(man))
    old = ShardReader(d)
    assert old.tokens == "all" and old.outlier_report is None
    assert old.kinds(torch.arange(old.n)) == kinds_new
    sh = old.load_shard(0)
    assert sh["outlier"].dtype == torch.uint8 and int(sh["outlier"].sum()) == 0
    patch = torch.cat([a for a in old.iter_batches(7, tokens="patch")])
    assert patch.shape[0] == 32 and torch.equal(patch, new[[i for i, k in enumerate(kinds_new) if k == "patch"]])


def _planted(vit, plants):
    """A forward hook on blocks.0 rescaling token ``t`` of image ``i`` to ``s`` × the largest patch-token norm
    of the image, for (i, t, s) in ``plants``."""
    def hook(_m, _i, out):
        out = out.clone()
        for i, t, s in plants:
            if i >= out.shape[0]:  # the adapter's 1-image probe forward
                continue
            top = out[i, vit.num_prefix_tokens:].norm(dim=-1).max()
            out[i, t] = out[i, t] / out[i, t].norm() * top * s
        return out
    return vit.model.blocks[0].register_forward_hook(hook)


def test_planted_high_norm_tokens_are_reported_and_flagged(tmp_path, images):
    """Two planted high-norm tokens (a patch token of image 1 at grid (2, 1), the class token of image 3) are
    the only outliers; the report's counts, kinds, position and norm ratios match a float64 reference."""
    vit = _vit()
    x = images[:5]
    d = extract_activations(vit, x, "blocks.0", root=tmp_path / "clean", tokens="all", progress=False)
    clean = ShardReader(d["blocks.0"]).outlier_report
    assert clean["n"] == 0 and clean["checked"] and clean["n_tokens_checked"] == 5 * 17
    plants = [(1, 1 + 2 * 4 + 1, 3.0), (3, 0, 3.0)]
    h = _planted(vit, plants)
    try:
        with torch.no_grad():
            tok = vit.capture(x, ["blocks.0"])["blocks.0"].double()
        with pytest.warns(UserWarning, match=r"2 high-norm outlier tokens of 85 .*1 cls, 1 patch"):
            d = extract_activations(vit, x, "blocks.0", root=tmp_path / "planted", tokens="all", progress=False)
    finally:
        h.remove()
    r = ShardReader(d["blocks.0"])
    rep = r.outlier_report
    assert rep["n"] == 2 and rep["by_kind"] == {"patch": 1, "cls": 1} and rep["images_with_outliers"] == 2
    assert rep["top_positions"] == [{"row": 2, "col": 1, "n": 1}] and rep["k"] == 10.0
    norms = tok.norm(dim=-1)  # (5, 17)
    med = norms[:, 1:].sort(dim=1).values[:, (16 - 1) // 2]  # lower median of the 16 patch-token norms
    ratios = torch.tensor([norms[1, 10] / med[1], norms[3, 0] / med[3]])
    assert rep["norm_ratio"]["max"] == pytest.approx(float(ratios.max()), rel=1e-5)
    assert rep["norm_ratio"]["min"] == pytest.approx(float(ratios.min()), rel=1e-5)
    flagged = []
    for sh in r.iter_shards():
        for j in sh["outlier"].nonzero()[:, 0].tolist():
            flagged.append((int(sh["image"][j]), tuple(sh["pos"][j].tolist())))
    assert sorted(flagged) == [(1, (2, 1)), (3, (-1, 0))]


def test_outlier_tally_survives_a_resume(tmp_path, images):
    vit = _vit()
    vit.layers()  # the adapter's one-off probe forward
    h = _planted(vit, [(1, 5, 3.0)])  # image 1 of every batch of 2
    calls = []

    def boom(*_):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")

    kw = dict(root=tmp_path, batch_size=2, shard_size=30, progress=False)
    try:
        full = extract_activations(vit, images[:8], "blocks.0", root=tmp_path / "full", batch_size=2,
                                   shard_size=30, progress=False)["blocks.0"]
        c = vit.model.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract_activations(vit, images[:8], "blocks.0", **kw)
        c.remove()
        with pytest.warns(UserWarning, match="4 high-norm outlier tokens"):
            d = extract_activations(vit, images[:8], "blocks.0", **kw)["blocks.0"]
    finally:
        h.remove()
    assert len(ShardReader(d).shards) == 4 and ShardReader(d).outlier_report["n"] == 4
    assert ShardReader(d).outlier_report == ShardReader(full).outlier_report
