"""End to end on foundation ViTs (issue 17 item 6): the generated image source, the two shipped configs, ICAT's
direction target on a headless backbone (checked against a linear head along the same direction), and the
viewer's pages in headless Chromium on a reduced run of ``configs/dinov2_small_hf.toml`` (Hugging Face
``Dinov2Model``, full depth, random weights saved to a file; 8 images and tiny SAE/CAFE/ICAT budgets)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny_models import random_sae

from app.browser import unavailable
from sae_cafe.errors import MismatchError, SaeCafeError
from sae_cafe.models import make_adapter
from sae_training.pipeline import load_config
from sae_training.pipeline.sources import RECORD, SKIMAGE_PHOTOS, materialize, parse

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("clip_vit_b16.toml", "dinov2_small_hf.toml")


# ----- the generated image source ------------------------------------------------------------------------------
def test_skimage_crops_written_once_deterministic_and_round_robin(tmp_path):
    a = materialize("skimage_crops:10:32", tmp_path / "a")
    b = materialize("skimage_crops:10:32", tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 10 and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # the same spec, the same bytes
    per_class = {}
    for f in files:
        per_class[f.parts[0]] = per_class.get(f.parts[0], 0) + 1
    assert set(per_class) == set(SKIMAGE_PHOTOS) and max(per_class.values()) - min(per_class.values()) <= 1
    from PIL import Image

    assert Image.open(a / files[0]).size == (32, 32)
    stamp = {f: (a / f).stat().st_mtime_ns for f in files}
    assert materialize("skimage_crops:10:32", a) == a  # already there: never rewritten (stage keys hash mtimes)
    assert {f: (a / f).stat().st_mtime_ns for f in files} == stamp
    materialize("skimage_crops:12:32", a)  # another spec: rewritten
    assert len(list(a.rglob("*.png"))) == 12 and json.loads((a / RECORD).read_text())["n"] == 12


@pytest.mark.parametrize("spec", ["skimage_crops", "skimage_crops:x", "skimage_crops:0", "skimage_crops:5:8",
                                  "nope:5", "skimage_crops:1:2:3"])
def test_bad_generated_source_is_a_clear_error(spec):
    with pytest.raises(SaeCafeError, match=r"images = .*skimage_crops:(N|200)"):
        parse(spec)


# ----- the shipped configs meet the minimums ------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_foundation_configs_meet_the_minimums(name):
    cfg = load_config(REPO / "configs" / name)
    assert (REPO / "sae_training" / "pipeline" / "configs" / name).read_text() == (REPO / "configs" / name).read_text()
    assert cfg.images.startswith("skimage_crops:") and parse(cfg.images)[1] >= 200 and parse(cfg.images)[2] == 224
    (m,) = cfg.models
    assert len(m.layers) == 2 and m.weights is None and m.icat and m.cafe
    sae = dataclasses.replace(cfg.sae, **m.sae)
    assert sae.d_sae is None and sae.expansion >= 2
    assert cfg.cafe.k == 8 and cfg.cafe.n_anchor == 8  # every exemplar gets its iERF
    assert m.target == ("mean_direction" if "dinov2" in name else "class")


def test_unknown_target_is_refused(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[models]]\nname = "mini_resnet"\nlayers = ["layer4"]\ntarget = "logit"\n')
    with pytest.raises(SaeCafeError, match="target must be one of"):
        load_config(p)


# ----- ICAT along a direction of a headless backbone -------------------------------------------------------------
def _headless_and_head(d: torch.Tensor):
    """A tiny headless timm ViT (pooled feature out) and the same network with a 1-output linear head along
    ``d`` (bias 0): its class-0 logit is ⟨pooled output, d⟩."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m0 = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0).eval()
    with torch.no_grad():  # no rule may hide behind the initialisation
        for mod in m0.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    m1 = copy.deepcopy(m0)
    m1.head = torch.nn.Linear(32, 1)
    with torch.no_grad():
        m1.head.weight.copy_(d[None])
        m1.head.bias.zero_()
    m1.num_classes = 1
    return make_adapter(m0, "tiny_headless", resize=None), make_adapter(m1.eval(), "tiny_dir_head", resize=None)


def test_icat_direction_target_equals_a_linear_head_along_it():
    from sae_cafe.icat import prepare_pair
    from sae_cafe.icat.graph import GraphConfig, build_graph

    d = torch.randn(32)
    a0, a1 = _headless_and_head(d)
    saes = {"blocks.0": random_sae(32, 64, 1), "blocks.1": random_sae(32, 64, 2)}
    x = torch.randn(3, 3, 32, 32)
    ctx = prepare_pair(a0, saes, x, "1", "logits", readout=d[None])
    torch.testing.assert_close(ctx.t_full_BT[:, 0], a0(x) @ d)
    cfg = GraphConfig(steps=8, top_k=4, max_nodes_per_layer=5, rel_threshold=0.0)
    g0 = build_graph(a0, saes, x, ["0", "1"], 0, cfg, readout=d[None], root_label="⟨output, d⟩")
    g1 = build_graph(a1, saes, x, ["0", "1"], 0, cfg)
    assert g0.nodes["logits:0"]["label"] == "⟨output, d⟩"
    assert set(g0.edges) == set(g1.edges) and len(g0.edges) >= 4
    for e in g0.edges:
        assert g0.edges[e]["weight"] == pytest.approx(g1.edges[e]["weight"], rel=1e-4, abs=1e-6)
    # and the check can fail: another direction gives other edges or weights
    g2 = build_graph(a0, saes, x, ["0", "1"], 0, cfg, readout=-d[None])
    assert set(g2.edges) != set(g1.edges) or any(
        abs(g2.edges[e]["weight"] - g1.edges[e]["weight"]) > 1e-3 for e in g1.edges)
    with pytest.raises(MismatchError, match="readout has shape"):
        prepare_pair(a0, saes, x, "1", "logits", readout=torch.randn(1, 7))


def test_build_icat_with_a_direction_writes_one_graph_and_the_direction(tmp_path):
    from safetensors.torch import load_file

    from sae_cafe.artifacts import read_manifest
    from sae_cafe.icat import ICATConfig, build_icat
    from sae_cafe.icat.graph import GraphConfig

    d = torch.randn(32)
    a0, _ = _headless_and_head(d)
    saes = {"blocks.0": random_sae(32, 64, 1), "blocks.1": random_sae(32, 64, 2)}
    cfg = ICATConfig(graph=GraphConfig(steps=2, top_k=2, max_nodes_per_layer=3), max_images_per_class=2)
    out = build_icat(a0, saes, torch.randn(4, 3, 32, 32), None, "r", root=tmp_path, steps=2, config=cfg,
                     direction=d, direction_name="d")
    man = read_manifest(out)
    assert man["target"]["kind"] == "direction" and man["cases"] == [] and man["accuracy"] is None
    torch.testing.assert_close(load_file(str(out / "direction.safetensors"))["direction"], d)
    routes = json.loads((out / "routes.json").read_text())
    assert list(routes) == ["0"] and routes["0"]["class_name"] == "d" and routes["0"]["n_images"] == 2
    assert sorted(p.name for p in (out / "graphs").glob("class_*.json")) == ["class_0.json"]


# ----- the viewer on a reduced DINOv2 run, in headless Chromium -------------------------------------------------
PAGES = [("", "sae-cafe viewer", '[data-testid="stDataFrame"]', 1),
         ("Latent_browser", "Latent browser", '[data-testid="stImage"] img', 3),
         ("Image_explorer", "Image explorer", '[data-testid="stImage"] img', 1),
         ("Concept_graph", "Concept graph", ".js-plotly-plot", 1),
         ("Metrics", "Metrics", '[data-testid="stDataFrame"]', 2)]


def build_reduced_dinov2_run(root: Path) -> Path:
    """``configs/dinov2_small_hf.toml`` at reduced size: 8 images, tiny budgets, random weights saved to a file
    (so the viewer can rebuild the model from the run's record)."""
    from safetensors.torch import save_file

    from sae_cafe.models import load_model
    from sae_training.pipeline import Run

    torch.manual_seed(0)
    weights = root / "dinov2_small_random.safetensors"
    hf = load_model("hf_dinov2_small").model.hf  # the transformers Dinov2Model inside the adapter's wrapper
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(weights))
    cfg = load_config(REPO / "configs" / "dinov2_small_hf.toml",
                      {"root": str(root), "run": "dino_tiny", "images": "skimage_crops:8", "srd_images": 2})
    (m,) = cfg.models
    cfg = dataclasses.replace(
        cfg, models=(dataclasses.replace(m, weights=str(weights)),),
        extract=dataclasses.replace(cfg.extract, positions_per_image=16),
        sae=dataclasses.replace(cfg.sae, expansion=1, steps=40, seconds=10.0, batch_size=64),
        cafe=dataclasses.replace(cfg.cafe, n_anchor=1, cards=2),
        icat=dataclasses.replace(cfg.icat, per_class=2, steps=2, max_nodes=3))
    assert Run(cfg).run() == 0
    return root / "dino_tiny"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_every_viewer_page_renders_on_a_headless_dinov2_run(tmp_path_factory):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from app.browser import browser, button, check_page, viewer

    root = tmp_path_factory.mktemp("foundation_view")
    run = build_reduced_dinov2_run(root)
    assert json.loads((run / "icat" / "hf_dinov2_small" / "manifest.json").read_text())["target"]["kind"] == "direction"
    with viewer(root, root / "streamlit.log") as server, browser(root / "chromium-profile") as driver:
        url = server.url
        for path, title, main, count in PAGES:
            driver.get(f"{url}/{path}")
            try:  # a busy machine renders slowly: wait longer than check_page's own waits
                WebDriverWait(driver, 600).until(lambda d, m=main, c=count: len(d.find_elements(By.CSS_SELECTOR, m))
                                                 >= c)
                body = check_page(driver, title, main, count)
            except TimeoutException:
                pytest.fail(f"page /{path}: no {count} × {main} within the wait; it shows:\n"
                            + driver.find_element(By.TAG_NAME, "body").text[:2000])
            if path == "":
                assert "Run dino_tiny" in body.replace("`", "")
            elif path == "Latent_browser":
                assert "hf.encoder.layer" in body and "Latent " in body  # a concept card with its exemplars
            elif path == "Image_explorer":
                button(driver, "Run ").click()  # waited for: see app.browser.button
                WebDriverWait(driver, 300).until(lambda d: "Latents active on this image" in
                                                 d.find_element(By.TAG_NAME, "body").text)
                body = check_page(driver, title, '[data-testid="stImage"] img', 4)
                assert "headless backbone" in body and "mean output direction" in body
            elif path == "Concept_graph":
                assert "mean output direction" in body and "Latent " in body  # the root and a node's card
            elif path == "Metrics":
                assert "CAFE" in body and "hf_dinov2_small" in body
