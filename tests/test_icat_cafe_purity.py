"""CAFE's attribute purity records the (attribute, value) it names (used by ICAT's route purity): a
synthetic exemplar table with known iERF mass, no model needed."""

from __future__ import annotations

import torch

from sae_cafe.cafe.anchor import pack_maps
from sae_cafe.cafe.metrics import purity_attributes, purity_table


def _setup():
    H = W = 8
    # one image: colour 0 on the left half, colour 2 on the right half; shape 1 in the top rows
    colour = torch.zeros(1, H, W, dtype=torch.long)
    colour[:, :, W // 2:] = 2
    shape = torch.full((1, H, W), -1, dtype=torch.long)
    shape[:, :2] = 1
    attributes = {"shape": shape.numpy(), "colour": colour.numpy()}
    # latent 0: 4 exemplars with iERF mass on the right half rows 2..7 (colour 2, no shape);
    # latent 1: 4 exemplars with mass on the top rows (shape 1 over both colours); latent 2: one exemplar
    right = torch.zeros(H, W)
    right[2:, W // 2:] = 1
    top = torch.zeros(H, W)
    top[:2] = 1
    maps = torch.stack([right] * 4 + [top] * 4 + [right])
    ierf16, scale = pack_maps(maps)
    ex = {"ex_latent": torch.tensor([0] * 4 + [1] * 4 + [2]), "ex_rank": torch.tensor([0, 1, 2, 3] * 2 + [0]),
          "ex_image": torch.zeros(9, dtype=torch.long)}
    anchors = {"ierf16": ierf16, "ierf_scale": scale, "act_map": torch.ones(9, 2, 2)}
    return anchors, ex, attributes, (H, W)


def test_purity_table_records_the_attribute_it_names():
    anchors, ex, attributes, size = _setup()
    t = purity_table(anchors, ex, attributes, 4, size)
    assert t["purity_ierf"][0] == 1.0 and t["purity_ierf_attr"][0] == 1 and t["purity_ierf_value"][0] == 2
    assert t["purity_ierf"][1] == 1.0 and t["purity_ierf_attr"][1] == 0 and t["purity_ierf_value"][1] == 1
    # < 2 exemplars (latent 2) or none (latent 3): no purity, no attribute
    assert torch.isnan(t["purity_ierf"][2:]).all() and (t["purity_ierf_attr"][2:] == -1).all()
    assert (t["purity_ierf_value"][2:] == -1).all() and t["purity_ierf_attr"].dtype == torch.int64
    # the activation-map purity gets its own attribute (uniform maps: half the mass on each colour)
    assert t["purity_act_attr"][0] == 1 and abs(float(t["purity_act"][0]) - 0.5) < 1e-6


def test_purity_attributes_reads_names_from_the_manifest():
    anchors, ex, attributes, size = _setup()

    class FakeCafe:
        latents = purity_table(anchors, ex, attributes, 4, size)
        manifest = {"purity_attributes": list(attributes)}

    got = purity_attributes(FakeCafe())
    assert got == {0: {"attribute": "colour", "value": 2, "purity": 1.0},
                   1: {"attribute": "shape", "value": 1, "purity": 1.0}}
    FakeCafe.latents = {k: v for k, v in FakeCafe.latents.items() if not k.endswith(("_attr", "_value"))}
    assert purity_attributes(FakeCafe()) == {}  # a stage built before the attribute was stored
