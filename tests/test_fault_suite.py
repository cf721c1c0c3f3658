"""Fault suite: hostile inputs through the public entry points (Python API and CLI), determinism, safe loading.

Every case must end in a clear :class:`SaeCafeError` naming the input (or a correct result for inputs that
are merely unusual). The table of outcomes is written to ``indexes/fault_suite/report.md`` (with the
interruption results of ``tests/test_interrupt.py``, see ``tests/fault_report.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_report import CASES, record
from PIL import Image
from safetensors.torch import save_file

from sae_cafe.cli import main as cli_main
from sae_cafe.errors import SaeCafeError

ROOT = Path(__file__).resolve().parents[1]
REPORT: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    # the report (indexes/fault_suite/report.md) also shows the SIGKILL results of tests/test_interrupt.py
    record(CASES, {"cases": [list(r) for r in REPORT]})


def expect_error(case: str, entry: str, fn, must_name: str) -> None:
    """``fn`` must raise a SaeCafeError whose message names ``must_name``."""
    try:
        fn()
    except SaeCafeError as e:
        msg = str(e)
        assert must_name in msg, f"{case}: message does not name {must_name!r}: {msg}"
        REPORT.append((case, entry, f"clear error: {type(e).__name__}: {msg[:90].replace('|', '/')}"))
        return
    except Exception as e:  # noqa: BLE001 - a bare library exception is a failure of the suite
        REPORT.append((case, entry, f"BARE {type(e).__name__}"))
        raise AssertionError(f"{case}: bare {type(e).__name__}: {e}") from e
    REPORT.append((case, entry, "NO ERROR"))
    raise AssertionError(f"{case}: no error raised")


def expect_cli_error(case: str, argv: list[str], must_name: str, capsys) -> None:
    rc = cli_main(argv)
    err = capsys.readouterr()
    text = err.err + err.out
    assert rc != 0, f"{case}: CLI exited 0"
    assert must_name in text, f"{case}: CLI output does not name {must_name!r}: {text[-400:]}"
    assert "Traceback" not in text
    REPORT.append((case, "CLI " + argv[0], f"clear error (exit {rc})"))


# ----- images -------------------------------------------------------------------------------------------------
def _bad_images(d: Path) -> dict[str, Path]:
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    good.save(d / "good.png")
    data = (d / "good.png").read_bytes()
    files = {
        "empty.png": b"", "empty.jpg": b"", "corrupt.jpg": bytes(range(256)) * 4, "text.webp": b"hello world",
        "html.bmp": b"<html></html>", "truncated.png": data[: len(data) // 3], "zeros.tiff": b"\0" * 100,
        "header_only.gif": b"GIF89a", "pdf.png": b"%PDF-1.4 not an image",
    }
    for name, content in files.items():
        (d / name).write_bytes(content)
    (d / "folder.png").mkdir()
    return {n: d / n for n in [*files, "folder.png", "missing.jpg"]}


def test_bad_image_files_python_api(tmp_path):
    from sae_cafe.images import load_image

    for name, path in _bad_images(tmp_path).items():
        expect_error(f"image {name}", "images.load_image", lambda p=path: load_image(p), name)


def test_unusual_images_are_converted(tmp_path):
    from sae_cafe.images import load_image
    from sae_cafe.models import load_model

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    cases = {"1x1.png": Image.new("RGB", (1, 1), (9, 9, 9)), "cmyk.jpg": rgb.convert("CMYK"),
             "16bit.png": Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)),
             "palette.png": rgb.convert("P"), "alpha.png": rgb.convert("RGBA"), "la.png": rgb.convert("LA"),
             "gray.jpg": rgb.convert("L")}
    for name, im in cases.items():
        im.save(tmp_path / name)
    rgb.save(tmp_path / "animated.gif", save_all=True, append_images=[rgb.rotate(90)])
    model = load_model("mini_resnet")
    for name in [*cases, "animated.gif"]:
        img = load_image(tmp_path / name)
        x = model.preprocess(img)
        assert img.mode == "RGB" and x.shape == (1, 3, 64, 64) and torch.isfinite(x).all()
        REPORT.append((f"image {name}", "images.load_image + preprocess", "correct result (RGB, finite)"))


def test_decompression_bomb(tmp_path):
    from sae_cafe.images import load_image

    Image.new("1", (10000, 9000)).save(tmp_path / "bomb.png")  # 90 M pixels, tiny file
    expect_error("image bomb.png (90 Mpx)", "images.load_image", lambda: load_image(tmp_path / "bomb.png"),
                 "bomb.png")


def test_bad_images_cli(tmp_path, capsys):
    paths = _bad_images(tmp_path)
    argv = ["srd", str(paths["corrupt.jpg"]), str(paths["empty.png"]), "--model", "mini_resnet",
            "--out", str(tmp_path / "out")]
    expect_cli_error("CLI srd on corrupt + empty images", argv, "corrupt.jpg", capsys)


# ----- models, weights, layers --------------------------------------------------------------------------------
def test_bad_weights(tmp_path):
    import torchvision

    from sae_cafe.models import load_model

    sd = torchvision.models.resnet18().state_dict()
    nan = dict(sd)
    nan["layer1.0.conv1.weight"] = torch.full_like(sd["layer1.0.conv1.weight"], float("nan"))
    torch.save(nan, tmp_path / "nan.pth")
    torch.save(torchvision.models.vgg11().state_dict(), tmp_path / "vgg.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    inf = {k: v.clone() for k, v in sd.items()}
    inf["fc.bias"][0] = float("inf")
    save_file({k: v.contiguous() for k, v in inf.items()}, str(tmp_path / "inf.safetensors"))
    for name in ("nan.pth", "vgg.pth", "trunc.safetensors", "inf.safetensors", "missing.pth"):
        expect_error(f"weights {name}", "models.load_model", lambda n=name: load_model("resnet18",
                     weights=tmp_path / n), name)


def test_unknown_layers_and_positions(tmp_path):
    from sae_cafe.activations.extract import extract_activations
    from sae_cafe.models import load_model
    from sae_cafe.srd import srd_ierf, srd_relevance

    m = load_model("mini_resnet")
    x = torch.rand(1, 3, 64, 64)
    expect_error("layer id 'layer9'", "srd.srd_ierf", lambda: srd_ierf(m, x, "layer9", (0, 0)), "layer9")
    expect_error("layer id 'features.3' on a ResNet", "srd.srd_relevance",
                 lambda: srd_relevance(m, x, 0, ["features.3"]), "features.3")
    expect_error("position off grid", "srd.srd_ierf", lambda: srd_ierf(m, x, "layer4", (50, 0)), "off the")
    expect_error("layer id 'blocks.99' in extraction", "activations.extract_activations",
                 lambda: extract_activations(m, x, ["blocks.99"], root=tmp_path, progress=False), "blocks.99")
    nanx = x.clone()
    nanx[0, 0, 0, 0] = float("nan")
    expect_error("NaN input tensor", "srd.srd_saliency", lambda: __import__("sae_cafe.srd", fromlist=["x"])
                 .srd_saliency(m, nanx, 0), "NaN")


def test_unknown_layer_cli(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    argv = ["srd", str(tmp_path / "a.png"), "--model", "mini_resnet", "--ierf", "layer9:0:0",
            "--out", str(tmp_path / "o")]
    expect_cli_error("CLI srd --ierf unknown layer", argv, "layer9", capsys)
    expect_cli_error("CLI unknown model", ["srd", str(tmp_path / "a.png"), "--model", "resnet9000"], "resnet9000",
                     capsys)


# ----- SAEs -----------------------------------------------------------------------------------------------------
def _save_sae(path: Path, d_in: int, hook: str, model: str = "mini_resnet") -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4 * d_in,
                                        metadata=SAEMetadata(hook_name=hook, model_name=model)))
    sae.save_model(str(path))
    return path


def test_bad_saes(tmp_path):
    from sae_cafe.models import load_model
    from sae_cafe.saes import load_sae

    m = load_model("mini_resnet")
    c3 = m.layer("layer3").channels
    wrong_d = _save_sae(tmp_path / "wrong_d", c3 + 5, "layer3")
    other = _save_sae(tmp_path / "other_layer", m.layer("layer2").channels, "layer2")
    expect_error("SAE with wrong d_in", "saes.load_sae", lambda: load_sae(wrong_d, m, "layer3"), "d_in")
    expect_error("SAE trained on another layer", "saes.load_sae", lambda: load_sae(other, m, "layer3"), "layer2")
    expect_error("SAE directory missing", "saes.load_sae", lambda: load_sae(tmp_path / "nope", m), "nope")
    broken = _save_sae(tmp_path / "broken", c3, "layer3")
    (broken / "cfg.json").write_text("{not json")
    expect_error("SAE cfg.json corrupt", "saes.load_sae", lambda: load_sae(broken, m), "broken")


# ----- artifacts ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acts_stage(tmp_path_factory):
    from sae_cafe.activations.extract import extract_activations
    from sae_cafe.models import load_model
    from sae_cafe.world import generate

    root = tmp_path_factory.mktemp("faults")
    world = generate(12, seed=3)
    imgs = world.images if hasattr(world, "images") else world[0]
    x = torch.as_tensor(np.asarray(imgs))
    if x.ndim == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / (255.0 if x.dtype == torch.uint8 or x.max() > 1.5 else 1.0)
    m = load_model("mini_resnet")
    dirs = extract_activations(m, [img.permute(1, 2, 0).numpy() for img in x], ["layer3"], root=root,
                               run="r", progress=False, shard_size=200)
    return root, dirs["layer3"], x


def _copy_stage(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_artifacts(acts_stage, tmp_path):
    from sae_cafe.activations.shards import ShardReader
    from sae_cafe.artifacts import read_manifest
    from sae_cafe.cafe.index import read_index

    _, stage, _ = acts_stage
    t = _copy_stage(stage, tmp_path / "trunc_shard")
    shard = sorted(t.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    expect_error("truncated activation shard", "activations.ShardReader",
                 lambda: [b for b in ShardReader(t).iter_batches(64)] if hasattr(ShardReader(t), "iter_batches")
                 else ShardReader(t)[0], shard.name)
    t2 = _copy_stage(stage, tmp_path / "trunc_manifest")
    raw = (t2 / "manifest.json").read_text()
    (t2 / "manifest.json").write_text(raw[: len(raw) // 2])
    expect_error("truncated manifest", "artifacts.read_manifest", lambda: read_manifest(t2), "manifest.json")
    t3 = _copy_stage(stage, tmp_path / "old_schema")
    m = json.loads(raw)
    m["schema_version"] = 0
    (t3 / "manifest.json").write_text(json.dumps(m))
    expect_error("artifact dir from an older schema_version", "activations.ShardReader", lambda: ShardReader(t3),
                 "schema_version")
    expect_error("missing artifact dir", "activations.ShardReader", lambda: ShardReader(tmp_path / "gone"), "gone")
    (tmp_path / "idx.faiss").write_bytes(b"IxFI" + b"\0" * 10)
    expect_error("truncated FAISS file", "cafe.index.read_index", lambda: read_index(tmp_path / "idx.faiss"),
                 "idx.faiss")
    assert read_manifest(stage)["kind"] == "acts"  # the original is untouched


# ----- determinism and safe loading -----------------------------------------------------------------------------
def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_determinism(acts_stage, tmp_path):
    from sae_cafe.activations.extract import extract_activations
    from sae_cafe.models import load_model
    from sae_cafe.world import generate

    a, b = generate(8, seed=11), generate(8, seed=11)
    ia = a.images if hasattr(a, "images") else a[0]
    ib = b.images if hasattr(b, "images") else b[0]
    assert np.array_equal(np.asarray(ia), np.asarray(ib))
    _, stage, x = acts_stage
    again = extract_activations(load_model("mini_resnet"), [img.permute(1, 2, 0).numpy() for img in x], ["layer3"],
                                root=tmp_path, run="r2", progress=False, shard_size=200)["layer3"]
    assert _tree_hash(again) == _tree_hash(stage)
    REPORT.append(("rerun with the same seed and inputs", "world.generate, extract_activations",
                   "correct result (hash-equal artifacts)"))


def test_no_pickle_loading_anywhere():
    bad = []
    for path in [*ROOT.joinpath("sae_cafe").rglob("*.py"), *ROOT.joinpath("sae_training").rglob("*.py"),
                 *ROOT.joinpath("app").rglob("*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path}: torch.load without weights_only=True")
        for pat in (r"^\s*import pickle", r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"st\.cache_data"):
            if re.search(pat, text, re.M):
                bad.append(f"{path}: {pat}")
    assert not bad, bad
    REPORT.append(("pickle / torch.load without weights_only / allow_pickle", "source scan", "correct result (none)"))
