"""ICAT and the token kinds of an SAE: its rows are the patch tokens (class / register tokens frozen), so an
SAE trained on class tokens only (``metadata.sae_cafe.tokens == "cls"``) is refused early with a clear error,
as source, as target, for the baseline means and in ``build_icat`` (before any stage folder is written); an
SAE trained on all tokens is used on its patch rows, with the same scores as without the record."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_sae, tiny_vit

from sae_cafe.errors import MismatchError
from sae_cafe.icat import ICATConfig, attribute, build_icat, latent_means, prepare_pair
from sae_cafe.icat.graph import GraphConfig


def saes_with(tokens: dict[str, str]):
    out = {"0": random_sae(32, 48, 1), "1": random_sae(32, 48, 2)}
    for layer, kind in tokens.items():
        out[layer].cfg.metadata.sae_cafe = {"tokens": kind}
    return out


@pytest.mark.parametrize("cls_layer", ["0", "1"], ids=["source", "target"])
def test_class_token_only_sae_is_refused_naming_its_layer(cls_layer, tmp_path):
    ad = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    saes = saes_with({cls_layer: "cls"})
    layer = ad.resolve_layer(cls_layer)
    with pytest.raises(MismatchError, match=rf"SAE for layer '{layer}' .*class tokens only.*tokens 'patch' or 'all'"):
        prepare_pair(ad, saes, x, "0", "1")
    with pytest.raises(MismatchError, match="class tokens only"):
        attribute(ad, saes, x, "0", "1", method="grad")
    if cls_layer == "0":
        with pytest.raises(MismatchError, match="class tokens only"):
            prepare_pair(ad, saes, x, "0", "logits")
        with pytest.raises(MismatchError, match="class tokens only"):
            latent_means(ad, saes["0"], x, "0")
    cfg = ICATConfig(graph=GraphConfig(steps=2, top_k=2, max_nodes_per_layer=3), max_images_per_class=1)
    with pytest.raises(MismatchError, match="class tokens only"):
        build_icat(ad, saes, x, torch.tensor([0, 1]), "r", root=tmp_path, steps=2, config=cfg)
    assert not (tmp_path / "r" / "icat").exists()  # refused before any work


def test_all_token_sae_uses_its_patch_rows_in_float64():
    ad = tiny_vit()
    ad.model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plain = {k: s.double() for k, s in saes_with({}).items()}
    allt = {k: s.double() for k, s in saes_with({"0": "all", "1": "all"}).items()}
    a = attribute(ad, plain, x, "0", "1", method="ig", steps=4, targets=[0, 5])
    b = attribute(ad, allt, x, "0", "1", method="ig", steps=4, targets=[0, 5])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ctx = prepare_pair(ad, allt, x, "0", "1")
    assert ctx.a_BNS.shape == (2, 16, 48)  # the 4×4 patch tokens, not the class token
