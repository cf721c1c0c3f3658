"""Token kinds and high-norm outliers in streamed SAE training (``sae_training.stream_data``): a layer's streamed
rows are the shard path's rows for the same images and ``tokens`` setting (no class token with ``"patch"``), the
outlier report equals the extraction's, ``outliers="exclude"`` drops the flagged rows, SAEs of one layer must
agree on both settings, the row draws and buffers of a layer do not depend on the other layers, and the trained
SAE records its tokens where a shard-trained one does. Tiny random-weight ViT / ResNet, seconds each."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_resnet, tiny_vit

from sae_cafe.activations import ShardReader, extract_activations
from sae_cafe.errors import SaeCafeError
from sae_training.stream import StreamConfig, StreamSAE, train_saes_streaming
from sae_training.stream_data import StreamProvider, draw_rows, layer_key, rows_per_image_of
from sae_training.train import SAETrainConfig

K = 1.0  # a low outlier k: the random tiny ViT has no real high-norm tokens, this flags some of its tokens
N_IMG, IBS = 16, 8


def images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def pushed(p: StreamProvider, n: str) -> torch.Tensor:
    """Every row pushed into layer ``n``'s buffer so far, in order (the buffer is larger than what was pushed,
    so nothing was shuffled yet)."""
    b = p.buffers[n]
    assert b.serving.shape[0] == 0
    return torch.cat(b.parts)


def stream_one_pass(ad, layers, **kw) -> StreamProvider:
    p = StreamProvider(ad, layers, images(N_IMG), 16, 10 ** 6, image_batch_size=IBS, outlier_k=K, **kw)
    for _ in range(N_IMG // IBS):
        p._pull()
    assert p.images_seen == N_IMG
    return p


def shard_rows(tmp_path, ad, layer, tokens):
    d = extract_activations(ad, images(N_IMG), [layer], run=f"sh_{tokens}", root=tmp_path, batch_size=IBS,
                            tokens=tokens, outlier_k=K, progress=False)[layer]
    r = ShardReader(d)
    sh = list(r.iter_shards())
    return {k: torch.cat([s[k] for s in sh]) for k in ("acts", "kind", "outlier")}, r.manifest


@pytest.mark.parametrize("tokens", ["patch", "all", "cls"])
def test_streamed_rows_equal_the_shard_rows_and_outlier_report(tmp_path, tokens):
    ad = tiny_vit()
    layer = "blocks.1"
    ref, manifest = shard_rows(tmp_path, ad, layer, tokens)
    p = stream_one_pass(ad, [layer], tokens={layer: tokens})
    rows = pushed(p, layer)
    assert p.rows_per_image == {"patch": 16, "all": 17, "cls": 1}[tokens]  # every row kept: no draw
    assert torch.equal(rows, ref["acts"])  # the same rows in the same order
    with torch.no_grad():
        cls_rows = ad.capture(images(N_IMG), [layer])[layer][:, 0]  # (B, D) the class tokens
    has_cls = (rows[:, None] == cls_rows[None]).all(-1).any(0)  # (B,) class token of image b is a row
    assert bool(has_cls.all()) == (tokens != "patch") and bool(has_cls.any()) == (tokens != "patch")
    rec = json.loads(json.dumps(p.outlier_record(layer)))
    assert manifest["outliers"]["n"] > 0  # the low k flags some tokens, so the comparison means something
    assert rec["outlier_report"] == manifest["outliers"]  # same rule, same images, same numbers
    tr = rec["training_rows"]
    assert tr["flagged_of_kinds"] == tr["outliers"] == int(ref["outlier"].sum())
    assert tr["n"] == tr["of_kinds"] == ref["acts"].shape[0] and tr["outliers_excluded"] == 0
    assert rec["tokens"] == tokens and rec["outliers"] == "report"


def test_exclude_drops_exactly_the_flagged_rows(tmp_path):
    ad = tiny_vit()
    layer = "blocks.0"
    ref, _ = shard_rows(tmp_path, ad, layer, "all")
    p = stream_one_pass(ad, [layer], tokens={layer: "all"}, exclude_outliers=[layer])
    keep = ref["outlier"] == 0
    assert int((~keep).sum()) > 0
    assert torch.equal(pushed(p, layer), ref["acts"][keep])
    tr = p.outlier_record(layer)["training_rows"]
    assert tr["outliers_excluded"] == int((~keep).sum()) and tr["outliers"] == 0 and tr["n"] == int(keep.sum())


def test_layer_streams_do_not_depend_on_the_other_layers():
    """Adding or reordering layers leaves a layer's row draw and buffer shuffles (hence its batches) unchanged."""
    ad = tiny_vit()
    mk = lambda layers: StreamProvider(ad, layers, images(24), 16, 64, image_batch_size=IBS,  # noqa: E731
                                       rows_per_image=5, seed=2)
    a, b, c = mk(["blocks.0", "blocks.1"]), mk(["blocks.1", "blocks.0"]), mk(["blocks.1"])
    ba, bb, bc = ([next(p) for _ in range(6)] for p in (a, b, c))
    assert all(torch.equal(x["blocks.1"], y["blocks.1"]) and torch.equal(x["blocks.1"], z["blocks.1"])
               for x, y, z in zip(ba, bb, bc, strict=True))
    assert all(torch.equal(x["blocks.0"], y["blocks.0"]) for x, y in zip(ba, bb, strict=True))
    # the draw differs between layers and images (a layer's id seeds it, the image index too)
    img = torch.arange(3).repeat_interleave(16)
    d0, d1 = draw_rows(img, 3, 5, 2, 0, layer_key("blocks.0")), draw_rows(img, 3, 5, 2, 0, layer_key("blocks.1"))
    assert not torch.equal(d0, d1)
    per_image = (d0.view(3, 5) % 16)
    assert not (torch.equal(per_image[0], per_image[1]) and torch.equal(per_image[1], per_image[2]))


def test_settings_that_cannot_be_streamed_are_clear_errors(tmp_path):
    ad = tiny_vit()
    cfg = StreamConfig(steps=2, batch_size=16, buffer_rows=32, n_checkpoints=0)
    two = [StreamSAE("blocks.0", SAETrainConfig(tokens="patch")),
           StreamSAE("blocks.0", SAETrainConfig(tokens="all"), "withcls")]
    with pytest.raises(SaeCafeError, match=r"'blocks\.0' \(tokens='patch'\) and 'blocks\.0@withcls' \(tokens='all'\)"):
        train_saes_streaming(ad, images(8), two, cfg, root=tmp_path, progress=False)
    two = [StreamSAE("blocks.0", SAETrainConfig()), StreamSAE("blocks.0", SAETrainConfig(outliers="exclude"), "x")]
    with pytest.raises(SaeCafeError, match="must agree on outliers"):
        train_saes_streaming(ad, images(8), two, cfg, root=tmp_path, progress=False)
    with pytest.raises(SaeCafeError, match="not a token setting"):
        train_saes_streaming(ad, images(8), [StreamSAE("blocks.0", SAETrainConfig(tokens="prefix"))], cfg,
                             root=tmp_path, progress=False)
    cnn = tiny_resnet()  # CNN maps have grid positions only: "all" is the grid, "cls" an error (as at extraction)
    n = cnn.layers()["layer1"].grid
    assert rows_per_image_of(cnn, n[0] * n[1], "all") == rows_per_image_of(cnn, n[0] * n[1], "patch") == n[0] * n[1]
    with pytest.raises(SaeCafeError, match="has no class token"):
        StreamProvider(cnn, ["layer1"], images(4), 16, 32, tokens={"layer1": "cls"})
    p = StreamProvider(ad, ["blocks.0"], images(4), 16, 32)
    tensors, info = p.state()
    with pytest.raises(SaeCafeError, match="older run's checkpoint cannot be resumed"):
        p.load_state(tensors, {k: v for k, v in info.items() if k != "format"})


def test_streamed_sae_records_tokens_like_a_shard_trained_one(tmp_path):
    from sae_lens import SAE

    from sae_cafe.artifacts import read_manifest
    from sae_cafe.saes import sae_tokens
    from sae_training.train import train_sae

    ad = tiny_vit()
    sae_cfg = SAETrainConfig(architecture="topk", expansion=2, k=4, steps=3, batch_size=32, n_checkpoints=0,
                             holdout=0.0, tokens="all", outliers="exclude")
    acts = extract_activations(ad, images(8), ["blocks.1"], run="sh", root=tmp_path, tokens="all", outlier_k=K,
                               progress=False)["blocks.1"]
    with pytest.warns(UserWarning):
        shard = train_sae(acts, config=sae_cfg, evaluate=False, progress=False)
    with pytest.warns(UserWarning, match="left out .* high-norm outlier rows"):
        res = train_saes_streaming(ad, images(8), [StreamSAE("blocks.1", sae_cfg), StreamSAE("blocks.0")],
                                   StreamConfig(steps=3, batch_size=32, buffer_rows=64, n_checkpoints=0,
                                                outlier_k=K), run="st", root=tmp_path, progress=False)
    d_st, d_sh = res["saes"]["blocks.1"]["sae_dir"], shard["sae_dir"]
    st, sh = SAE.load_from_disk(d_st), SAE.load_from_disk(d_sh)
    assert sae_tokens(st) == sae_tokens(sh) == "all"
    assert st.cfg.metadata.sae_cafe["outliers"] == sh.cfg.metadata.sae_cafe["outliers"] == "exclude"
    assert sae_tokens(SAE.load_from_disk(res["saes"]["blocks.0"]["sae_dir"])) == "patch"
    m_st, m_sh = read_manifest(d_st), read_manifest(d_sh)
    for k in ("tokens", "outliers"):
        assert m_st[k] == m_sh[k]
    assert m_st["outlier_report"]["rule"] == m_sh["outlier_report"]["rule"] and m_st["outlier_report"]["k"] == K
    assert m_st["training_rows"]["outliers_excluded"] > 0 and m_st["training_rows"]["outliers"] == 0
    assert any("left out" in note for note in m_st["notes"])
