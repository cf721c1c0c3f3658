"""The viewer shows Network Dissection labels (``sae-cafe dissect`` output, ``<run>/dissection/<model>/<layer>``)
beside the CAFE stage's own labels: the data layer (``app.dissection`` read through ``app.data.dissection``,
cached, checked against the stage), the latent browser (columns, IoU filter and sort, the hint when there is no
dissection) through ``AppTest``, and the card text in real headless Chromium (``app.browser``) on a small run
built by the real pipeline (world → CAFE stage with a random SAE → ``sae-cafe dissect`` in process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_dissection_cli import run_cli  # the `sae-cafe dissect` parser, as the CLI tests build it

from app import data as D
from app.dissection import agree, describe, mismatch, read_dissection
from sae_cafe.concepts.dissection import Dissection, _labels, write_dissection
from sae_cafe.concepts.label import ConceptLabel, read_labels
from sae_cafe.errors import ArtifactError

RUN, MODEL, LAYER = "d", "mini_resnet", "layer3"
TIMEOUT = 120


# ----- the data layer -----------------------------------------------------------------------------------------
def fake_dissection(out: Path, iou: dict[str, torch.Tensor], concepts=("grass", "red", "sky"), **meta) -> Path:
    """A dissection folder as ``write_dissection`` + the CLI write it, from given IoU tables (S, C)."""
    res = Dissection(tuple(concepts), iou, {k: torch.rand(v.shape[0]) for k, v in iou.items()},
                     {f"dissection-{k}": _labels(v, tuple(concepts), f"dissection-{k}", 0.04) for k, v in iou.items()},
                     0.005, 0.04, ["test"])
    write_dissection(res, out)
    doc = json.loads((out / "dissection.json").read_text())
    doc.update(meta)
    (out / "dissection.json").write_text(json.dumps(doc))
    return out


def test_data_layer_reads_checks_and_caches(tmp_path):
    root = tmp_path / "idx"
    stage = root / RUN / "cafe" / MODEL / LAYER
    stage.mkdir(parents=True)
    assert D.dissection(root, RUN, stage) is None  # not made: None (the viewer then shows the hint)
    g = torch.Generator().manual_seed(0)
    iou = {"act": torch.rand(6, 3, generator=g) * 0.2, "ierf": torch.rand(6, 3, generator=g) * 0.2}
    iou["act"][0] = torch.tensor([0.01, 0.3, 0.02])  # latent 0: "red"
    iou["act"][1] = torch.tensor([0.01, 0.02, 0.03])  # latent 1: below the detector threshold
    out = fake_dissection(root / RUN / "dissection" / MODEL / LAYER, iou, layer=LAYER, sae="/x/sae",
                          n_images=9, masks="/data/seg")
    dis = D.dissection(root, RUN, stage)
    assert dis.path == out.resolve() and dis.methods == ("act", "ierf") and dis.n_latents == 6
    for m in ("act", "ierf"):
        np.testing.assert_allclose(dis.best_iou[m], iou[m].max(1).values.numpy(), rtol=0, atol=1e-7)
        assert dis.best_concept[m] == tuple(("grass", "red", "sky")[int(c)] for c in iou[m].argmax(1))
        assert [dis.label(s, m).name for s in range(6)] == [lab.name for lab in
                                                          read_labels(out, f"dissection-{m}").values()]
    assert dis.label(0).name == "red" and not dis.label(1).labelled
    assert D.dissection(root, RUN, stage) is dis  # cached …
    # agreement with the stage's own label, and the card line
    own = ConceptLabel(0, "Red", "colour", 0, 0.5, 0.7, "calibration.json:ierf", "ierf")
    other = ConceptLabel(0, "circle", "shape", 0, 0.5, 0.7, "calibration.json:ierf", "ierf")
    assert agree(own, dis.label(0)) is True and agree(other, dis.label(0)) is False
    assert agree(None, dis.label(0)) is None and agree(own, dis.label(1)) is None
    line = describe(dis, 0, own, "act")
    assert line.startswith("**dissection (activation map): red** · IoU 0.300") and "agrees" in line
    assert f"T = {float(dis.thresholds['act'][0]):.3g}" in line and "IoU ≥ 0.04" in line
    assert "differs** from the label (circle)" in describe(dis, 0, other, "act")
    assert "no concept — best IoU 0.030 (sky) is below 0.04" in describe(dis, 1, own, "act")
    # checked against the CAFE stage: latent count and layer are errors, another SAE folder a warning
    assert mismatch(dis, {"layer": LAYER, "sae_path": "/x/sae"}, 6) == (None, None)
    assert "labels 6 latents, the CAFE stage has 8" in mismatch(dis, {"layer": LAYER}, 8)[0]
    assert "of layer 'layer3', the CAFE stage of 'layer2'" in mismatch(dis, {"layer": "layer2"}, 6)[0]
    assert "the dissection used the SAE /x/sae" in mismatch(dis, {"layer": LAYER, "sae_path": "/y/sae"}, 6)[1]
    # … until it is rewritten (new mtime of dissection.json)
    iou2 = {"act": iou["act"].flip(0)}
    shutil.rmtree(out)
    fake_dissection(out, iou2, layer=LAYER)
    import os

    os.utime(out / "dissection.json", (1e9, 1e9))
    dis2 = D.dissection(root, RUN, stage)
    assert dis2 is not dis and dis2.methods == ("act",) and dis2.label(5).name == "red"
    # damaged folders: clear errors naming the file and the command
    (out / "iou.safetensors").unlink()
    with pytest.raises(ArtifactError, match="lacks iou.safetensors; rerun `sae-cafe dissect`"):
        read_dissection(out)
    fake_dissection(out, iou2)
    (out / "labels.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        read_dissection(out)
    # a dissection folder that links out of the root is not read
    shutil.rmtree(out)
    fake_dissection(tmp_path / "elsewhere", iou)
    out.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(D.PathEscapeError):
        D.dissection(root, RUN, stage)


# ----- a small run, dissected by the CLI ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """``<root>/d``: a 12-scene world, a CAFE stage of mini_resnet layer3 with a random 16-latent TopK SAE (with
    world labels), and ``<root>/seg`` (the same scenes as a segmentation folder); ``<root>/plain``: the same run
    without a dissection."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_cafe.artifacts import stage_path
    from sae_cafe.cafe import build_cafe
    from sae_cafe.concepts.dissection import export_world_segmentation
    from sae_cafe.models import load_model
    from sae_cafe.saes import load_sae
    from sae_cafe.world import load_world, write_world

    root = tmp_path_factory.mktemp("dissect_view")
    ds = load_world(write_world(RUN, n=12, seed=0, root=root))
    ad = load_model(MODEL)
    sae_dir = stage_path(RUN, "saes", MODEL, LAYER, root=root)
    torch.manual_seed(0)
    TopKSAE(TopKSAEConfig(d_in=ad.layer(LAYER).channels, d_sae=16, k=4)).eval().save_model(sae_dir)
    w = ds.world
    build_cafe(ad, load_sae(sae_dir, ad, LAYER), LAYER, ds.images_dir, run=RUN, root=root, k=3, n_sample=0,
               batch_size=12, progress=False, attributes={"shape": w.shape_map, "colour": w.colour_map},
               extra_manifest={"sae_path": str(sae_dir)})
    export_world_segmentation(w, root / "seg")
    plain = root.parent / f"{root.name}_plain"
    shutil.copytree(root, plain, symlinks=True, ignore=shutil.ignore_patterns("seg"))
    assert run_cli(["dissect", "--run", RUN, "--root", str(root), "--model", MODEL, "--layer", LAYER, "--masks",
                        str(root / "seg"), "--quantile", "0.02", "--iou-min", "0.01"]) == 0
    return root, plain


def page(root: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app.cli import APP

    monkeypatch.setenv("SAE_CAFE_VIEW_ROOT", str(root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.switch_page("pages/1_Latent_browser.py")
    return at.run(timeout=TIMEOUT)


def ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def texts(at) -> str:
    return "\n".join(e.value for kind in ("markdown", "caption", "warning", "info") for e in at.get(kind))


def test_latent_browser_columns_filter_and_hint(run_root, monkeypatch):
    pytest.importorskip("streamlit.testing.v1")
    root, plain = run_root
    stage = root / RUN / "cafe" / MODEL / LAYER
    dis = read_dissection(root / RUN / "dissection" / MODEL / LAYER)
    own = read_labels(stage)
    at = page(root, monkeypatch)
    ok(at)
    t = at.dataframe[0].value
    assert {"dissection", "dissection_iou", "agrees"} <= set(t.columns)
    assert len(t) == dis.n_latents
    for _, r in t.iterrows():
        s = int(r["latent"])
        assert r["dissection_iou"] == pytest.approx(float(dis.best_iou["act"][s]), abs=1e-4)
        assert (None if pd.isna(r["dissection"]) else r["dissection"]) == (dis.label(s).name or None)
        a = agree(own.get(s), dis.label(s))
        assert (None if pd.isna(r["agrees"]) else r["agrees"]) == (None if a is None else "yes" if a else "no")
    assert set(t["agrees"].dropna()) and any(dis.label(s).labelled for s in range(dis.n_latents))
    # filter by IoU, then sort by it
    cut = round(float(np.median(dis.best_iou["act"])), 3)
    at.number_input(key="lb_min_iou").set_value(cut).run(timeout=TIMEOUT)
    at.selectbox(key="lb_sort").set_value("dissection_iou").run(timeout=TIMEOUT)
    ok(at)
    t = at.dataframe[0].value
    assert sorted(t["latent"]) == [s for s in range(dis.n_latents) if round(dis.best_iou["act"][s], 4) >= cut]
    assert 0 < len(t) < dis.n_latents and list(t["dissection_iou"]) == sorted(t["dissection_iou"], reverse=True)
    latent = int(t["latent"].iloc[0])
    at.number_input(key="lb_latent").set_value(latent).run(timeout=TIMEOUT)
    ok(at)
    assert describe(dis, latent, own.get(latent), "act") in texts(at)
    # a run without a dissection: no columns, the card says how to make them
    at = page(plain, monkeypatch)
    ok(at)
    assert "dissection" not in set(at.dataframe[0].value.columns)
    assert f"sae-cafe dissect --run {RUN} --root {plain.resolve()} --model {MODEL} --layer {LAYER}" in texts(at)


@pytest.mark.slow
def test_card_shows_the_dissection_label_in_chromium(run_root, tmp_path):
    from app.browser import browser, check_page, unavailable, viewer

    if unavailable() is not None:
        pytest.skip(f"{unavailable()}; CI installs them")
    from selenium.webdriver.common.by import By

    root, _ = run_root
    dis = read_dissection(root / RUN / "dissection" / MODEL / LAYER)
    own = read_labels(root / RUN / "cafe" / MODEL / LAYER)
    with viewer(root, tmp_path / "streamlit.log") as server, browser(tmp_path / "profile") as driver:
        driver.get(f"{server.url}/Latent_browser")
        body = check_page(driver, "Latent browser", '[data-testid="stImage"] img', 3)
        title = next(h.text for h in driver.find_elements(By.TAG_NAME, "h3") if h.text.startswith("Latent "))
        latent = int(title.split()[1])
    lab = dis.label(latent)
    assert lab.labelled, "the card's latent has no dissection label; lower --iou-min in the fixture"
    a = agree(own.get(latent), lab)
    assert f"dissection (activation map): {lab.name} · IoU {float(dis.best_iou['act'][latent]):.3f}" in body
    if a is not None:
        assert ("agrees with the label" if a else f"differs from the label ({own[latent].name})") in body
    n = sum(x.labelled for x in dis.labels["act"].values())
    assert f"dissection: {n} of {dis.n_latents} latents labelled" in body
