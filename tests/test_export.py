"""Portable exports of a tiny run built by the real pipeline (``app.sample``): the Parquet exemplar ledger read
back with pandas and checked against the CAFE stage, the HTML atlas (size cap and thinning, cards, inline
graphs), both CLI subcommands, and the atlas opened from file:// in headless Chromium with zero network
requests (Chrome DevTools performance log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.browser import unavailable
from sae_cafe.cafe import load_cafe
from sae_cafe.errors import ArtifactError, SaeCafeError
from sae_cafe.export import export_html, export_ledger


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    from app.sample import build_sample_run

    root = tmp_path_factory.mktemp("export_run")
    build_sample_run(root, "tiny")
    return root


def stage(root: Path, layer: str = "layer3") -> Path:
    return root / "tiny" / "cafe" / "mini_resnet" / layer


def test_ledger_parquet_matches_the_stage(run_root, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from sae_cafe.cafe.metrics import top_mass_share

    out = export_ledger(stage(run_root), tmp_path / "ledger.parquet")
    df = pd.read_parquet(out)
    cafe = load_cafe(stage(run_root))
    assert len(df) == cafe.n_exemplars > 0
    assert {"model", "layer", "latent", "rank", "activation", "image_name", "image_path", "image_label", "row", "col",
            "label_attribute", "label_purity", "ierf_top10_share", "act_top10_share"} <= set(df.columns)
    assert (df["model"] == "mini_resnet").all() and (df["layer"] == "layer3").all()
    for _, r in df.sample(min(8, len(df)), random_state=0).iterrows():
        rec = cafe.record(int(r["exemplar"]))
        assert (rec.latent, rec.rank, rec.image_name, rec.row, rec.col) == (r["latent"], r["rank"], r["image_name"],
                                                                            r["row"], r["col"])
        assert r["activation"] == pytest.approx(rec.activation, rel=1e-6)
        assert Path(r["image_path"]).exists() and r["image_path"].endswith(rec.image_name)
        ierf = cafe.ierf(rec.id)
        assert r["ierf_top10_share"] == pytest.approx(float(top_mass_share(ierf)[0]), rel=1e-5)
        assert r["ierf_positive_mass"] == pytest.approx(float(ierf.clamp(min=0).sum()), rel=1e-5)
        assert r["image_label"] == str(cafe.images["labels"][rec.image])
    # rows are ordered by latent, then rank; activations fall with rank inside a latent
    assert df["latent"].is_monotonic_increasing
    for _, g in df.groupby("latent"):
        assert g["rank"].is_monotonic_increasing and g["activation"].is_monotonic_decreasing
    labelled = df.dropna(subset=["label_attribute"])
    assert len(labelled) and set(labelled["label_attribute"]) <= {"shape", "colour"}
    manifest = json.loads(pq.read_schema(out).metadata[b"sae_cafe.manifest"])
    assert manifest["layer"] == "layer3"
    with pytest.raises(SaeCafeError, match=r"\.parquet"):
        export_ledger(stage(run_root), tmp_path / "ledger.csv")
    with pytest.raises(ArtifactError):
        export_ledger(tmp_path / "nope", tmp_path / "x.parquet")


def test_cli_exports(run_root, tmp_path, capsys):
    import pandas as pd

    from sae_cafe.cli import main

    assert main(["export", "parquet", "--run", "tiny", "--root", str(run_root), "--out-dir", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("ledger_*.parquet"))
    assert [f.name for f in files] == ["ledger_mini_resnet_layer3.parquet", "ledger_mini_resnet_layer4.parquet"]
    assert len(pd.read_parquet(files[1])) == load_cafe(stage(run_root, "layer4")).n_exemplars
    html = tmp_path / "atlas.html"
    assert main(["export", "html", "--run", "tiny", "--root", str(run_root), "--out", str(html)]) == 0
    assert html.exists() and str(html) in capsys.readouterr().out
    both = tmp_path / "both"
    assert main(["export", "all", "--run", "tiny", "--root", str(both.parent / "nowhere")]) == 2
    assert main(["export", "all", "--run", "tiny", "--root", str(run_root)]) == 0
    export = run_root / "tiny" / "export"
    assert (export / "atlas.html").exists() and len(list(export.glob("ledger_*.parquet"))) == 2
    assert main(["export", "parquet", "--run", "missing", "--root", str(run_root)]) == 2
    assert "no CAFE stage" in capsys.readouterr().err


def test_html_atlas_content_and_cap(run_root, tmp_path):
    out = export_html("tiny", run_root, tmp_path / "a.html")
    text = out.read_text()
    n_latents = sum(load_cafe(stage(run_root, lay)).n_latents for lay in ("layer3", "layer4"))
    assert text.count('class="card"') == n_latents
    assert "default-src 'none'" in text and "<script" not in text
    icat = run_root / "tiny" / "icat"  # one SVG per class graph and per supernode-collapsed class graph
    n_graphs = len(list(icat.glob("*/graphs/class_*.json")))
    assert text.count("<svg") == n_graphs + len(list(icat.glob("*/graphs/supernodes/class_*.json"))) > n_graphs >= 1
    assert "collapsed onto supernodes" in text
    assert "data:image/png;base64," in text and "label:" in text
    graph = json.loads(next((run_root / "tiny" / "icat").glob("*/graphs/class_*.json")).read_text())
    latent_nodes = [n for n in graph["nodes"] if n.get("kind") == "latent"]
    assert latent_nodes
    for n in latent_nodes:  # every graph node links to a card that exists in the page
        anchor = f"card-mini_resnet-{n['layer']}-{n['latent']}"
        assert f'href="#{anchor}"' in text and f'id="{anchor}"' in text
    full = out.stat().st_size
    # a cap below the full size thins the exemplars and says so
    small = export_html("tiny", run_root, tmp_path / "b.html", max_bytes=int(full * 0.6))
    assert small.stat().st_size <= int(full * 0.6)
    assert "exemplars thinned from 6 to" in small.read_text()
    with pytest.raises(SaeCafeError, match="over the .* cap"):
        export_html("tiny", run_root, tmp_path / "c.html", max_bytes=1000)
    with pytest.raises(ArtifactError, match="not found"):
        export_html("missing", run_root)


@pytest.mark.slow
@pytest.mark.skipif(unavailable(streamlit=False) is not None, reason=str(unavailable(streamlit=False)))
def test_html_atlas_in_headless_chromium_makes_no_network_request(run_root, tmp_path):
    from selenium.webdriver.common.by import By

    from app.browser import chromium

    out = export_html("tiny", run_root, tmp_path / "atlas.html")
    driver = chromium(tmp_path / "profile", performance_log=True)
    try:
        driver.get("about:blank")
        driver.get_log("performance")  # drain: the browser's own start-up pages are not the atlas's requests
        driver.get(out.as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, "div.card")
        n_latents = sum(load_cafe(stage(run_root, lay)).n_latents for lay in ("layer3", "layer4"))
        assert len(cards) == n_latents and cards[0].find_element(By.TAG_NAME, "h3").text.startswith("Latent ")
        imgs = driver.find_elements(By.CSS_SELECTOR, "div.card img")
        assert imgs and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                            for i in imgs[:20]), "exemplar images did not decode"
        assert driver.find_elements(By.CSS_SELECTOR, "svg circle")
        urls = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
    finally:
        driver.quit()
    assert any(u.startswith("file:") for u in urls), "the performance log recorded no request at all"
    network = [u for u in urls if not u.startswith(("data:", "file:"))]
    assert network == [], f"the atlas made network requests: {network[:5]}"
