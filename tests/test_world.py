"""Concept world: determinism, ground truth vs pixels, balance, vocabulary coverage, export round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_cafe.artifacts import read_manifest
from sae_cafe.errors import SaeCafeError
from sae_cafe.images import iter_image_files
from sae_cafe.world import CLASS_NAMES, WorldConfig, generate, load_world, vocabulary, write_world
from sae_cafe.world import vocab as V
from sae_cafe.world.generator import load_textures


@pytest.fixture(scope="module")
def world():
    return generate(480, seed=11)


def _hsv(rgb):
    """(…, 3) uint8 → hue (deg), saturation, value."""
    x = rgb.astype(np.float64) / 255
    mx, mn = x.max(-1), x.min(-1)
    d = np.where(mx - mn == 0, 1, mx - mn)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    return h, (mx - mn) / np.where(mx == 0, 1, mx), mx


def test_determinism():
    a, b, c = generate(40, seed=5), generate(40, seed=5), generate(40, seed=6)
    for k in ("images", "labels", "instance", "shape_map", "colour_map", "pattern_map", "background_map",
              "boxes", "background"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert not np.array_equal(a.images, c.images)
    # chunked rendering gives the same images
    assert np.array_equal(generate(40, seed=5, chunk=7).images, a.images)


def test_textures_ship_with_scikit_image():
    t = load_textures()
    assert t.shape == (len(V.TEXTURES), 512, 512)
    assert all(t[i].std() > 0.1 for i in range(len(t)))  # real photographs, not blanks


def test_maps_are_consistent(world):
    obj = world.instance > 0
    for m in (world.shape_map, world.colour_map, world.pattern_map):
        assert np.array_equal(m >= 0, obj)
    assert np.array_equal(world.background_map >= 0, ~obj)
    assert np.array_equal(world.background_map[~obj],
                          np.broadcast_to(world.background[:, None, None], obj.shape)[~obj])
    assert world.target_mask.reshape(len(world), -1).any(1).all()
    # the target is the only class pair in every image
    o = world.objects
    for i in range(len(world)):
        assert V.class_of(o["shape"][i, 0], o["colour"][i, 0]) == world.labels[i]
        for k in range(1, o["present"].shape[1]):
            if o["present"][i, k]:
                assert V.class_of(o["shape"][i, k], o["colour"][i, k]) == -1
            else:
                assert not (world.instance[i] == k + 1).any()


def test_pixels_match_colour_and_background(world):
    h, s, _ = _hsv(world.images)
    obj = world.instance > 0
    hue_ref = np.asarray(V.COLOUR_HUES)[world.colour_map[obj]]
    dh = np.abs((h[obj] - hue_ref + 180) % 360 - 180)
    assert np.quantile(dh, 0.999) < world.config.hue_jitter + 4  # rounding to uint8 moves dark hues a bit
    assert s[obj].min() > 0.6
    bg = world.images[~obj].astype(int)
    assert (bg.max(-1) - bg.min(-1)).max() <= 0.12 * 255 + 2  # backgrounds are near-grey


def test_pattern_tones_and_shape_areas(world):
    o = world.objects
    for i in range(0, len(world), 7):
        for k in np.flatnonzero(o["present"][i]):
            m = world.instance[i] == k + 1
            colours = np.unique(world.images[i][m], axis=0)
            pattern = V.PATTERNS[o["pattern"][i, k]]
            assert len(colours) == (1 if pattern == "solid" else 2), (i, k, pattern)
            assert (world.pattern_map[i][m] == o["pattern"][i, k]).all()
            # box = bounding box of the mask
            ys, xs = np.nonzero(m)
            assert tuple(world.boxes[i, k]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # mask area agrees with the shape drawn at that radius
            r = o["radius"][i, k]
            expected = {"circle": np.pi, "ring": np.pi * (1 - 0.55 ** 2), "square": 1.64 ** 2,
                        "cross": 2 * 0.64 * 1.9 - 0.64 ** 2, "triangle": 3 * np.sqrt(3) / 4 * 1.1 ** 2,
                        "star": None}[V.SHAPES[o["shape"][i, k]]]
            if expected is not None:
                assert m.sum() == pytest.approx(expected * r * r, rel=0.15)


def test_class_balance():
    w = generate(1200, seed=2)
    assert np.array_equal(np.bincount(w.labels, minlength=12), np.full(12, 100))


def test_every_concept_occurs(world):
    for name, m, vocab in (("shape", world.shape_map, V.SHAPES), ("colour", world.colour_map, V.COLOURS),
                           ("pattern", world.pattern_map, V.PATTERNS),
                           ("background", world.background_map, V.BACKGROUNDS)):
        assert set(np.unique(m[m >= 0])) == set(range(len(vocab))), name
    assert set(world.labels) == set(range(12))
    # distractors share the target's shape or colour (the binding is what decides the class)
    o = world.objects
    pres = o["present"][:, 1:]
    assert (o["shape"][:, 1:] == o["shape"][:, :1])[pres].mean() > 0.3
    assert (o["colour"][:, 1:] == o["colour"][:, :1])[pres].mean() > 0.3
    voc = vocabulary()
    assert [c["name"] for c in voc["classes"]] == list(CLASS_NAMES)
    # each shape and each colour is in exactly two classes
    assert np.bincount([s for s, _ in V.CLASS_PAIRS]).tolist() == [2] * 6
    assert np.bincount([c for _, c in V.CLASS_PAIRS]).tolist() == [2] * 6


def test_config_size_and_errors():
    w = generate(8, seed=1, size=96)
    assert w.images.shape == (8, 96, 96, 3)
    with pytest.raises(SaeCafeError, match="radius"):
        generate(2, config=WorldConfig(radius=(0.2, 0.3)))
    with pytest.raises(SaeCafeError, match="distractors"):
        generate(2, config=WorldConfig(max_distractors=4))


def test_export_round_trip(tmp_path):
    w = generate(36, seed=4)
    path = write_world("r", world=w, root=tmp_path)
    assert path == tmp_path / "r" / "world"
    assert read_manifest(path, "world")["config"]["n"] == 36
    assert not list(path.parent.glob(".*tmp*"))
    files = iter_image_files(path / "images")
    assert len(files) == 36
    rows = json.loads((path / "labels.json").read_text())
    by_file = {r["file"]: r for r in rows}
    for f, cls in files:
        assert by_file[f.relative_to(path).as_posix()]["class_name"] == cls
    ds = load_world(tmp_path / "r")
    assert len(ds) == 36 and ds.images_dir == path / "images"
    for k in ("images", "labels", "instance", "shape_map", "colour_map", "pattern_map", "background_map",
              "boxes"):
        assert np.array_equal(getattr(ds.world, k), getattr(w, k)), k
    s = ds[3]
    assert s.class_name == CLASS_NAMES[w.labels[3]] and s.image.shape == (64, 64, 3)
    assert np.array_equal(s.target_mask, w.instance[3] == 1)
    assert set(s.attributes) == {"shape", "colour", "pattern", "background"}
    batches = list(ds.iter_batches(16))
    assert [len(b["labels"]) for b in batches] == [16, 16, 4]
    assert batches[0]["target_mask"].shape == (16, 64, 64)


def test_cli_make_world(tmp_path, capsys):
    from sae_cafe.cli import main

    assert main(["make-world", "--run", "c", "--n", "24", "--seed", "3", "--root", str(tmp_path)]) == 0
    ds = load_world(tmp_path / "c" / "world")
    assert np.array_equal(ds.world.images, generate(24, seed=3).images)
    assert "wrote 24 images" in capsys.readouterr().out
