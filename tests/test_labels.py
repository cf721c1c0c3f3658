"""The one label policy (sae_cafe.labels): folder names vs the model's class names, class-names files,
predicted labels; every decision says what the ids mean and a mismatch is never a silent index mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import mini_resnet_32

from sae_cafe.errors import MismatchError, SaeCafeError
from sae_cafe.labels import (
    ClassNames,
    class_names_for,
    labels_for_source,
    read_class_names,
    resolve_labels,
)

MODEL = ClassNames(("cat", "dog", "fox"), source="model")


def test_folder_names_that_are_class_names_give_model_class_ids():
    for mode in ("class_names", "folder"):
        lab = resolve_labels(mode, ["fox", "cat", "fox"], MODEL, model="m")
        assert lab.ids == (2, 0, 2)
        assert lab.decision.model_classes and lab.decision.kind == "model_classes"
        assert lab.decision.vocabulary == ("cat", "dog", "fox") and "class ids" in lab.decision.note


def test_class_names_mode_mismatch_names_both_sides():
    with pytest.raises(MismatchError) as e:
        resolve_labels("class_names", ["tabby", "cat", "husky"], MODEL, model="resnet50", where="/data/pets")
    msg = str(e.value)
    assert "'husky'" in msg and "'tabby'" in msg and "'dog'" in msg and "resnet50" in msg and "/data/pets" in msg
    assert "labels = 'folder'" in msg  # says what to do
    with pytest.raises(MismatchError, match="no class names"):
        resolve_labels("class_names", ["a"], None, model="m")


def test_folder_mode_uses_folder_vocabulary_and_says_so():
    lab = resolve_labels("folder", ["zebra", "ant", "zebra", "cat"], MODEL, model="resnet50")
    # sorted folder names are the vocabulary; the ids are NOT the model's class ids (no silent mapping to 0..3)
    assert lab.decision.vocabulary == ("ant", "cat", "zebra") and lab.ids == (2, 0, 2, 1)
    assert not lab.decision.model_classes and lab.decision.kind == "folder_vocabulary"
    assert "not the model's outputs" in lab.decision.note and "'zebra'" in lab.decision.note
    rec = lab.decision.to_json()
    assert json.loads(json.dumps(rec))["vocabulary"] == ["ant", "cat", "zebra"]
    assert rec["model_classes"] is False


def test_predicted_mode_and_bad_inputs():
    lab = resolve_labels("predicted", None, MODEL, predict=lambda: torch.tensor([1, 1, 0]), model="m")
    assert lab.ids == (1, 1, 0) and lab.decision.kind == "predicted" and "predictions" in lab.decision.note
    with pytest.raises(SaeCafeError, match="ImageFolder layout"):
        resolve_labels("folder", [None, None], MODEL)
    with pytest.raises(SaeCafeError, match="labels must be one of"):
        resolve_labels("sorted", ["a"], MODEL)


def test_class_names_files(tmp_path):
    txt = tmp_path / "names.txt"
    txt.write_text("tench\ngoldfish\n\nshark\n")
    assert read_class_names(txt).names == ("tench", "goldfish", "shark")
    js = tmp_path / "imagenet_class_index.json"
    js.write_text(json.dumps({"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}))
    cn = read_class_names(js)
    assert cn.names == ("tench", "goldfish") and cn.source == str(js)
    # a folder named by its synset id or by its name is the same class
    lab = resolve_labels("class_names", ["n01443537", "tench"], cn)
    assert lab.ids == (1, 0) and lab.decision.class_names_source == str(js)
    (tmp_path / "list.json").write_text('["a", "b"]')
    assert read_class_names(tmp_path / "list.json").names == ("a", "b")
    (tmp_path / "gap.json").write_text('{"0": "a", "2": "c"}')
    with pytest.raises(SaeCafeError, match="without gaps"):
        read_class_names(tmp_path / "gap.json")
    with pytest.raises(SaeCafeError, match="does not exist"):
        read_class_names(tmp_path / "missing.txt")
    with pytest.raises(MismatchError, match=r"names.txt lists 3 class names but m has 1000 outputs"):
        resolve_labels("class_names", ["tench"], read_class_names(txt), model="m", num_classes=1000)
    # a file given by the user takes precedence over the model's names
    assert class_names_for(mini_resnet_32(class_names=list("abcdefghijkl")), txt).names[0] == "tench"
    assert class_names_for(None, None) is None


def _folder(root, classes, n=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = np.random.default_rng(i + 7 * len(c)).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_labels_for_source_on_a_folder_and_the_model(tmp_path):
    from sae_cafe.models.mini import CLASS_NAMES

    adapter = mini_resnet_32(class_names=list(CLASS_NAMES))
    names = adapter.class_names
    good = _folder(tmp_path / "good", [names[3], names[1]])
    lab = labels_for_source(good, "class_names", adapter)
    order = sorted([names[3], names[1]])  # files are read in sorted order
    assert lab.ids == tuple(names.index(c) for c in order for _ in range(2))
    bad = _folder(tmp_path / "bad", ["apples", "pears"])
    with pytest.raises(MismatchError, match="apples"):
        labels_for_source(bad, "class_names", adapter)
    lab = labels_for_source(bad, "folder", adapter)
    assert lab.ids == (0, 0, 1, 1) and not lab.decision.model_classes
    pred = labels_for_source(bad, "predicted", adapter)
    with torch.no_grad():
        x = adapter.preprocess(sorted(bad.rglob("*.png")))
        assert list(pred.ids) == adapter.model(x).argmax(-1).tolist()
    # (image, int label) pairs carry class ids already
    pairs = [(np.zeros((8, 8, 3), np.uint8), 4), (np.ones((8, 8, 3), np.uint8), 2)]
    assert labels_for_source(pairs, "folder", adapter).ids == (4, 2)
