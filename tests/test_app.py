"""The Streamlit viewer (``app/``): path confinement and upload checks (pure functions), the CLI, and every page
through ``streamlit.testing.v1.AppTest`` on a tiny run built by the real pipeline (world → activations →
SAEs → CAFE → ICAT → saliency benchmark)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("streamlit.testing.v1")

from streamlit.testing.v1 import AppTest  # noqa: E402

from app import data as D  # noqa: E402
from app.cli import APP, command  # noqa: E402

TIMEOUT = 120  # seconds per script run (busy shared CPU; a page takes 1–15 s)
PAGES = {"home": None, "latents": "pages/1_Latent_browser.py", "images": "pages/2_Image_explorer.py",
         "graph": "pages/3_Concept_graph.py", "metrics": "pages/4_Metrics.py"}


# ----- pure functions ----------------------------------------------------------------------------------------
def test_confine_accepts_paths_inside(tmp_path):
    (tmp_path / "run" / "cafe").mkdir(parents=True)
    assert D.confine(tmp_path, "run/cafe") == (tmp_path / "run" / "cafe").resolve()
    assert D.confine(tmp_path, "") == tmp_path.resolve()
    assert D.confine(tmp_path, "run/./cafe/x.json") == (tmp_path / "run/cafe/x.json").resolve()
    (tmp_path / "link").symlink_to(tmp_path / "run")  # a symlink that stays inside is fine
    assert D.confine(tmp_path, "link/cafe") == (tmp_path / "run" / "cafe").resolve()


@pytest.mark.parametrize("bad", ["..", "../x", "run/../../etc", "run/..", "/etc/passwd", "\\\\server\\share",
                                 "C:\\Windows", "C:/x", "a\x00b", "run\\..\\..\\x"])
def test_confine_rejects_escapes(tmp_path, bad):
    with pytest.raises(D.PathEscapeError, match="root|NUL"):
        D.confine(tmp_path, bad)


def test_confine_rejects_symlink_escape(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (root / "evil").symlink_to(outside)
    (root / "evil_file.json").symlink_to(outside / "secret.json")
    for rel in ("evil", "evil/secret.json", "evil_file.json"):
        with pytest.raises(D.PathEscapeError, match="leaves the artifact root"):
            D.confine(root, rel)
    with pytest.raises(D.PathEscapeError, match="outside the artifact root"):
        D.inside(root, outside / "secret.json")
    assert D.inside(root, root / "x") == (root / "x").resolve()


def test_upload_checks(tmp_path):
    D.check_upload("a.PNG", 1000)
    with pytest.raises(D.UploadError, match="limit is 10 MB"):
        D.check_upload("big.jpg", 10 * 2**20 + 1)
    for name in ("x.gif", "x.svg", "x", "x.png.exe"):
        with pytest.raises(D.UploadError, match="not accepted"):
            D.check_upload(name, 10)
    with pytest.raises(D.UploadError, match="empty"):
        D.check_upload("e.png", 0)
    with pytest.raises(D.UploadError, match="'bad.png'.*(corrupt|readable)"):
        D.read_upload("bad.png", b"not an image at all")
    with pytest.raises(D.UploadError, match="limit"):
        D.read_upload("huge.png", b"\0" * (10 * 2**20 + 1))
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (5, 4), (255, 0, 0, 128)).save(buf, format="PNG")
    img = D.read_upload("ok.png", buf.getvalue())
    assert img.size == (5, 4) and img.mode == "RGB"


def test_resolve_root_and_argv(tmp_path):
    (tmp_path / "r1" / "world").mkdir(parents=True)
    (tmp_path / "r2" / "cafe").mkdir(parents=True)
    (tmp_path / "notarun").mkdir()
    info = D.resolve_root(tmp_path)
    assert info.runs == ["r1", "r2"] and not info.fixed
    one = D.resolve_root(tmp_path / "r2")
    assert one.runs == ["r2"] and one.fixed and one.root == tmp_path.resolve()
    with pytest.raises(D.ArtifactError, match="does not exist"):
        D.resolve_root(tmp_path / "nope")
    assert D.root_from_argv(["--root", "/x"]) == "/x"
    assert D.root_from_argv(["--root=/y"]) == "/y"


def test_cli_view(tmp_path, capsys):
    from sae_cafe.cli import main

    cmd = command(tmp_path, port=8600)
    assert APP.exists() and str(APP) in cmd and cmd[-2:] == ["--root", str(tmp_path.resolve())]
    assert "--server.maxUploadSize" in cmd
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["view", str(tmp_path)]) == 2  # an empty root: nothing to show
    assert "no runs found" in capsys.readouterr().err


# ----- pages on a real tiny run --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    from app.sample import build_sample_run

    root = tmp_path_factory.mktemp("viewer_idx")
    build_sample_run(root, "tiny")
    return root


def page(root: Path, name: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("SAE_CAFE_VIEW_ROOT", str(root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if PAGES[name]:
        at.switch_page(PAGES[name])
    return at.run(timeout=TIMEOUT)


def frame(at: AppTest, column: str):
    """The first dataframe shown with ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_home(sample_root, monkeypatch):
    at = page(sample_root, "home", monkeypatch)
    ok(at)
    stages = {r for r in at.dataframe[0].value["stage"]}
    assert stages == {"world", "acts", "saes", "cafe", "icat", "saliency"}
    assert len(at.dataframe[0].value) == 1 + 2 + 2 + 2 + 1 + 1


def test_latent_browser(sample_root, monkeypatch):
    from sae_cafe.cafe import load_cafe

    cafe = load_cafe(sample_root / "tiny" / "cafe" / "mini_resnet" / "layer3")
    d_sae = json.loads((sample_root / "tiny" / "saes" / "mini_resnet" / "layer3" / "cfg.json").read_text())["d_sae"]
    k = cafe.manifest["config"]["k"]
    at = page(sample_root, "latents", monkeypatch)
    ok(at)
    table = at.dataframe[0].value
    assert len(table) == d_sae == cafe.n_latents
    assert {"latent", "firing_frequency", "concentration_ierf", "purity_ierf"} <= set(table.columns)
    assert list(table["firing_frequency"]) == sorted(table["firing_frequency"], reverse=True)
    # pick the latent with the most exemplars: its card shows k (image, activation map, iERF) triplets
    latent = max(range(cafe.n_latents), key=lambda s: (len(cafe.exemplar_ids(s)), -s))
    n_ex = len(cafe.exemplar_ids(latent))
    assert n_ex == k
    at.number_input(key="lb_latent").set_value(latent).run(timeout=TIMEOUT)
    ok(at)
    assert any(f"Latent {latent}" in s.value for s in at.subheader)
    triplets = [im for im in at.get("image") if len(im.value) == 3]
    assert len(triplets) == k
    assert all(im.captions[1:] == ["activation map", "iERF"] for im in triplets)
    nn = frame(at, "cosine")  # nearest latents from the FAISS decoder index
    assert 0 < len(nn) <= 5 and latent not in set(nn["latent"])
    # search by latent id
    at.text_input(key="lb_search").input(str(latent)).run(timeout=TIMEOUT)
    ok(at)
    assert list(at.dataframe[0].value["latent"]) == [latent]


def test_image_explorer_runs_model_only_on_request(sample_root, monkeypatch):
    at = page(sample_root, "images", monkeypatch)
    ok(at)
    assert not at.subheader or all("Prediction" not in s.value for s in at.subheader)  # nothing ran yet
    at.button(key="ie_run").click().run(timeout=TIMEOUT)
    ok(at)
    heads = [s.value for s in at.subheader]
    assert "Prediction" in heads and any("Latents active" in h for h in heads)
    pred = frame(at, "probability")
    assert len(pred) == 5 and abs(sum(pred["probability"]) - 1) < 0.5
    captions = [c for im in at.get("image") for c in im.captions]
    assert "saliency (SRD)" in captions and any(c.startswith("relevance layer3") for c in captions)
    assert any(c == "iERF" for c in captions)
    at.number_input(key="ie_x1").set_value(32)
    at.number_input(key="ie_y1").set_value(32)
    at.button(key="ie_query").click().run(timeout=TIMEOUT)
    ok(at)
    assert len(frame(at, "hits")) >= 1


def test_image_explorer_uses_the_runs_weights_and_refuses_others(sample_root, tmp_path, monkeypatch):
    """The model the explorer runs is the run's recorded model with its weights file (not the shipped or a
    random network); a changed weights file or a random-weights run is refused with a message."""
    import torch
    from PIL import Image

    from sae_cafe.artifacts import hash_file
    from sae_cafe.model_record import record_for
    from sae_cafe.models import load_model

    run = tmp_path / "idx" / "tiny"
    for kind in ("world", "cafe"):
        shutil.copytree(sample_root / "tiny" / kind, run / kind)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if k.endswith(("weight", "bias")) else v
          for k, v in load_model("mini_resnet").model.state_dict().items()}  # a user's own (fine-tuned) weights
    w = tmp_path / "user.pth"
    torch.save(sd, w)
    own = load_model("mini_resnet", weights=w)

    def set_record(rec: dict) -> None:
        for mf in (run / "cafe").glob("*/*/manifest.json"):
            m = json.loads(mf.read_text())
            m["model_record"] = rec
            mf.write_text(json.dumps(m))

    set_record(record_for(own).to_json())
    at = page(tmp_path / "idx", "images", monkeypatch)
    ok(at)
    at.button(key="ie_run").click().run(timeout=TIMEOUT)
    ok(at)
    pred = frame(at, "probability")
    first = json.loads((run / "world" / "labels.json").read_text())[0]
    x = own.preprocess(Image.open(run / "world" / first["file"]).convert("RGB"))
    with torch.no_grad():
        p = torch.softmax(own(x), 1)[0]
    top = torch.argsort(p, descending=True)[:5].tolist()
    assert list(pred["class"]) == [own.class_names[c] for c in top]
    assert list(pred["probability"]) == [round(float(p[c]), 4) for c in top]
    shipped = load_model("mini_resnet")
    with torch.no_grad():
        assert torch.argsort(torch.softmax(shipped(x), 1)[0], descending=True)[:5].tolist() != top or \
            not torch.allclose(torch.softmax(shipped(x), 1)[0], p)
    # the weights file changed since the run was built: refused, both hashes named, nothing runs
    recorded = hash_file(w)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in sd.items()}, w)
    at = page(tmp_path / "idx", "images", monkeypatch)
    assert not at.exception
    msg = " ".join(m.value for m in at.warning)
    assert recorded in msg and hash_file(w) in msg
    assert not [b for b in at.button if b.key == "ie_run"]
    # a run built from random weights that were never saved: refused, never a fresh random network
    set_record({"name": "mini_resnet", "weights": None, "weights_sha256": None, "random_weights": True,
                "state_sha256": "0" * 64})
    at = page(tmp_path / "idx", "images", monkeypatch)
    assert not at.exception and any("never saved" in m.value for m in at.warning)
    assert not [b for b in at.button if b.key == "ie_run"]


def test_concept_graph_matches_json(sample_root, monkeypatch):
    stage = sample_root / "tiny" / "icat" / "mini_resnet"
    at = page(sample_root, "graph", monkeypatch)
    ok(at)
    choice = at.selectbox(key="cg_choice").value
    assert choice.startswith("class ")
    cls = next(iter(json.loads((stage / "routes.json").read_text())))
    data = json.loads((stage / "graphs" / f"class_{cls}.json").read_text())
    charts = at.get("plotly_chart")
    spec = json.loads(charts[0].proto.spec)
    nodes = next(t for t in spec["data"] if t.get("name") == "nodes")
    assert len(nodes["x"]) == len(data["nodes"]) > 1
    assert sorted(nodes["customdata"]) == sorted(n["id"] for n in data["nodes"])
    route = next(t for t in spec["data"] if t.get("name") == "dominant route")
    assert len([v for v in route["x"] if v is not None]) >= 2  # the route is drawn
    assert any("Latent" in s.value for s in at.subheader)  # the card of the route's first latent
    # picking another node opens its card
    opts = at.selectbox(key="cg_node").options
    at.selectbox(key="cg_node").set_value(opts[-1]).run(timeout=TIMEOUT)
    ok(at)
    layer, latent = opts[-1].split(":")
    assert any(f"Latent {latent} · mini_resnet {layer}" in s.value for s in at.subheader)
    # the case studies side by side: one chart per case present, with as many nodes as the case JSON
    cases = [c for c in ("correct", "misclassified", "adversarial") if (stage / "cases" / f"{c}.json").exists()]
    assert "correct" in cases
    assert len(at.get("plotly_chart")) == 1 + len(cases)
    for ch, case in zip(at.get("plotly_chart")[1:], cases):
        n_json = len(json.loads((stage / "cases" / f"{case}.json").read_text())["nodes"])
        trace = next(t for t in json.loads(ch.proto.spec)["data"] if t.get("name") == "nodes")
        assert len(trace["x"]) == n_json


def test_metrics(sample_root, monkeypatch):
    at = page(sample_root, "metrics", monkeypatch)
    ok(at)
    saes = frame(at, "architecture")
    assert len(saes) == 2 and (saes["explained_variance"].notna()).all()
    assert len(frame(at, "exemplars")) == 2
    sal = frame(at, "method")
    assert set(sal["method"]) == {"srd", "saliency"}
    assert len(at.get("plotly_chart")) == 2  # insertion and deletion curves


# ----- missing and damaged artifacts ---------------------------------------------------------------------------
def test_missing_and_partial_artifacts_give_messages(sample_root, tmp_path, monkeypatch):
    root = tmp_path / "idx"
    run = root / "partial"
    shutil.copytree(sample_root / "tiny" / "world", run / "world")
    (run / "cafe" / "mini_resnet" / ".layer3.tmp").mkdir(parents=True)  # an interrupted build
    bad = run / "icat" / "mini_resnet"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text("{not json")  # a corrupt stage
    for name in PAGES:
        at = page(root, name, monkeypatch)
        assert not at.exception, (name, [e.value for e in at.exception])
        msgs = " ".join(m.value for m in [*at.info, *at.warning])
        if name != "home":
            assert "No " in msgs or "Unfinished" in msgs, (name, msgs)
    at = page(root, "latents", monkeypatch)
    assert any("layer3.tmp (interrupted)" in w.value for w in at.warning)
    at = page(root, "graph", monkeypatch)
    assert any("unreadable manifest" in w.value for w in at.warning)
    # a missing file inside a finished stage: a warning, not a traceback
    damaged = tmp_path / "idx2" / "tiny"
    shutil.copytree(sample_root / "tiny" / "cafe", damaged / "cafe")
    os.remove(damaged / "cafe" / "mini_resnet" / "layer3" / "latents.json")
    at = page(tmp_path / "idx2", "latents", monkeypatch)
    assert not at.exception and any("Could not" in w.value for w in at.warning)
    # no artifact root at all
    at = page(tmp_path / "nowhere", "metrics", monkeypatch)
    assert not at.exception and any("does not exist" in w.value for w in at.warning)
    # an empty root
    (tmp_path / "empty").mkdir()
    at = page(tmp_path / "empty", "latents", monkeypatch)
    assert not at.exception and any("No runs" in i.value for i in at.info)


def test_recorded_image_folders_outside_the_root_are_read(sample_root, tmp_path, monkeypatch):
    """A CAFE stage whose recorded image folder lies outside the root (the normal case for a user's own images):
    the exemplar images are shown and listed under "pick from the run"; a folder that is gone gives
    placeholders and a warning."""
    root = tmp_path / "idx" / "tiny"
    shutil.copytree(sample_root / "tiny" / "cafe", root / "cafe")  # its images_source points at sample_root
    at = page(tmp_path / "idx", "latents", monkeypatch)
    ok(at)
    assert not any("not readable" in w.value for w in at.warning)
    at = page(tmp_path / "idx", "images", monkeypatch)
    ok(at)
    names = json.loads((root / "cafe" / "mini_resnet" / "layer3" / "images.json").read_text())["names"]
    options = at.selectbox(key="ie_pick").options
    assert len(options) == len(names) and options[0].startswith(names[0])
    # the same stage whose recorded folder no longer exists: grey placeholders and a warning
    moved = tmp_path / "idx2" / "tiny"
    shutil.copytree(sample_root / "tiny" / "cafe", moved / "cafe")
    for mf in (moved / "cafe").glob("*/*/manifest.json"):
        m = json.loads(mf.read_text())
        m["images_source"] = str(tmp_path / "gone")
        mf.write_text(json.dumps(m))
    at = page(tmp_path / "idx2", "latents", monkeypatch)
    assert not at.exception
    assert any("not readable" in w.value for w in at.warning)


def test_image_folder_allow_list_and_confinement(tmp_path):
    root, photos, other = tmp_path / "root", tmp_path / "photos", tmp_path / "other"
    for d in (root, photos / "cat", other):
        d.mkdir(parents=True)
    (photos / "cat" / "a.png").write_bytes(b"x")
    (other / "secret.png").write_bytes(b"x")
    (other / "notes.txt").write_text("x")
    (photos / "cat" / "link.png").symlink_to(other / "secret.png")  # a link out of the recorded folder
    (photos / "escape").symlink_to(other)
    allowed = D.recorded_image_folders([{"images_source": str(photos)}, {"images_source": None}, {}])
    assert allowed == [photos.resolve()]
    folder = D.image_folder(root, str(photos), allowed)
    assert folder == photos.resolve()
    assert D.image_file(folder, "cat/a.png") == (photos / "cat" / "a.png").resolve()
    assert D.image_file(folder, str(photos / "cat" / "a.png")) == (photos / "cat" / "a.png").resolve()
    with pytest.raises(D.PathEscapeError, match="not an image folder this run recorded"):
        D.image_folder(root, str(other), allowed)
    with pytest.raises(D.PathEscapeError, match="not an image folder this run recorded"):
        D.image_folder(root, str(photos / ".." / "other"), allowed)
    for bad in ("../other/secret.png", "cat/../../other/secret.png", "/etc/passwd", str(other / "secret.png")):
        with pytest.raises(D.PathEscapeError):
            D.image_file(folder, bad)
    for link in ("cat/link.png", "escape/secret.png"):
        with pytest.raises(D.PathEscapeError, match="leaves"):
            D.image_file(folder, link)
    with pytest.raises(D.PathEscapeError, match="not an image file"):
        D.image_file(D.image_folder(root, str(other), [other.resolve()]), "notes.txt")


def test_stage_listing_ignores_links_out_of_the_root(tmp_path):
    from sae_cafe.artifacts import write_manifest

    root, outside = tmp_path / "root", tmp_path / "outside"
    good = root / "r" / "cafe" / "m" / "l1"
    good.mkdir(parents=True)
    write_manifest(good, "cafe", {})
    ext = outside / "l2"
    ext.mkdir(parents=True)
    write_manifest(ext, "cafe", {})
    (root / "r" / "cafe" / "m" / "l2").symlink_to(ext)  # a stage directory linked from outside
    l3 = root / "r" / "cafe" / "m" / "l3"
    l3.mkdir()
    write_manifest(l3, "cafe", {})
    (l3 / "latents.json").symlink_to(outside / "l2" / "manifest.json")  # one file linked from outside
    (root / "r" / "cafe" / "m" / ".l4.tmp").mkdir()
    assert D.stages(root, "r", "cafe") == [good.resolve()]
    partial = D.partial_stages(root, "r", "cafe")
    assert "m/l2 (links outside the artifact root; ignored)" in partial
    assert "m/l3 (links outside the artifact root; ignored)" in partial
    assert "m/.l4.tmp (interrupted)" in partial


def test_concept_labels_search_and_supernode_toggle(sample_root, monkeypatch):
    """Issue 21: the latent browser shows concept labels and searches them; the concept graph collapses onto
    supernodes (the graph the ICAT stage wrote under graphs/supernodes/)."""
    from sae_cafe.concepts import read_labels

    labels = read_labels(sample_root / "tiny" / "cafe" / "mini_resnet" / "layer3")
    named = [lab for lab in labels.values() if lab.labelled]
    assert named
    at = page(sample_root, "latents", monkeypatch)
    ok(at)
    assert {"label", "label_confidence"} <= set(at.dataframe[0].value.columns)
    name = named[0].name
    at.text_input(key="lb_search").input(f"latents labelled {name}").run(timeout=TIMEOUT)
    ok(at)
    shown = at.dataframe[0].value
    assert set(shown["latent"]) == {s for s, lab in labels.items() if name in lab.name}
    assert set(shown["label"]) == {name}
    stage = sample_root / "tiny" / "icat" / "mini_resnet"
    at = page(sample_root, "graph", monkeypatch)
    ok(at)
    at.toggle(key="cg_collapse").set_value(True).run(timeout=TIMEOUT)
    ok(at)
    cls = next(iter(json.loads((stage / "routes.json").read_text())))
    collapsed = json.loads((stage / "graphs" / "supernodes" / f"class_{cls}.json").read_text())
    nodes = next(t for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"] if t.get("name") == "nodes")
    assert sorted(nodes["customdata"]) == sorted(n["id"] for n in collapsed["nodes"])
    assert any(n.get("supernode") for n in collapsed["nodes"])
