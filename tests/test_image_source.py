"""The one image source (sae_cafe.image_source.ImageSource): random access and streaming agree for every kind of
input, resume points, skip reports, labels; extraction and CAFE use this same class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_resnet

from sae_cafe.errors import ImageReadError, SaeCafeError
from sae_cafe.image_source import ImageSource
from sae_cafe.images import SkipReport


@pytest.fixture(scope="module")
def adapter():
    return tiny_resnet()


@pytest.fixture
def folder(tmp_path):
    for c in ("b_cls", "a_cls"):
        (tmp_path / c).mkdir()
        for i in range(3):
            arr = np.random.default_rng(i + 10 * len(c) + ord(c[0])).integers(0, 255, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    return tmp_path


def _stream_all(src, adapter, bs, start=0, **kw):
    ids, xs, nexts = [], [], []
    for i, x, n in src.batches(adapter, bs, start, **kw):
        ids += i
        xs.append(x)
        nexts.append(n)
    return ids, torch.cat(xs), nexts


def test_one_class_for_extraction_and_cafe():
    from sae_cafe.activations import extract
    from sae_cafe.cafe import source

    assert extract.ImageSource is ImageSource and source.ImageSource is ImageSource


def test_folder_random_access_equals_streaming(folder, adapter):
    src = ImageSource(folder)
    assert len(src) == 6 and src.root == folder and src.total == 6
    assert src.names[0] == "a_cls/0.png" and [src.label(i) for i in range(6)] == ["a_cls"] * 3 + ["b_cls"] * 3
    ids, x, nexts = _stream_all(src, adapter, 4)
    assert ids == src.names and nexts == [4, 6]
    torch.testing.assert_close(x, src.batch(range(6), adapter), rtol=0, atol=0)
    # a resumed stream starts at the recorded next_item
    ids2, x2, _ = _stream_all(src, adapter, 4, start=4)
    assert ids2 == src.names[4:]
    torch.testing.assert_close(x2, x[4:], rtol=0, atol=0)
    assert src.fingerprint() == ImageSource(folder).fingerprint()
    (folder / "a_cls" / "0.png").write_bytes((folder / "a_cls" / "0.png").read_bytes() + b"x")
    assert src.fingerprint() != ImageSource(folder).fingerprint()


def test_lists_tensors_pairs_datasets_and_streams_agree(folder, adapter):
    paths = sorted(folder.rglob("*.png"))
    pils = [Image.open(p).convert("RGB") for p in paths]
    ref = ImageSource(folder).batch(range(6), adapter)
    pairs = [(im, k % 2) for k, im in enumerate(pils)]

    class Dataset:  # a torchvision-style dataset of (image, label)
        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):
            return pairs[i]

    for images in (paths, pils, pairs, Dataset()):
        src = ImageSource(images)
        torch.testing.assert_close(src.batch(range(6), adapter), ref, rtol=0, atol=0)
        torch.testing.assert_close(_stream_all(src, adapter, 4)[1], ref, rtol=0, atol=0)
    assert ImageSource(pairs).label(3) == 1 and ImageSource(Dataset()).label(2) == 0
    assert ImageSource(paths).names == [str(p) for p in paths]
    t = ImageSource(ref)
    assert t.names[5] == "image_000005" and torch.equal(t.batch([5, 1], adapter), ref[[5, 1]])
    # one-pass streams: of images, and of (N,3,H,W) batches as a DataLoader gives them (with labels)
    s = ImageSource(iter(pils))
    ids, x, nexts = _stream_all(s, adapter, 4, start=1)
    assert ids == [f"image_{i:06d}" for i in range(1, 6)] and nexts == [5, 6]
    torch.testing.assert_close(x, ref[1:], rtol=0, atol=0)
    loader = [(ref[:4], torch.zeros(4)), (ref[4:], torch.zeros(2))]
    ids, x, nexts = _stream_all(ImageSource(iter(loader)), adapter, 4, start=2)
    assert ids[0] == "image_000002" and nexts == [4, 6]
    torch.testing.assert_close(x, ref[2:], rtol=0, atol=0)
    with pytest.raises(SaeCafeError, match="no length or random access"):
        len(ImageSource(iter(pils)))


def test_unreadable_images_skipped_or_raised(folder, adapter):
    (folder / "a_cls" / "1.png").write_bytes(b"not a png")
    src = ImageSource(folder)
    with pytest.raises(ImageReadError, match="1.png"):
        _stream_all(src, adapter, 4)
    rep = SkipReport()
    ids, x, nexts = _stream_all(src, adapter, 4, skip_bad=True, report=rep)
    assert len(ids) == 5 and x.shape[0] == 5 and "a_cls/1.png" not in ids and nexts == [4, 6]
    assert rep.skipped[0][0] == "a_cls/1.png"


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ImageReadError, match="no such file or folder"):
        ImageSource(tmp_path / "missing")
    with pytest.raises(ImageReadError, match="empty"):
        ImageSource([])
    with pytest.raises(ImageReadError, match=r"\(N,3,H,W\)"):
        ImageSource(torch.zeros(2, 1, 8, 8))
    with pytest.raises(SaeCafeError, match="unsupported image source"):
        ImageSource(3.5)
