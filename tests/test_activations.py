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
