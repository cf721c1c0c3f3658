"""SAE training through sae-lens on activation shards: export/reload identity, resume, provider, evaluation,
CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer
from tiny_models import tiny_resnet

from sae_cafe.activations.extract import extract_activations
from sae_cafe.activations.shards import ShardReader
from sae_cafe.errors import MismatchError
from sae_training.data import ShardDataProvider, holdout_split
from sae_training.evaluate import evaluate_sae
from sae_training.train import (
    SAETrainConfig,
    load_checkpoint,
    make_trainer,
    make_training_sae,
    save_checkpoint,
    train_sae,
)


@pytest.fixture(scope="module")
def resnet():
    return tiny_resnet()


@pytest.fixture(scope="module")
def acts(tmp_path_factory, resnet):
    root = tmp_path_factory.mktemp("idx")
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return extract_activations(resnet, x, "layer2", run="t", root=root, shard_size=100, batch_size=8,
                               progress=False)["layer2"]


def _small(**kw) -> dict:
    return dict(steps=30, batch_size=128, n_checkpoints=0, progress=False, evaluate=False, **kw)


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_reloaded_sae_matches_trained(tmp_path, acts, arch):
    res = train_sae(acts, tmp_path / arch, architecture=arch, k=8, return_sae=True, **_small())
    out = tmp_path / arch
    assert {"cfg.json", "sae_weights.safetensors", "manifest.json", "training.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "layer2" and cfg["metadata"]["model_name"] == "resnet18"
    assert cfg["metadata"]["sae_cafe"]["grid"] == [4, 4] and cfg["d_sae"] == 8 * 128
    loaded = SAE.load_from_disk(out)
    trained = res["sae"].eval()
    x = ShardReader(acts)[torch.arange(0, 640, 3)].float()
    with torch.no_grad():
        z = loaded.encode(x)
        if arch in ("batchtopk", "matryoshka_batchtopk"):
            # trained as BatchTopK, exported as JumpReLU with the learned threshold (sae-lens's conversion)
            hp = trained.encode_with_hidden_pre(x)[1]
            z_ref = hp * (hp > trained.topk_threshold.float())
            assert trained.topk_threshold > 0
        else:
            z_ref = trained.encode(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded.decode(z), trained.decode(z_ref), rtol=1e-6, atol=1e-5)
    assert (z != 0).any()
    assert res["training"]["steps"] == 30


def test_training_learns_and_evaluates_on_held_out(tmp_path, acts, resnet):
    res = train_sae(acts, tmp_path / "s", architecture="topk", k=16, expansion=4, steps=80, batch_size=128,
                    n_checkpoints=0, progress=False, lr=3e-3)
    ev = res["eval"]
    # held-out = the last 10 % of images (4 of 40 → 64 PFVs)
    assert ev["n_pfvs"] == 64 and ev["image_range"] == [36, 40]
    assert ev["explained_variance"] > 0.5, ev
    assert abs(ev["l0"] - 16) < 1e-6 and ev["dead_count_reliable"]
    assert (tmp_path / "s" / "eval" / "firing_frequency.png").stat().st_size > 1000
    hist = res["training"]["history"]
    assert hist[-1]["mse"] < hist[0]["mse"]


def test_resume_from_checkpoint_after_crash(tmp_path, acts, monkeypatch):
    orig = SAETrainer.step

    def crashing(self, batch):
        if self.n_training_steps == 25:
            raise RuntimeError("simulated crash")
        return orig(self, batch)

    monkeypatch.setattr(SAETrainer, "step", crashing)
    kw = dict(architecture="batchtopk", k=8, steps=40, batch_size=64, n_checkpoints=1, progress=False,
              evaluate=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(acts, tmp_path / "s", **kw)
    ck = tmp_path / ".s.tmp" / "checkpoints" / "step_00000020"
    assert ck.is_dir() and not (tmp_path / "s").exists()
    assert all(p.suffix in (".json", ".safetensors") for p in ck.iterdir())  # no pickles
    monkeypatch.setattr(SAETrainer, "step", orig)
    res = train_sae(acts, tmp_path / "s", **kw)
    assert res["training"]["resumed_from_step"] == 20 and res["training"]["steps"] == 40
    assert SAE.load_from_disk(tmp_path / "s").cfg.d_sae == 1024
    # a different config does not resume from another run's checkpoints
    res = train_sae(acts, tmp_path / "s", **{**kw, "k": 4})
    assert res["training"]["resumed_from_step"] is None


def test_resumed_training_equals_uninterrupted(tmp_path, acts, monkeypatch):
    """The data provider is fast-forwarded to the checkpoint's batch and the loss history is kept, so a
    crashed-and-resumed run gives the same bytes as an uninterrupted one."""
    kw = dict(architecture="batchtopk", k=8, steps=110, batch_size=64, n_checkpoints=1, progress=False,
              evaluate=False)  # a checkpoint at step 55, loss-history rows at steps 50, 100 and 110
    ref = train_sae(acts, tmp_path / "ref", **kw)
    orig = SAETrainer.step

    def crashing(self, batch):
        if self.n_training_steps == 70:
            raise RuntimeError("simulated crash")
        return orig(self, batch)

    monkeypatch.setattr(SAETrainer, "step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(acts, tmp_path / "s", **kw)
    monkeypatch.setattr(SAETrainer, "step", orig)
    res = train_sae(acts, tmp_path / "s", **kw)
    assert res["training"]["resumed_from_step"] == 55
    assert (tmp_path / "s" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "ref" / "sae_weights.safetensors").read_bytes()
    assert [h["step"] for h in res["training"]["history"]] == [50, 100, 110]
    assert res["training"]["history"] == ref["training"]["history"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "s"]


def test_checkpoint_round_trip_restores_trainer_state(tmp_path, acts):
    cfg = SAETrainConfig(architecture="jumprelu", steps=20, batch_size=64)
    prov = ShardDataProvider(acts, 64, seed=0)
    tr = make_trainer(make_training_sae(cfg, 128), prov, cfg, 20)
    tr.activation_scaler.scaling_factor = 0.5
    for _ in range(5):
        tr.step(next(prov))
        tr.n_training_steps += 1
    save_checkpoint(tr, tmp_path / "ck", elapsed=3.0)
    tr2 = make_trainer(make_training_sae(dataclasses_replace(cfg, seed=9), 128), prov, cfg, 20)
    assert load_checkpoint(tr2, tmp_path / "ck") == 3.0
    assert tr2.n_training_steps == 5 and tr2.n_training_samples == 5 * 64
    assert tr2.activation_scaler.scaling_factor == 0.5
    for a, b in zip(tr.sae.parameters(), tr2.sae.parameters()):
        assert torch.equal(a, b)
    s1, s2 = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    for pid in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(s1["state"][pid][k]), torch.as_tensor(s2["state"][pid][k]))
    assert tr.lr_scheduler.state_dict()["last_epoch"] == tr2.lr_scheduler.state_dict()["last_epoch"]
    assert torch.equal(tr.act_freq_scores, tr2.act_freq_scores)
    batch = next(prov)
    torch.manual_seed(0)
    o1 = tr.step(batch)
    torch.manual_seed(0)
    o2 = tr2.step(batch)
    torch.testing.assert_close(o1.loss, o2.loss)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_data_provider_shuffles_within_image_range(acts):
    r = ShardReader(acts)
    (lo, hi), held = holdout_split(r.n_images, 0.25)
    assert (lo, hi) == (0, 30) and held == (30, 40)
    allowed = r[torch.arange(r.n)][r.provenance(torch.arange(r.n))[:, 0] < hi]
    prov = ShardDataProvider(r, 32, image_range=(lo, hi), buffer_rows=128, seed=1)
    rows = torch.cat([next(prov) for _ in range(30)])
    assert rows.shape == (960, 128) and rows.dtype == torch.float32
    # every served row is a training-image row; with 960 draws of 480 rows most of them are seen
    allowed_set = {a.tobytes() for a in allowed.numpy()}
    served = [a.tobytes() for a in rows.numpy()]
    assert all(b in allowed_set for b in served)
    assert len(set(served)) / len(allowed_set) > 0.9
    first = torch.cat([next(ShardDataProvider(r, 32, seed=1)) for _ in range(1)])
    assert not torch.equal(first, r[torch.arange(32)])  # shuffled, not in file order


def identity_sae_dir(path, d, hook, model):
    eye = torch.eye(d)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name=hook, model_name=model)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 1).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(path)
    return path


def test_evaluate_identity_sae_spliced(tmp_path, resnet):
    d = identity_sae_dir(tmp_path / "id", 128, "layer2", "resnet18")
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pred = resnet.model(x).argmax(-1)
    labels = pred.clone()
    labels[:3] = (labels[:3] + 1) % 5  # model accuracy 75 %
    res = evaluate_sae(d, model=resnet, images=x, labels=labels, batch_size=5, progress=False)
    assert res["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert res["accuracy"] == pytest.approx(0.75) and res["spliced_accuracy"] == pytest.approx(0.75)
    assert res["top1_agreement"] == 1.0 and res["logit_kl"] < 1e-9
    assert res["n_pfvs"] == 12 * 16 and res["dead_count_reliable"]  # all available PFVs seen
    assert json.loads((d / "eval" / "metrics.json").read_text())["n_images"] == 12
    # a broken SAE (zero decoder) is visible in every number
    sae = SAE.load_from_disk(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    sae.save_model(tmp_path / "zero")
    bad = evaluate_sae(tmp_path / "zero", model=resnet, images=x, labels=labels, progress=False)
    assert bad["explained_variance"] < 0.1 and bad["logit_kl"] > 1e-4


def test_cli_extract_train_eval(tmp_path, monkeypatch, capsys):
    from sae_cafe.cli import main

    imgs = tmp_path / "imgs"
    for c in ("red_circle", "blue_star"):  # class names of mini_resnet: accuracy is measured
        (imgs / c).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i + (c == "b") * 10).integers(0, 255, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(imgs / c / f"{i}.png")
    monkeypatch.setenv("COLUMNS", "200")
    root = tmp_path / "idx"
    assert main(["extract", "--model", "mini_resnet", "--images", str(imgs), "--layers", "layer4", "layer4.0",
                 "--run", "cli", "--root", str(root), "--dtype", "float16", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "layer4.0" in out and "96" in out  # 6 images × 4×4 positions
    toml = tmp_path / "sae.toml"
    toml.write_text('[sae]\narchitecture = "topk"\nexpansion = 2\nk = 8\nsteps = 6\nbatch_size = 32\n'
                    'holdout = 0.2\nn_checkpoints = 0\n')
    assert main(["train-sae", "--config", str(toml), "--run", "cli", "--root", str(root), "--model", "mini_resnet",
                 "--layer", "layer4", "--steps", "5", "--eval-images", str(imgs)]) == 0
    out = capsys.readouterr().out
    assert "explained_variance" in out and "spliced_accuracy" in out
    sae_dir = root / "cli" / "saes" / "mini_resnet" / "layer4"
    assert json.loads((sae_dir / "training.json").read_text())["steps"] == 5
    assert main(["eval-sae", "--sae", str(sae_dir), "--acts", str(root / "cli" / "acts" / "mini_resnet" / "layer4")
                 ]) == 0
    assert "l0" in capsys.readouterr().out
    # folders that are not the model's classes: no accuracy, and the output says why (no silent index mapping)
    (imgs / "red_circle").rename(imgs / "a")
    assert main(["eval-sae", "--sae", str(sae_dir), "--model", "mini_resnet", "--images", str(imgs)]) == 0
    out = capsys.readouterr().out
    assert "spliced_accuracy" not in out and "label vocabulary" in out and "'a'" in out
    toml.write_text("[sae]\nbogus = 1\n")
    assert main(["train-sae", "--config", str(toml), "--acts", str(root / "cli" / "acts" / "mini_resnet" /
                                                                   "layer4")]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_evaluation_needs_a_held_out_set(tmp_path, acts):
    """No held-out images (holdout=0) is a clear error before training, never an evaluation on training images."""
    from sae_cafe.errors import SaeCafeError

    with pytest.raises(SaeCafeError, match=r"holdout=0.0 leaves no held-out image of the 40"):
        train_sae(acts, tmp_path / "s", steps=5, batch_size=64, holdout=0.0, n_checkpoints=0, progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / ".s.tmp").exists()
    res = train_sae(acts, tmp_path / "s", steps=5, batch_size=64, holdout=0.0, n_checkpoints=0, progress=False,
                    evaluate=False)
    assert "eval" not in res and res["training"]["steps"] == 5


def test_evaluate_labels_follow_the_label_policy(tmp_path, resnet):
    """Folders that are not the model's classes give no accuracy (the decision says why); a class-names file
    that names them makes them the model's class ids; predicted labels give accuracy 1."""
    d = identity_sae_dir(tmp_path / "id", 128, "layer2", "resnet18")
    imgs = tmp_path / "imgs"
    for c in ("cow", "ant"):
        (imgs / c).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i + 5 * len(c) + ord(c[0])).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(imgs / c / f"{i}.png")
    kw = dict(model=resnet, images=imgs, progress=False)
    res = evaluate_sae(d, **kw)
    assert "accuracy" not in res and res["labels"]["kind"] == "folder_vocabulary"
    assert res["labels"]["vocabulary"] == ["ant", "cow"] and "not the model's outputs" in res["labels_note"]
    names = tmp_path / "classes.txt"
    names.write_text("bee\ncow\nant\ndog\nemu\n")  # resnet18 here has 5 outputs
    res = evaluate_sae(d, class_names=names, **kw)
    assert res["labels"]["kind"] == "model_classes" and res["labels"]["class_names_source"] == str(names)
    with torch.no_grad():
        pred = resnet.model(resnet.preprocess(sorted(imgs.rglob("*.png")))).argmax(-1)
    want = torch.tensor([2] * 3 + [1] * 3)  # ant/… then cow/… (sorted files)
    assert res["accuracy"] == pytest.approx(float((pred == want).float().mean()))
    with pytest.raises(MismatchError, match=r"'ant'.*'cow'|'cow'.*'ant'"):
        evaluate_sae(d, labels="class_names", **kw)  # the model has no class names: a clear error
    assert evaluate_sae(d, labels="predicted", **kw)["accuracy"] == 1.0


# ----- token kinds, outliers, activation normalisation ----------------------------------------------------------
@pytest.fixture(scope="module")
def vit_acts(tmp_path_factory):
    """A tiny ViT with 2 register tokens, every token stored (tokens='all'); a planted high-norm patch token
    in image 2 and the class token of image 5 made high-norm too."""
    from timm.models.vision_transformer import VisionTransformer

    from sae_cafe.models import make_adapter

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                          reg_tokens=2)
    vit = make_adapter(m.eval(), "tiny_vit_reg", resize=None)

    def plant(_m, _i, out):
        out = out.clone()
        for i, t in ((2, 3 + 6), (5, 0)) if out.shape[0] > 5 else ():  # not in the adapter's 1-image probe
            out[i, t] = out[i, t] / out[i, t].norm() * out[i, 3:].norm(dim=-1).max() * 4
        return out

    h = m.blocks[0].register_forward_hook(plant)
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    try:
        with pytest.warns(UserWarning, match="2 high-norm outlier tokens"):
            d = extract_activations(vit, x, "blocks.0", root=tmp_path_factory.mktemp("v"), tokens="all",
                                    shard_size=64, progress=False)["blocks.0"]
    finally:
        h.remove()
    return d


def _rows_of(reader, kinds, image_hi, outliers=None):
    """The acts rows of these kinds (and outlier flag, if given) of images < image_hi, as a set of bytes."""
    out = set()
    for sh in reader.iter_shards():
        for j in range(sh["acts"].shape[0]):
            from sae_cafe.activations.shards import TOKEN_KINDS

            if TOKEN_KINDS[int(sh["kind"][j])] in kinds and int(sh["image"][j]) < image_hi and (
                    outliers is None or int(sh["outlier"][j]) == outliers):
                out.add(sh["acts"][j].numpy().tobytes())
    return out


def test_default_training_sees_only_patch_rows(tmp_path, vit_acts, monkeypatch):
    """The default (tokens='patch') serves only patch rows; tokens='cls' only class tokens; the manifest and
    cfg metadata record the setting; outlier rows are trained on with a note, or left out."""
    r = ShardReader(vit_acts)
    served = []
    orig = ShardDataProvider.__next__

    def record(self):
        b = orig(self)
        served.append(b.clone())
        return b

    monkeypatch.setattr(ShardDataProvider, "__next__", record)
    kw = dict(architecture="topk", k=4, expansion=2, steps=6, batch_size=32, holdout=0.1, n_checkpoints=0,
              progress=False, evaluate=False)
    with pytest.warns(UserWarning, match="trained on 1 high-norm outlier rows"):
        res = train_sae(vit_acts, tmp_path / "patch", **kw)
    patch = _rows_of(r, ("patch",), 18)
    got = {a.numpy().tobytes() for a in torch.cat(served)}
    assert got <= patch and len(got) > 100
    man = json.loads((tmp_path / "patch" / "manifest.json").read_text())
    assert man["tokens"] == "patch" and man["outliers"] == "report"
    assert man["training_rows"] == {"n": 18 * 16, "outliers": 1, "outliers_excluded": 0}
    assert any("outlier" in n for n in man["notes"]) and res["notes"] == man["notes"]
    cfg = json.loads((tmp_path / "patch" / "cfg.json").read_text())
    assert cfg["metadata"]["sae_cafe"]["tokens"] == "patch"

    served.clear()
    train_sae(vit_acts, tmp_path / "cls", tokens="cls", **{**kw, "batch_size": 4})
    got = {a.numpy().tobytes() for a in torch.cat(served)}
    assert got <= _rows_of(r, ("cls",), 18) and len(got) >= 10  # of the 18 training images' class tokens
    assert json.loads((tmp_path / "cls" / "manifest.json").read_text())["training_rows"]["outliers"] == 1

    served.clear()
    train_sae(vit_acts, tmp_path / "excl", outliers="exclude", **kw)
    got = {a.numpy().tobytes() for a in torch.cat(served)}
    assert got <= _rows_of(r, ("patch",), 18, outliers=0) and not got & _rows_of(r, ("patch",), 18, outliers=1)
    assert json.loads((tmp_path / "excl" / "manifest.json").read_text())["training_rows"] == {
        "n": 18 * 16 - 1, "outliers": 0, "outliers_excluded": 1}


def test_token_setting_the_shards_lack_is_a_clear_error(tmp_path, acts):
    from sae_cafe.errors import SaeCafeError

    with pytest.raises(SaeCafeError, match=r"tokens='cls' selects no training PFV .* extracted with tokens='patch'"):
        train_sae(acts, tmp_path / "s", tokens="cls", **_small())
    with pytest.raises(SaeCafeError, match="not a token setting"):
        train_sae(acts, tmp_path / "s", tokens="registers", **_small())
    with pytest.raises(SaeCafeError, match="outliers='drop'"):
        train_sae(acts, tmp_path / "s", outliers="drop", **_small())


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_normalisation_is_undone_in_model_units(tmp_path, acts, arch, monkeypatch):
    """normalize='expected_average_only_in': the factor is √d_in / the exact mean norm of the training rows
    (float64 reference), recorded in the manifest and cfg; the exported (folded) SAE's latents and
    reconstructions in model units equal the trained SAE on scaled inputs with the scale undone, and
    run_with_saes gives the logits of that reference reconstruction. Compared in float64 to 1e-6 relative: the
    export folds the factor into float32 weights (the exact float64 folding check is in test_saes)."""
    import copy

    from sae_cafe import saes
    from sae_training import train as train_mod

    captured = {}
    orig = train_mod.finish_trainer

    def keep(trainer):
        captured["sae"] = copy.deepcopy(trainer.sae)
        captured["s"] = trainer.activation_scaler.scaling_factor
        orig(trainer)

    monkeypatch.setattr(train_mod, "finish_trainer", keep)
    out = tmp_path / arch
    train_sae(acts, out, architecture=arch, k=8, expansion=2, normalize="expected_average_only_in", **_small())
    r = ShardReader(acts)
    prov = r.provenance(torch.arange(r.n))
    x_train = r[torch.arange(r.n)][prov[:, 0] < 36].double()  # holdout 0.1 of 40 images
    s_ref = 128 ** 0.5 / x_train.norm(dim=-1).mean()
    man = json.loads((out / "manifest.json").read_text())
    norm = man["activation_norm"]
    assert norm["normalize"] == "expected_average_only_in" and norm["rows"] == x_train.shape[0]
    assert norm["scaling_factor"] == pytest.approx(float(s_ref), rel=1e-12)
    assert captured["s"] == pytest.approx(float(s_ref), rel=1e-12)
    assert (x_train * norm["scaling_factor"]).norm(dim=-1).mean() == pytest.approx(128 ** 0.5, rel=1e-12)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"  # folded into the weights
    assert cfg["metadata"]["sae_cafe"]["activation_norm"]["scaling_factor"] == norm["scaling_factor"]

    s = float(s_ref)
    trained = captured["sae"].double().eval()
    loaded = saes.load_sae(out).double()
    x = r[torch.arange(r.n)][prov[:, 0] >= 36].double()
    with torch.no_grad():
        z_ref = trained.encode(x * s)
        rec_ref = trained.decode(z_ref) / s
        z = saes.encode_pfv(loaded, x)
        rec = saes.decode(loaded, z)
    assert (z_ref != 0).any() and torch.equal(z != 0, z_ref != 0)
    # a top-k SAE that ranks pre-activations × decoder norms (sae-lens rescale_acts_by_decoder_norm) reads
    # its latents as contribution norms, which the fold turns into model units (÷ s); other latents are equal
    c = 1 / s if getattr(loaded.cfg, "rescale_acts_by_decoder_norm", False) else 1.0
    torch.testing.assert_close(z, z_ref * c, rtol=1e-6, atol=1e-6 * float(z_ref.abs().max()))
    torch.testing.assert_close(rec, rec_ref, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
    assert (rec - x).norm() < x.norm()  # reconstructions are in the model's units, not scaled ones

    model = tiny_resnet()
    model.model.double()
    xi = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def ref_hook(_m, _i, act):
        pfv = act.flatten(2).transpose(1, 2)
        rec = trained.decode(trained.encode(pfv * s)) / s
        return rec.transpose(1, 2).reshape(act.shape)

    with torch.no_grad():
        got = saes.run_with_saes(model, xi, {"layer2": loaded}, check=False)
        h = model.model.layer2.register_forward_hook(ref_hook)
        try:
            want = model.model(xi)
        finally:
            h.remove()
        plain = model.model(xi)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_normalisation_off_records_none(tmp_path, acts):
    train_sae(acts, tmp_path / "n", architecture="topk", k=8, expansion=2, normalize="none", **_small())
    man = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert man["activation_norm"] == {"normalize": "none"}


def test_pipeline_settings_carry_the_token_and_normalisation_keys():
    """[extract] tokens / outlier_k and [sae] tokens / outliers / normalize reach the training config unchanged
    (same field names); bad values fail when the config is read."""
    import dataclasses

    from sae_cafe.errors import SaeCafeError
    from sae_training.pipeline.extract import ExtractSettings
    from sae_training.pipeline.sae import SAESettings

    s = SAESettings(tokens="all", outliers="exclude", normalize="none")
    cfg = SAETrainConfig(**dataclasses.asdict(s))
    assert (cfg.tokens, cfg.outliers, cfg.normalize) == ("all", "exclude", "none")
    assert SAESettings().normalize == SAETrainConfig().normalize and SAESettings().tokens == "patch"
    assert ExtractSettings().tokens == "patch" and ExtractSettings(tokens="cls").outlier_k == 10.0
    with pytest.raises(SaeCafeError, match=r"\[sae\] tokens='cls-only'"):
        SAESettings(tokens="cls-only")
    with pytest.raises(SaeCafeError, match=r"\[sae\] outliers='drop'"):
        SAESettings(outliers="drop")
    with pytest.raises(SaeCafeError, match=r"\[extract\] tokens='x'"):
        ExtractSettings(tokens="x")


def test_cli_token_kinds_outliers_normalize_flags():
    from sae_cafe.cli import build_parser
    from sae_training.cli import config_from_args

    args = build_parser().parse_args(["train-sae", "--acts", "x", "--token-kinds", "cls", "--outliers", "exclude",
                                      "--normalize", "none"])
    cfg = config_from_args(args)
    assert (cfg.tokens, cfg.outliers, cfg.normalize) == ("cls", "exclude", "none")
    args = build_parser().parse_args(["train-sae", "--stream", "--tokens", "5000"])  # the streamed PFV budget
    assert config_from_args(args).tokens == "patch"
