"""The shipped ``own_model_quick.toml`` scaled down on a tiny own model (a torchvision ResNet whose weights are
saved to a file) and a tiny ImageFolder: the run completes, every stage records the model and its weights file,
and both ``sae-cafe query`` and the viewer use exactly those weights (a wrong file is refused, both hashes
named)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit.testing.v1")

from streamlit.testing.v1 import AppTest  # noqa: E402

from sae_cafe.artifacts import hash_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "own_tiny_resnet"
TIMEOUT = 120


def tiny_tv_resnet(num_classes: int = 10):
    """A torchvision ResNet (BasicBlock, one block per stage): the same adapter family as ResNet-50."""
    import torchvision

    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from PIL import Image

    from sae_cafe.models import registry
    from sae_cafe.world import generate
    from sae_training.pipeline import Run, load_config

    tmp = tmp_path_factory.mktemp("own_quick")
    mp = pytest.MonkeyPatch()
    mp.setitem(registry._FACTORIES, MODEL, tiny_tv_resnet)  # a registered own model, only for this module
    mp.setitem(registry._ADAPTER_KW, MODEL, {"input_size": (64, 64), "resize": None})
    torch.manual_seed(0)
    weights = tmp / "own.pth"
    torch.save(tiny_tv_resnet().state_dict(), weights)
    w = generate(12, seed=5)
    for i, im in enumerate(w.images):
        d = tmp / "images" / ("round" if i % 2 else "square")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"img_{i:02d}.png")
    # the image folder relative to the working directory, as a user writes it (the viewer runs elsewhere)
    mp.chdir(tmp)
    cfg = load_config(REPO / "configs" / "own_model_quick.toml",
                      {"root": str(tmp / "idx"), "run": "quick", "images": "images", "device": "cpu",
                       "max_images": 12, "srd_images": 2})
    mp.chdir(REPO)
    assert cfg.images == str(tmp.resolve() / "images")
    rep = dataclasses.replace
    cfg = rep(cfg, models=(rep(cfg.models[0], name=MODEL, weights=str(weights)),),
              sae=rep(cfg.sae, steps=20, seconds=20.0, batch_size=64, k=4),
              cafe=rep(cfg.cafe, k=3, cards=1), icat=rep(cfg.icat, n_images=12, per_class=2, steps=2),
              saliency=rep(cfg.saliency, n=2, subsets=4, n_fidelity=1, noise_samples=1))
    try:
        rc = Run(cfg).run()
        yield {"rc": rc, "root": tmp / "idx", "run": tmp / "idx" / "quick", "weights": weights, "tmp": tmp}
    finally:
        mp.undo()


def test_the_shipped_quick_config_is_the_packaged_one():
    from sae_training.pipeline import config_files, load_config

    assert (REPO / "configs" / "own_model_quick.toml").read_text() == config_files()["own_model_quick.toml"].read_text()
    cfg = load_config(REPO / "configs" / "own_model_quick.toml")
    assert cfg.models[0].name == "resnet50" and cfg.models[0].layers == ("layer3", "layer4")
    assert cfg.max_images == 40


def test_quick_run_records_the_model_and_its_weights(quick_run):
    assert quick_run["rc"] == 0, (quick_run["run"] / "demo_report.json").read_text()
    sha = hash_file(quick_run["weights"])
    recs = []
    for mf in quick_run["run"].glob("*/**/manifest.json"):
        m = json.loads(mf.read_text())
        if "model_record" in m:
            recs.append((mf.parent.relative_to(quick_run["run"]).parts[0], m["model_record"]))
    kinds = {k for k, _ in recs}
    assert {"cafe", "icat"} <= kinds, kinds
    for _, r in recs:
        assert r["name"] == MODEL and r["weights_sha256"] == sha and r["weights"] == str(quick_run["weights"])
    # the class push is timed inside its CAFE stage (benchmarks/bench_own_model_quick.py reports its share);
    # only layer4 sits under a linear head (avgpool + fc), layer3 is refused by the linearity check
    for layer, linear in (("layer3", False), ("layer4", True)):
        m = json.loads((quick_run["run"] / "cafe" / MODEL / layer / "manifest.json").read_text())
        assert m["has_class_push"] is linear and m["timings"]["class_push_s"] > 0


def test_quick_run_query_uses_the_run_weights(quick_run, capsys, tmp_path):
    from sae_cafe.cli import main

    img = next((quick_run["tmp"] / "images" / "round").glob("*.png"))
    common = ["query", "--run", "quick", "--root", str(quick_run["root"]), "--model", MODEL, "--layer", "layer4",
              "--image", str(img)]
    capsys.readouterr()
    assert main(common) == 0
    assert f"weights {quick_run['weights']}" in capsys.readouterr().out
    torch.manual_seed(1)
    wrong = tmp_path / "wrong.pth"
    torch.save(tiny_tv_resnet().state_dict(), wrong)
    assert main([*common, "--weights", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert hash_file(quick_run["weights"]) in err and hash_file(wrong) in err


def _page(root: Path, path: str | None, monkeypatch) -> AppTest:
    monkeypatch.setenv("SAE_CAFE_VIEW_ROOT", str(root))
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=TIMEOUT)
    if path:
        at.switch_page(path)
    return at.run(timeout=TIMEOUT)


def test_quick_run_viewer_pages_and_weights(quick_run, monkeypatch):
    from sae_cafe.models import load_model

    root = quick_run["root"]
    for path in (None, "pages/1_Latent_browser.py", "pages/3_Concept_graph.py", "pages/4_Metrics.py"):
        at = _page(root, path, monkeypatch)
        assert not at.exception and not at.error, (path, [e.value for e in [*at.exception, *at.error]])
        missing = [i.value for i in at.info if i.value.startswith("No ") and " in run " in i.value]
        assert not missing, (path, missing)  # every page populated (no "No <stage> in run ..." message)
    at = _page(root, "pages/1_Latent_browser.py", monkeypatch)
    assert not any("not readable" in w.value for w in at.warning)  # the user's exemplar images are shown
    # the image explorer: the user's images to pick, and the prediction of the run's own weights
    at = _page(root, "pages/2_Image_explorer.py", monkeypatch)
    assert not at.exception
    options = at.selectbox(key="ie_pick").options
    assert len(options) == 12 and all(".png" in o for o in options)
    at.button(key="ie_run").click().run(timeout=TIMEOUT)
    assert not at.exception and not at.error
    pred = next(d.value for d in at.dataframe if "probability" in d.value.columns)
    own = load_model(MODEL, weights=quick_run["weights"])
    from PIL import Image

    name = options[0].split(" · ")[0]
    src = quick_run["tmp"] / "images" / name
    with torch.no_grad():
        p = torch.softmax(own(own.preprocess(Image.open(src).convert("RGB"))), 1)[0]
    assert list(pred["probability"]) == [round(float(p[c]), 4) for c in torch.argsort(p, descending=True)[:5]]
    # a different file at the recorded path: refused with both hashes
    recorded = hash_file(quick_run["weights"])
    torch.manual_seed(2)
    torch.save(tiny_tv_resnet().state_dict(), quick_run["weights"])
    try:
        at = _page(root, "pages/2_Image_explorer.py", monkeypatch)
        msg = " ".join(w.value for w in at.warning)
        assert recorded in msg and hash_file(quick_run["weights"]) in msg
        assert not [b for b in at.button if b.key == "ie_run"]
    finally:
        torch.manual_seed(0)
        torch.save(tiny_tv_resnet().state_dict(), quick_run["weights"])
