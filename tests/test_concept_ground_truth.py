"""Counterfactual ground truth and the four evidence types (issue 21) on a hand-built "red detector".

The tiny model is a plain conv net whose first (stride-4, 4×4) conv computes, per 4×4 patch, the mean of
``r − g − b`` (channel 0: positive only on red), ``b − r − g`` (channel 1: blue) and ``r + g + b`` (channel 2);
the SAE's latent 0 reads channel 0, latent 1 channel 1 and latent 2 is a constant (fires everywhere, depends
on nothing). So the ground truth of latent 0 is known: colour = red.
"""

import numpy as np
import pytest
import torch
from torch import nn

from sae_cafe.concepts.counterfactual import (
    GroundTruthRule,
    draw_scenes,
    ground_truth,
    label_correct,
    variants,
)
from sae_cafe.concepts.evidence import (
    EVIDENCE_TYPES,
    FRIConfig,
    LatentProbe,
    evidence_maps,
    fri_masks,
    recovery_share,
    world_tensor,
)
from sae_cafe.errors import MismatchError, SaeCafeError
from sae_cafe.models import make_adapter
from sae_cafe.world import generate
from sae_cafe.world import vocab as V

MEAN, STD = 0.46, 0.25


def colour_model():
    conv = nn.Conv2d(3, 3, 4, stride=4)
    with torch.no_grad():
        # pixel v = STD·x + MEAN; the conv averages a linear combination of v over the 4×4 patch
        comb = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])
        conv.weight.copy_((STD * comb / 16)[:, :, None, None].expand(3, 3, 4, 4))
        conv.bias.copy_(MEAN * comb.sum(1))
    m = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    return make_adapter(m, "tiny_colour", input_size=(64, 64), mean=(MEAN,) * 3, std=(STD,) * 3, resize=None)


def colour_sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=3, d_sae=3))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.W_enc[1, 1] = 1.0
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 1.0]))
        sae.b_dec.zero_()
    return sae.eval()


def to_x(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    adapter, sae = colour_model(), colour_sae()
    probe = LatentProbe(adapter, sae, "1")
    scenes = draw_scenes(96, seed=7)
    lat = probe.maps(to_x(scenes.images))  # (N, P, S)
    return adapter, sae, probe, scenes, lat


def top(lat, latent: int, k: int):
    best, arg = lat[:, :, latent].max(1)
    img = best.topk(k).indices
    return img.numpy(), arg[img].numpy()


def test_probe_is_the_project_encoder(setup):
    from sae_cafe.saes import encode_images

    adapter, sae, probe, scenes, lat = setup
    x = world_tensor(adapter, scenes.images[:5])
    assert torch.allclose(x, adapter.preprocess(list(scenes.images[:5])), atol=1e-5)
    _, ref, grid = encode_images(sae, adapter, "1", x)
    assert grid == probe.grid and torch.allclose(lat[:5], ref, atol=1e-6)
    assert torch.allclose(probe.encode_world(scenes.images[:5]), ref, atol=1e-6)
    latent, pos = torch.tensor([0, 1, 0, 2, 0]), torch.tensor([3, 100, 255, 7, 0])
    assert torch.allclose(probe(x, latent, pos), ref[torch.arange(5), pos, latent], atol=1e-6)
    with pytest.raises(MismatchError, match="uint8"):
        world_tensor(adapter, scenes.images[0])


def test_draw_scenes_are_the_generated_world():
    s = draw_scenes(20, seed=3)
    w = generate(20, seed=3)
    assert np.array_equal(s.images, w.images)
    assert np.array_equal(s.maps["colour"], w.colour_map) and np.array_equal(s.maps["background"], w.background_map)


def test_variants_change_exactly_one_attribute():
    s = draw_scenes(4, seed=1)
    q, meta = variants(s.params, 2)
    assert len(meta) == len(q["shape"]) - 1
    n_obj = int(s.params["present"][2].sum())
    assert len(meta) == n_obj * (5 + 5 + 3) + 3  # all other values of every attribute, plus backgrounds
    for r, (k, attr, v) in enumerate(meta, start=1):
        key = "bg" if attr == "background" else attr
        changed = {a for a in q if not np.array_equal(q[a][r], q[a][0])}
        assert changed == ({key, "hue"} if attr == "colour" else {key}), (attr, changed)
        got = q[key][r] if k < 0 else q[key][r, k]
        assert got == v
        if attr == "colour":  # the hue keeps its jitter offset
            off = q["hue"][r, k] - V.COLOUR_HUES[v]
            assert off == pytest.approx(q["hue"][0, k] - V.COLOUR_HUES[q["colour"][0, k]])
    short, meta2 = variants(s.params, 2, GroundTruthRule(max_values=1))
    assert len(meta2) == n_obj * 3 + 1


def test_ground_truth_finds_the_constructed_attribute(setup):
    adapter, sae, probe, scenes, lat = setup
    img0, pos0 = top(lat, 0, 4)
    img1, pos1 = top(lat, 1, 4)
    img2, pos2 = top(lat, 2, 2)
    ex_l = np.r_[[0] * 4, [1] * 4, [2] * 2]
    gt = ground_truth(probe.encode_world, scenes, np.array([0, 1, 2]), ex_l, np.r_[img0, img1, img2],
                      np.r_[pos0, pos1, pos2])
    red, blue, const = gt.labels
    assert (red["attribute"], red["value"], red["unlabeled"]) == ("colour", "red", False)
    assert red["drop"] > 0.9 and red["drops"]["colour"] > red["drops"]["pattern"] + 0.5
    assert (blue["attribute"], blue["value"]) == ("colour", "blue")
    assert const["unlabeled"] and const["attribute"] is None  # drop 0 < min_drop
    assert gt.exemplar_drop.shape == (10, 4) and (gt.activation[:8] > 0).all()
    assert label_correct(red, "colour", "red") and not label_correct(red, "shape", "circle")
    assert label_correct(red, "colour", "blue", match="attribute")
    assert label_correct(const, "colour", "red") is None


def test_pair_rule_and_bad_input():
    from sae_cafe.concepts.counterfactual import decide

    rule = GroundTruthRule(min_drop=0.3, pair_within=0.8)
    drop = np.array([[1.0, 0.9, 0.0, 0.0]] * 3)
    value = np.array([[0, 2, 1, 0]] * 3)
    g = decide(5, drop.mean(0), drop, value, rule)
    assert g["attribute"] == "shape" and g["pair"] == [("shape", "circle"), ("colour", "green")]
    assert label_correct(g, "colour", "green") and not label_correct(g, "colour", "red")
    g = decide(5, np.array([1.0, 0.7, 0, 0]), drop, value, rule)
    assert g["pair"] is None
    with pytest.raises(SaeCafeError, match="min_drop"):
        GroundTruthRule(min_drop=1.5)
    s = draw_scenes(2, seed=0)
    with pytest.raises(MismatchError, match="out of range"):
        ground_truth(lambda im: torch.zeros(len(im), 4, 1), s, np.array([0]), [0], [5], [0])


def test_evidence_maps_shapes_and_recovery(setup):
    adapter, sae, probe, scenes, lat = setup
    img, pos = top(lat, 0, 3)
    x = to_x(scenes.images[img])
    latent, p = torch.zeros(3, dtype=torch.long), torch.as_tensor(pos)
    for kind in EVIDENCE_TYPES:
        maps, secs, _ = evidence_maps(kind, probe, x, latent, p, FRIConfig(steps=15))
        assert maps.shape == (3, 64, 64) and torch.isfinite(maps).all() and secs >= 0, kind
        assert (maps.flatten(1).abs().sum(1) > 0).all(), kind
    # the latent at a position sees exactly its 4×4 patch: iERF and gradient live there
    ierf, _, _ = evidence_maps("ierf", probe, x, latent, p)
    grad, _, _ = evidence_maps("gradient", probe, x, latent, p)
    r, c = p // 16, p % 16
    for e in range(3):
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[4 * r[e]:4 * r[e] + 4, 4 * c[e]:4 * c[e] + 4] = True
        assert grad[e][~inside].abs().max() == 0 and grad[e][inside].sum() > 0
        assert ierf[e][inside].sum() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(SaeCafeError, match="unknown evidence"):
        evidence_maps("lime", probe, x, latent, p)


def test_fri_mask_recovers_on_a_trivial_case(setup):
    adapter, sae, probe, scenes, lat = setup
    img, pos = top(lat, 0, 2)
    x = to_x(scenes.images[img])
    latent, p = torch.zeros(2, dtype=torch.long), torch.as_tensor(pos)
    res = fri_masks(probe, x, latent, p, FRIConfig(patch=4, steps=30))
    assert (res["recovered"] >= 0.8).all()
    # one 4×4 patch holds everything the latent sees: the smallest support is that patch
    assert torch.allclose(res["support_share"], torch.full((2,), 1 / 256))
    assert res["soft"].shape == (2, 16, 16) and res["maps"].shape == (2, 64, 64)
    share = recovery_share(probe, x, latent, p, res["maps"])
    assert (share <= 0.01).all()
    wrong = recovery_share(probe, x, latent, p, -res["maps"])  # ranks the seen patch last
    assert (wrong > 0.5).all()
    with pytest.raises(SaeCafeError, match="divide"):
        fri_masks(probe, x, latent, p, FRIConfig(patch=5))


def test_labeller_names_the_red_latent(setup):
    from sae_cafe.concepts import label_latent

    adapter, sae, probe, scenes, lat = setup
    img, pos = top(lat, 0, 4)
    x = to_x(scenes.images[img])
    maps, _, _ = evidence_maps("ierf", probe, x, torch.zeros(4, dtype=torch.long), torch.as_tensor(pos))
    lab = label_latent(maps, scenes.maps, images=torch.as_tensor(img), latent=0, evidence="ierf")
    assert lab.name == "red"
