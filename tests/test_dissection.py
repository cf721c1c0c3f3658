"""Network Dissection on a segmentation folder (issue 21): a folder exported from the concept world (its
attribute maps as per-concept masks); a hand-built model whose latent 0 fires on red pixels and latent 1 on
green ones must get "red" / "green" from the activation-map version and the evidence (iERF) version; IoU
equals a direct float64 computation; the index-file formats and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sae_cafe.concepts import read_labels
from sae_cafe.concepts.dissection import (
    dissect,
    export_world_segmentation,
    load_segmentation,
    write_dissection,
)
from sae_cafe.errors import SaeCafeError
from sae_cafe.models import make_adapter
from sae_cafe.world import generate

torch.set_num_threads(1)
MEAN, STD = 0.46, 0.25


def colour_model():
    """1×1 conv → ReLU: channel 0 = R − G − B − 0.1 (red pixels), 1 = G − R − B − 0.1 (green), 2, 3 random; a
    3×3 conv, pooling and a linear head so that SRD has a class output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        comb = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]])
        conv.weight[:2] = (STD * comb)[:, :, None, None]  # raw pixel v = STD·x + MEAN
        conv.bias[:2] = MEAN * comb.sum(1) - 0.1
    m = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3)).eval()
    return make_adapter(m, "tiny_colour_dissect", input_size=(32, 32), mean=(MEAN,) * 3, std=(STD,) * 3, resize=None)


def identity_sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=4, d_sae=4))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    world = generate(24, seed=11, size=32)
    out = tmp_path_factory.mktemp("seg")
    return world, export_world_segmentation(world, out)


def test_exported_folder_holds_the_world_masks(folder):
    world, ds = folder
    assert len(ds) == 24 and "red" in ds.concepts and "grass background" in ds.concepts and "stripes" in ds.concepts
    m = ds.mask(3)
    assert m.shape == (len(ds.concepts), 32, 32)
    c = ds.concepts.index("red")
    assert np.array_equal(m[c], world.colour_map[3] == 0)
    assert np.array_equal(m.any(0), np.ones((32, 32), bool))  # every pixel is background or an object


def direct_iou(lat_maps, masks, quantile):
    """float64: per latent, T = m-th largest low-res value over all images, upsampled maps ≥ T (and > 0)."""
    N, S, h, w = lat_maps.shape
    m = math.ceil(quantile * N * h * w)
    out = np.zeros((S, masks.shape[1]))
    for s in range(S):
        vals = np.sort(lat_maps[:, s].reshape(-1))[::-1]
        T = vals[m - 1]
        up = torch.nn.functional.interpolate(torch.from_numpy(lat_maps[:, s:s + 1]).float(), size=masks.shape[-2:],
                                             mode="bilinear", align_corners=False)[:, 0].numpy()
        M = (up >= T) & (up > 0)
        for c in range(masks.shape[1]):
            inter = (M & masks[:, c]).sum()
            union = (M | masks[:, c]).sum()
            out[s, c] = inter / union if union else 0.0
    return out


def test_latents_built_for_a_colour_get_that_concept_in_both_versions(folder, tmp_path):
    from sae_cafe.cafe import build_cafe
    from sae_cafe.saes import encode_images

    world, ds = folder
    ad, sae = colour_model(), identity_sae()
    cafe = build_cafe(ad, sae, "1", [str(p) for p in ds.images], out_dir=tmp_path / "cafe", k=6, progress=False)
    res = dissect(ad, sae, "1", ds, cafe=cafe, quantile=0.02, iou_min=0.0, batch_size=8)
    for method in ("dissection-act", "dissection-ierf"):
        labs = res.labels[method]
        assert (labs[0].name, labs[1].name) == ("red", "green"), (method, labs[0], labs[1])
        assert labs[0].evidence == method and labs[0].attribute == "concept" and labs[0].confidence > 0
    # the activation version equals a direct computation over all pixels
    x = ad.preprocess([str(p) for p in ds.images])
    _, lat, grid = encode_images(sae, ad, "1", x)
    maps = lat.transpose(1, 2).reshape(len(ds), 4, *grid).double().numpy()
    masks = np.stack([ds.mask(i) for i in range(len(ds))])  # resize=None at 32 px: masks unchanged
    ref = direct_iou(maps, masks, 0.02)
    assert np.allclose(res.iou["act"].numpy(), ref, atol=1e-5)
    out = write_dissection(res, tmp_path / "dis")
    back = read_labels(out)
    assert back[0].name == "red" and read_labels(out, "dissection-ierf")[1].name == "green"
    assert json.loads((out / "dissection.json").read_text())["methods"] == ["act", "ierf"]


def test_iou_floor_leaves_latents_unlabelled(folder):
    _, ds = folder
    res = dissect(colour_model(), identity_sae(), "1", ds, quantile=0.02, iou_min=0.99)
    assert not any(lab.labelled for lab in res.labels["dissection-act"])
    assert "detector threshold" in res.labels["dissection-act"][0].note


def test_index_formats_and_errors(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    seg = np.zeros((8, 8), np.uint8)
    seg[:4] = 1
    seg[4:, :4] = 2
    Image.fromarray(seg).save(tmp_path / "a_seg.png")
    Image.fromarray((seg == 1).astype(np.uint8) * 255).save(tmp_path / "a_sky.png")
    (tmp_path / "index.json").write_text(json.dumps({"images": [
        {"image": "a.png", "label_map": "a_seg.png", "labels": {"1": "sky", "2": "grass"}}]}))
    ds = load_segmentation(tmp_path)
    assert ds.concepts == ("grass", "sky") and ds.format == "json"
    m = ds.mask(0)
    assert m[1].sum() == 32 and m[0].sum() == 16 and not (m[0] & m[1]).any()
    (tmp_path / "index.json").unlink()
    (tmp_path / "index.csv").write_text("image,mask,concept\na.png,a_sky.png,sky\n")
    ds = load_segmentation(tmp_path / "index.csv")
    assert ds.concepts == ("sky",) and np.array_equal(ds.mask(0)[0], seg == 1)
    (tmp_path / "index.csv").write_text("image,mask\na.png,a_sky.png\n")
    with pytest.raises(SaeCafeError, match="image,mask,concept"):
        load_segmentation(tmp_path)
    (tmp_path / "index.csv").write_text("image,mask,concept\na.png,nothere.png,sky\n")
    with pytest.raises(SaeCafeError, match="nothere.png does not exist"):
        load_segmentation(tmp_path).mask(0)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "index.csv").write_text("image,mask,concept\na.png,small.png,sky\n")
    with pytest.raises(SaeCafeError, match="must have their image's size"):
        load_segmentation(tmp_path).mask(0)
    (tmp_path / "sub").mkdir()
    with pytest.raises(SaeCafeError, match="images/ and masks/"):
        load_segmentation(tmp_path / "sub")
