"""The run's model everywhere (``sae_cafe.model_record``): records, hash checks, and ``sae-cafe build-index`` /
``query`` / ``graph`` loading the recorded weights and refusing others (both hashes named)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sae_cafe.artifacts import hash_file, write_manifest
from sae_cafe.errors import ArtifactError
from sae_cafe.model_record import (
    ModelMismatchError,
    ModelRecord,
    check_model,
    load_from_record,
    record_for,
    resolve_run_model,
    run_record,
)
from sae_cafe.models import load_model

torch.set_num_threads(1)


def weights_file(path, seed: int):
    """mini_resnet weights perturbed by ``seed`` (a user's own checkpoint), saved with torch.save."""
    ad = load_model("mini_resnet")
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
          for k, v in ad.model.state_dict().items()}
    torch.save(sd, path)
    return path


def test_record_of_a_weights_file_and_the_check(tmp_path):
    a, b = weights_file(tmp_path / "a.pth", 1), weights_file(tmp_path / "b.pth", 2)
    ad = load_model("mini_resnet", weights=a)
    rec = record_for(ad, a)
    assert rec == ModelRecord("mini_resnet", str(a.resolve()), hash_file(a), False)
    assert ModelRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    check_model(rec, ad)
    other = load_model("mini_resnet", weights=b)
    with pytest.raises(ModelMismatchError) as e:
        check_model(rec, other)
    assert hash_file(a) in str(e.value) and hash_file(b) in str(e.value)
    with pytest.raises(ModelMismatchError, match="'mini_resnet', not 'mini_vgg'"):
        check_model(rec, load_model("mini_vgg"))
    # loading from the record: the recorded file; another file is checked; a missing file is a clear error
    assert load_from_record(rec).weights_hash == hash_file(a)
    with pytest.raises(ModelMismatchError, match=hash_file(b)):
        load_from_record(rec, weights=b)
    a.unlink()
    with pytest.raises(ArtifactError, match="a.pth.*does not exist"):
        load_from_record(rec)


def test_shipped_weights_and_random_weights(tmp_path):
    shipped = record_for(load_model("mini_resnet"))
    assert shipped.weights_sha256 and not shipped.random_weights
    assert load_from_record(shipped).weights_hash == shipped.weights_sha256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rnd = load_model("resnet18")
    rec = record_for(rnd)
    assert rec.random_weights and rec.weights_sha256 is None and rec.state_sha256
    check_model(rec, rnd)  # the very same in-memory model passes
    with pytest.raises(ModelMismatchError, match="never saved"):
        load_from_record(rec)  # a fresh random network is never substituted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelMismatchError, match=rec.state_sha256):
            check_model(rec, load_model("resnet18"))


def test_run_record_reads_the_stages_and_refuses_disagreement(tmp_path):
    a, b = weights_file(tmp_path / "a.pth", 1), weights_file(tmp_path / "b.pth", 2)
    run = tmp_path / "idx" / "r"
    assert run_record(run, "mini_resnet") is None
    ra = record_for(load_model("mini_resnet", weights=a), a)
    write_manifest(run / "acts" / "mini_resnet" / "layer3", "acts", {}, model_record=ra.to_json())
    write_manifest(run / "cafe" / "mini_resnet" / "layer3", "cafe", {}, model_record=ra.to_json())
    assert run_record(run, "mini_resnet") == ra
    ad = resolve_run_model(run, "mini_resnet")  # no --weights: the recorded file, not random or shipped weights
    assert ad.weights_hash == hash_file(a)
    with pytest.raises(ModelMismatchError, match=hash_file(b)):
        resolve_run_model(run, "mini_resnet", weights=b)
    rb = record_for(load_model("mini_resnet", weights=b), b)
    write_manifest(run / "icat" / "mini_resnet", "icat", {}, model_record=rb.to_json())
    with pytest.raises(ModelMismatchError, match="different weights"):
        run_record(run, "mini_resnet")


def test_cli_build_index_and_query_use_the_recorded_weights(tmp_path, capsys):
    from PIL import Image
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_cafe.cli import main
    from sae_cafe.world import generate

    a, b = weights_file(tmp_path / "a.pth", 1), weights_file(tmp_path / "b.pth", 2)
    torch.manual_seed(0)
    d_in = load_model("mini_resnet").layer("layer3").channels
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=16, k=4)).eval()
    sae.save_model(tmp_path / "sae")
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(generate(4, seed=4).images):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i}.png")
    common = ["--run", "r", "--root", str(tmp_path / "idx"), "--model", "mini_resnet", "--layer", "layer3",
              "--no-progress"]
    assert main(["build-index", *common, "--weights", str(a), "--sae", str(tmp_path / "sae"),
                 "--images", str(tmp_path / "imgs"), "--k", "2", "--n-sample", "0"]) == 0
    stage = tmp_path / "idx" / "r" / "cafe" / "mini_resnet" / "layer3"
    m = json.loads((stage / "manifest.json").read_text())
    assert m["model_record"]["weights_sha256"] == hash_file(a) == m["model_hash"]
    assert m["images_source"] == str((tmp_path / "imgs").resolve())
    capsys.readouterr()
    img = str(tmp_path / "imgs" / "0.png")
    assert main(["query", *common, "--image", img]) == 0  # no --weights: the recorded file
    out = capsys.readouterr().out
    assert f"weights {a.resolve()}" in out and "matching latents" in out
    assert main(["query", *common, "--image", img, "--weights", str(b)]) == 2
    err = capsys.readouterr().err
    assert hash_file(a) in err and hash_file(b) in err
    # the library function refuses another model too (the viewer's query goes through it)
    from sae_cafe.cafe import query
    from sae_cafe.saes import load_sae

    other = load_model("mini_resnet", weights=b)
    with pytest.raises(ModelMismatchError, match=hash_file(b)):
        query(stage, other, load_sae(tmp_path / "sae", other, "layer3", check_model=False), img)
    a.unlink()
    assert main(["query", *common, "--image", img]) == 2
    assert "does not exist" in capsys.readouterr().err
