"""CAFE build on a tiny CNN and the mini ViT (random weights) with the real SRD: interrupted builds resume to
the same stage, iERFs sum to 1, query by example with a box, concept cards, CLI, mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from torch import nn

import sae_cafe.srd  # noqa: F401  (CAFE anchoring needs SRD: a broken import fails here, never skips)
from sae_cafe.artifacts import read_manifest
from sae_cafe.cafe import build_cafe, concept_card, load_cafe, query
from sae_cafe.cafe.metrics import concentration_summary, label_faithfulness, purity_summary
from sae_cafe.errors import MismatchError
from sae_cafe.models import make_adapter
from sae_cafe.world import generate

torch.set_num_threads(1)


def tiny_adapter():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return make_adapter(m, "tiny", input_size=(32, 32), resize=None, mean=(0.46,) * 3, std=(0.25,) * 3)


def tiny_sae(d_in=16, d_sae=12, k=3, seed=0):
    torch.manual_seed(seed)
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)).eval()


@pytest.fixture(scope="module")
def world():
    return generate(10, seed=3, size=32)


class Flaky:
    """A dataset of world images that raises KeyboardInterrupt at item ``fail_at`` (a killed build)."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at = images, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.fail_at is not None and i == self.fail_at:
            raise KeyboardInterrupt
        return self.images[i]


def _stage_tensors(cafe):
    out = {}
    for name in ("topk.safetensors", "exemplars.safetensors", "anchors.safetensors", "latents.safetensors"):
        from safetensors.torch import load_file

        out.update({f"{name}:{k}": v for k, v in load_file(str(cafe.path / name)).items()})
    return out


def test_interrupted_build_resumes_to_the_same_index(tmp_path, world):
    ad, sae = tiny_adapter(), tiny_sae()
    imgs = list(world.images)
    kw = dict(k=3, n_sample=4, batch_size=2, checkpoint_every=1, anchor_chunk=2, anchor_batch=2, progress=False)
    ref = build_cafe(ad, sae, "7", Flaky(imgs), out_dir=tmp_path / "ref", **kw)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed while mining
        build_cafe(ad, sae, "7", Flaky(imgs, fail_at=7), out_dir=out, **kw)
    assert not out.exists() and (tmp_path / ".run.tmp" / "mining_state.safetensors").exists()

    calls = {"n": 0}

    def dying_srd(model, x, layer, rel):  # the real SRD, killed after two calls while anchoring
        from sae_cafe.srd import srd_ierf_from_relevance

        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return srd_ierf_from_relevance(model, x, layer, rel)

    with pytest.raises(KeyboardInterrupt):
        build_cafe(ad, sae, "7", Flaky(imgs), out_dir=out, ierf_fn=dying_srd, **kw)
    assert list((tmp_path / ".run.tmp").glob("anchor_*.safetensors"))
    got = build_cafe(ad, sae, "7", Flaky(imgs), out_dir=out, **kw)
    a, b = _stage_tensors(ref), _stage_tensors(got)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0)), k
    q = torch.randn(5, 16)
    assert np.array_equal(ref.exemplar_index.search(q, 4)[1], got.exemplar_index.search(q, 4)[1])
    assert not (tmp_path / ".run.tmp").exists() and not (tmp_path / ".run.resume").exists()


def test_build_contents_query_and_card(tmp_path, world):
    ad, sae = tiny_adapter(), tiny_sae()
    imgs = list(world.images)
    cafe = build_cafe(ad, sae, "7", imgs, out_dir=tmp_path / "c", k=4, n_anchor=3, progress=False,
                      attributes=world.attribute_maps())
    m = read_manifest(cafe.path, "cafe")
    assert m["indexes"]["exemplars"]["spec"] == "Flat" and m["layer"] == "7" and m["grid"] == [8, 8]
    E = cafe.n_exemplars
    assert int(sum(min(3, int(n)) for n in cafe.latents["n_exemplars"])) == E
    maps = cafe.ierf(list(range(E)))
    assert maps.shape == (E, 32, 32)
    assert torch.allclose(maps.sum((1, 2)), torch.ones(E), atol=2e-3)  # iERFs sum to 1 (fp16 storage)
    ex = cafe.exemplars
    assert torch.allclose(ex["ex_activation"], ex["ex_activation_check"], rtol=1e-4, atol=1e-5)
    # the exemplar index returns each exemplar's own PFV first
    _, ids = cafe.exemplar_index.search(ex["ex_pfv"], 1)
    assert (ex["ex_pfv"][torch.from_numpy(ids[:, 0])] == ex["ex_pfv"]).all()
    # latents.json lists every latent; the layer feeds avgpool + fc, so class pushes exist
    rows = json.loads((cafe.path / "latents.json").read_text())
    assert len(rows) == 12 and "pushes" in rows[0] and "purity_ierf" in rows[0]
    # query: a box around the top-left quarter selects PFVs whose iERF mass is mostly inside it
    r = query(cafe, ad, sae, imgs[0], box=(0, 0, 16, 16))
    assert len(r.positions) > 0 and (r.inside >= 0.5).all()
    assert (r.positions.float().mean(0) < 4).all()
    full = query(cafe, ad, sae, imgs[0])
    assert len(full.positions) == 64 and full.own_latents and full.matches
    # exemplar PFVs from image 0 find their own latents among the matches
    card = concept_card(cafe, full.own_latents[0]["latent"], images=imgs, model=ad, png=tmp_path / "card.png")
    assert (tmp_path / "card.png").stat().st_size > 1000 and card["pushes"]["up"]
    lat = full.own_latents[0]["latent"]
    qs = cafe.quantile_examples(lat)
    top = cafe.record(cafe.exemplar_ids(lat)[0]).activation
    assert qs and all(0 < q["activation"] <= top for q in qs)
    fa = label_faithfulness(cafe, ad, sae, imgs)
    assert fa["n"] == E and np.isfinite(fa["diff_mean"])
    assert 0 < concentration_summary(cafe)["ierf"][0] <= 1
    assert purity_summary(cafe)["n"] >= 0


def test_sae_layer_mismatch_is_clear(tmp_path, world):
    with pytest.raises(MismatchError, match="d_in=32"):
        build_cafe(tiny_adapter(), tiny_sae(d_in=32), "7", list(world.images), out_dir=tmp_path / "x")


def test_cli_build_and_query_on_mini_vit(tmp_path, world, capsys):
    from safetensors.torch import save_file

    from sae_cafe.cli import main
    from sae_cafe.models.mini import make_mini_vit
    from sae_cafe.world import generate as gen

    torch.manual_seed(0)
    save_file(make_mini_vit().state_dict(), str(tmp_path / "w.safetensors"))
    sae = tiny_sae(d_in=96, d_sae=16, k=4)
    sae.save_model(tmp_path / "sae")
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(gen(6, seed=4).images):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i}.png")
    common = ["--run", "r", "--root", str(tmp_path / "idx"), "--model", "mini_vit", "--weights",
              str(tmp_path / "w.safetensors"), "--layer", "2", "--no-progress"]
    assert main(["build-index", *common, "--sae", str(tmp_path / "sae"), "--images", str(tmp_path / "imgs"),
                 "--k", "3", "--index", "HNSW", "--cards", "2"]) == 0
    stage = tmp_path / "idx" / "r" / "cafe" / "mini_vit" / "encoder.layers.encoder_layer_2"
    cafe = load_cafe(stage)
    assert cafe.manifest["indexes"]["exemplars"]["spec"] == "HNSW32"
    assert len(list((stage / "cards").glob("*.png"))) == 2
    assert main(["query", *common, "--image", str(tmp_path / "imgs" / "0.png"), "--box", "0,0,32,32",
                 "--json", str(tmp_path / "q.json")]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["positions"] and all(v >= 0.5 for v in res["inside"])
    assert "matching latents" in capsys.readouterr().out


def test_actmap_seeding_sums_to_one_and_differs_from_pfv_seeding(world):
    from sae_cafe.cafe.anchor import anchor_exemplars, unpack_maps
    from sae_cafe.cafe.source import ImageSource

    ad, sae = tiny_adapter(), tiny_sae()
    src = ImageSource(list(world.images[:2]))
    lat, img, pos = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), torch.tensor([5, 9, 30])
    out = {m: anchor_exemplars(ad, sae, "7", src, lat, img, pos, seed=m, progress=False) for m in ("pfv", "actmap")}
    for m, o in out.items():
        maps = unpack_maps(o["ierf16"], o["ierf_scale"])
        fired = o["act_map"].float().flatten(1).clamp(min=0).sum(1) > 0
        sums = maps.sum((1, 2))
        assert torch.allclose(sums[fired if m == "actmap" else slice(None)], torch.ones(3)[
            fired if m == "actmap" else slice(None)], atol=2e-3), m
    assert not torch.allclose(out["pfv"]["ierf16"].float(), out["actmap"]["ierf16"].float())


def _class_push_reference(adapter, sae, layer, x):
    """The slow reference: one forward from ``layer`` per latent with its decoder direction at every position,
    minus the forward with zeros (float64)."""
    act = adapter.capture(x, [layer], stop_early=True)[layer]
    batch = adapter.to_pfv(act)

    def f(pfv):
        b = type(batch)(pfv, batch.positions, batch.grid, batch.extra)
        return adapter.forward_from(layer, adapter.from_pfv(b), x)

    f0 = f(torch.zeros_like(batch.pfv))
    W = sae.W_dec.detach().to(batch.pfv)
    return torch.cat([f(W[s].expand_as(batch.pfv).clone()) - f0 for s in range(W.shape[0])])


@pytest.mark.parametrize("which", ["sequential", "resnet"])
def test_class_push_equals_the_per_latent_forward_in_float64(which):
    from sae_cafe.cafe.build import class_push
    from tests.tiny_models import tiny_resnet

    ad, layer, d_in = (tiny_adapter(), "7", 16) if which == "sequential" else (tiny_resnet(), "layer4", 512)
    ad.model.double()
    sae = tiny_sae(d_in=d_in, d_sae=24, k=3, seed=1).double()
    with torch.no_grad():
        sae.W_dec.normal_()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = _class_push_reference(ad, sae, layer, x)
    got = class_push(ad, sae, layer, x)
    assert got is not None and got.shape == ref.shape == (24, 5)
    assert ref.abs().max() > 1e-3  # a push that is not trivially zero
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # a layer under a non-linear head has no push (the linearity test refuses it)
    if which == "resnet":
        sae3 = tiny_sae(d_in=256, d_sae=8, k=3).double()
        assert class_push(ad, sae3, "layer3", x) is None


def test_class_push_under_concatenating_layers():
    """A DenseNet layer whose output later layers concatenate with earlier features (batch sizes must agree):
    no error, and None because the rest of the network is not linear in it."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from torchvision.models import DenseNet

    from sae_cafe.cafe.build import class_push
    from sae_cafe.models import get_adapter

    torch.manual_seed(0)
    adapter = get_adapter(DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8, bn_size=2,
                                   num_classes=5).eval())
    layer = "features.denseblock1.denselayer1"
    sae = TopKSAE(TopKSAEConfig(d_in=adapter.layer(layer).channels, d_sae=3, k=1)).eval()
    assert class_push(adapter, sae, layer, torch.randn(2, 3, 32, 32)) is None
