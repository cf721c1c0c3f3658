"""Image input and the artifact layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sae_cafe.artifacts import (
    SCHEMA_VERSION,
    is_finished,
    list_runs,
    publish_stage,
    read_manifest,
    stage_dir,
    stage_path,
    write_manifest,
)
from sae_cafe.errors import ArtifactError, ImageReadError
from sae_cafe.images import SkipReport, iter_image_files, iter_images, load_image, to_pil
from sae_cafe.models import load_model


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_image_modes_and_formats(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    cases = {
        "a.png": rgb, "b.jpg": rgb, "c.webp": rgb, "d.bmp": rgb, "e.tiff": rgb,
        "gray.png": rgb.convert("L"), "rgba.png": rgb.convert("RGBA"), "pal.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"), "i16.png": Image.fromarray(np.full((8, 8), 40000, np.uint16)),
    }
    for name, im in cases.items():
        _save(im, tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == im.size, name
    # EXIF orientation: a 90° rotation tag swaps width and height
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(rgb, tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 30)
    frames = [rgb, rgb.transpose(Image.FLIP_LEFT_RIGHT)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif").mode == "RGB"


def test_bad_images_have_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    rgb = Image.new("RGB", (64, 64), (10, 20, 30))
    rgb.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    for name, msg in [("empty.png", "empty"), ("text.jpg", "not a readable image"), ("trunc.png", "truncated"),
                      ("nope.png", "no such file")]:
        with pytest.raises(ImageReadError, match=msg) as e:
            load_image(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(ImageReadError, match="NaN"):
        to_pil(np.full((4, 4, 3), np.nan))
    report = SkipReport()
    got = list(iter_images(tmp_path, skip_bad=True, report=report))
    assert [n for n, _ in got] == ["full.png"]
    assert {n for n, _ in report.skipped} == {"empty.png", "text.jpg", "trunc.png"}
    with pytest.raises(ImageReadError):
        list(iter_images(tmp_path))


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    import sae_cafe.images as images

    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ImageReadError, match="decompression-bomb"):
        images.load_image(tmp_path / "big.png")


def test_imagefolder_and_inputs(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30)).save(tmp_path / cls / "1.png")
    files = iter_image_files(tmp_path)
    assert [c for _, c in files] == ["cat", "dog"]
    adapter = load_model("resnet18")
    x = adapter.preprocess([files[0][0], Image.new("L", (50, 50)), np.zeros((10, 12, 3), np.uint8),
                            torch.rand(3, 30, 30)])
    assert x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()


def test_resumed_stage_drops_partial_writes_and_interrupted_publish_recovers(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError), stage_dir(final) as tmp:
        (tmp / "state.json").write_text("{}")
        (tmp / ".state.json.tmp123").write_text("{")  # a write cut short by a kill
        (tmp / "sub").mkdir()
        (tmp / "sub" / ".chunk.safetensors.part").write_bytes(b"x")
        (tmp / ".step_00000004.tmp").mkdir()  # a checkpoint directory not yet renamed
        raise RuntimeError("killed")
    with stage_dir(final, resume=True) as tmp:
        assert sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")) == ["state.json", "sub"]
        write_manifest(tmp, "acts", {})
    # killed between the two renames of a replacing publish: the finished tmp is published, .old removed
    tmp = final.with_name(".stage.tmp")
    tmp.mkdir()
    write_manifest(tmp, "acts", {"n": 2})
    os.replace(final, final.with_name(".stage.old"))
    publish_stage(tmp, final)
    assert read_manifest(final)["config"] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_manifest_round_trip_and_atomic_stage(tmp_path):
    final = stage_path("run1", "acts", "resnet18", "layer3", root=tmp_path)
    assert not is_finished(final)
    with stage_dir(final) as tmp:
        (tmp / "data.bin").write_bytes(b"x")
        assert not is_finished(final)  # half-written: not visible yet
        write_manifest(tmp, "acts", {"layer": "layer3", "n": 3})
    m = read_manifest(final, "acts")
    assert m["config"] == {"layer": "layer3", "n": 3} and m["schema_version"] == SCHEMA_VERSION
    assert {"kind", "upstream", "package_version", "created_at"} <= set(m)
    assert list_runs(tmp_path) == ["run1"]
    # interrupted stage: the temp dir is left, the finished one untouched
    with pytest.raises(RuntimeError), stage_dir(final) as tmp:
        (tmp / "partial").write_text("1")
        raise RuntimeError("killed")
    assert read_manifest(final)["config"]["n"] == 3
    # old schema and corrupt manifests
    (final / "manifest.json").write_text(json.dumps({**m, "schema_version": 0}))
    with pytest.raises(ArtifactError, match="schema_version"):
        read_manifest(final)
    (final / "manifest.json").write_text("{trunc")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_manifest(final)
    with pytest.raises(ArtifactError, match="wrong kind|expected"):
        write_manifest(final, "saes", {})
        read_manifest(final, "acts")
