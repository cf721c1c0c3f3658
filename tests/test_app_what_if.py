"""The Image explorer's "what if" panel (``app/what_if.py``) through Streamlit's AppTest on a tiny run built by the
real pipeline: it waits for the model run, offers the latents active on the image, and the logits it shows
after ablating a latent equal an independent computation (the latent's decoder contribution removed by hand,
then the rest of the network); scale 1 changes nothing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("streamlit.testing.v1")

from streamlit.testing.v1 import AppTest  # noqa: E402

from app.cli import APP  # noqa: E402

TIMEOUT = 180


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    from app.sample import build_sample_run

    root = tmp_path_factory.mktemp("what_if_idx")
    build_sample_run(root, "tiny")
    return root


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def expected_logits(root, latent: int, image_file):
    """Independent reference: layer3 output minus a_k · W_dec[k], then the layers above (float64)."""
    import torch
    from PIL import Image

    from app import data as D
    from sae_cafe.saes import encode_layer, load_sae

    ad = D.run_model(root, "tiny", "mini_resnet")
    sae = load_sae(root / "tiny" / "saes" / "mini_resnet" / "layer3", ad, "layer3")
    x = ad.preprocess(Image.open(image_file).convert("RGB"))
    with torch.no_grad():
        act = ad.capture(x, ["layer3"])["layer3"]
        a = encode_layer(sae, ad, act)[..., latent]  # (1, h, w)
        edited = act - a[:, None] * sae.W_dec[latent][None, :, None, None].to(act)
        return ad(x)[0], ad.forward_from("layer3", edited, x)[0], ad.class_names


@pytest.mark.slow
def test_what_if_panel(sample_root, monkeypatch):
    monkeypatch.setenv("SAE_CAFE_VIEW_ROOT", str(sample_root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.switch_page("pages/2_Image_explorer.py")
    at.run(timeout=TIMEOUT)
    ok(at)
    assert any("What if" in s.value for s in at.subheader)
    assert any("Run the model on this image first" in i.value for i in at.info)
    at.button(key="ie_run").click().run(timeout=TIMEOUT)
    ok(at)
    assert "layer3" in str(at.selectbox(key="ie_stage").value)  # the reference below uses layer3
    choices = at.selectbox(key="wi_latent").options
    assert choices, "no active latent offered"
    latent = int(choices[0])
    # scale 1: a no-op, every logit change is exactly 0
    at.slider(key="wi_scale").set_value(1.0)
    at.button(key="wi_run").click().run(timeout=TIMEOUT)
    ok(at)
    table = next(d.value for d in at.dataframe if "logit after" in d.value.columns)
    assert (table["change"] == 0).all()
    # scale 0: ablation, checked against the hand-written reference
    at.slider(key="wi_scale").set_value(0.0)
    at.button(key="wi_run").click().run(timeout=TIMEOUT)
    ok(at)
    table = next(d.value for d in at.dataframe if "logit after" in d.value.columns)
    labels = json.loads((sample_root / "tiny" / "world" / "labels.json").read_text())
    before, after, names = expected_logits(sample_root, latent, sample_root / "tiny" / "world" / labels[0]["file"])
    for _, r in table.iterrows():
        c = names.index(r["class"])
        assert r["logit before"] == pytest.approx(float(before[c]), abs=2e-4)
        assert r["logit after"] == pytest.approx(float(after[c]), abs=2e-4)
    assert (after - before).abs().max() > 1e-4, "ablating an active latent changed nothing"
    captions = [c for im in at.get("image") for c in im.captions]
    assert any(c.startswith("saliency '") and c.endswith("before") for c in captions)
    assert any(c.startswith("saliency '") and c.endswith("after") for c in captions)
