"""Resumable mini-model training: an interrupted run continues to the same weights as an uninterrupted one;
schedules, seeds and the distillation loss against hand-written references (tiny configs, seconds)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sae_cafe.errors import SaeCafeError
from sae_cafe.world.checkpoint import read_checkpoint_state
from sae_cafe.world.train import (
    EVAL_SEED_BASE,
    TrainConfig,
    _loss,
    _same_schedule_until,
    batch_seed,
    config_for,
    decay_start,
    lr_at,
    train_model,
)


class Interrupt(Exception):
    pass


def tiny(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, warmup=2, schedule="wsd", decay_frac=0.5, data="fresh", augment=True,
                distill=None, threads=1, eval_n=12, probe_n=8, probe_every=3, checkpoint_every=2, log_every=1)
    return config_for("mini_vit", **{**base, **kw})


def run(cfg, tmp_path, name, ckpt="ckpt", stop_at=None):
    def log(line):
        if stop_at is not None and json.loads(line).get("step") == stop_at and "resumed_from" not in line:
            raise Interrupt
    return train_model(cfg, out=tmp_path / name / "model", checkpoint_dir=tmp_path / ckpt, log=log)


def weights(tmp_path, name):
    return load_file(str(tmp_path / name / "model.safetensors"))


def strip_times(history):
    return [{k: v for k, v in h.items() if k not in ("cpu_s", "elapsed_s")} for h in history]


@pytest.mark.parametrize("data", ["fresh", "pool"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, data):
    cfg = tiny(data=data, train_images=16)
    straight = run(cfg, tmp_path / "a", "out")
    with pytest.raises(Interrupt):
        run(cfg, tmp_path / "b", "out", stop_at=5)  # dies after step 5; the last checkpoint is step 4
    assert read_checkpoint_state(tmp_path / "b" / "ckpt" / "checkpoint.safetensors")["step"] == 4
    (tmp_path / "b" / "ckpt" / ".checkpoint.safetensors.tmp999").write_bytes(b"partial")  # a killed write
    resumed = run(cfg, tmp_path / "b", "out")
    assert not (tmp_path / "b" / "ckpt" / ".checkpoint.safetensors.tmp999").exists()
    wa, wb = weights(tmp_path / "a", "out"), weights(tmp_path / "b", "out")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["resumed"][0]["step"] == 4 and straight["resumed"] == []
    assert strip_times(resumed["history"]) == strip_times(straight["history"])
    assert resumed["eval"] == straight["eval"] and resumed["images_seen"] == 6 * 4
    # a finished run rerun with the same settings only re-evaluates
    again = run(cfg, tmp_path / "b", "out")
    assert again["eval"] == straight["eval"]


def test_wsd_run_extends_from_the_stable_checkpoint(tmp_path):
    short, longer = tiny(), tiny(steps=8)
    assert (decay_start(short), decay_start(longer)) == (3, 4)
    run(short, tmp_path, "short")
    assert read_checkpoint_state(tmp_path / "ckpt" / "checkpoint-stable.safetensors")["step"] == 3
    ext = run(longer, tmp_path, "ext")  # the step-6 checkpoint is past the old decay start: skipped
    assert ext["resumed"][-1]["step"] == 3 and ext["resumed"][-1]["from"] == "checkpoint-stable.safetensors"
    assert ext["resumed"][-1]["skipped"]
    run(longer, tmp_path, "ref", ckpt="ckpt_ref")
    we, wr = weights(tmp_path, "ext"), weights(tmp_path, "ref")
    assert all(torch.equal(we[k], wr[k]) for k in wr)


def test_schedule_compatibility():
    a, b = tiny(steps=6, decay_frac=0.5), tiny(steps=8, decay_frac=0.25)  # decays start at 3 and 6
    assert _same_schedule_until(a, b, 3) and not _same_schedule_until(a, b, 4)
    assert all(lr_at(s, a) == lr_at(s, b) for s in range(4)) and lr_at(4, a) != lr_at(4, b)
    cos = tiny(schedule="cosine")
    assert _same_schedule_until(cos, cos, 6) and not _same_schedule_until(cos, replace(cos, steps=7), 1)


def test_resume_refuses_other_settings(tmp_path):
    run(tiny(steps=4), tmp_path, "a")
    with pytest.raises(SaeCafeError, match="lr"):
        run(tiny(steps=4, lr=1e-2), tmp_path, "b")
    run(tiny(steps=4, schedule="cosine"), tmp_path, "c", ckpt="ckpt_cos")
    with pytest.raises(SaeCafeError, match="steps=5"):  # a cosine schedule depends on steps everywhere
        run(tiny(steps=5, schedule="cosine"), tmp_path, "c", ckpt="ckpt_cos")


def test_learning_rate_schedules():
    cos = TrainConfig(steps=110, warmup=10, lr=1.0, schedule="cosine")
    assert [lr_at(s, cos) for s in (0, 9)] == [0.1, 1.0]
    assert lr_at(60, cos) == pytest.approx(0.5) and lr_at(10, cos) == 1.0 and lr_at(110, cos) == pytest.approx(0)
    wsd = TrainConfig(steps=100, warmup=10, lr=2.0, schedule="wsd", decay_frac=0.2)
    assert decay_start(wsd) == 80
    assert lr_at(50, wsd) == lr_at(79, wsd) == 2.0
    assert lr_at(80, wsd) == 2.0 and lr_at(90, wsd) == pytest.approx(1.0) and lr_at(99, wsd) == pytest.approx(0.1)


def test_training_seeds_stay_below_evaluation_seeds():
    assert batch_seed(79, 9_999_999) < EVAL_SEED_BASE
    assert batch_seed(0, 0) > 16384  # above every pool seed
    for bad in (dict(seed=80), dict(steps=10_000_000), dict(eval_seed=5), dict(schedule="step"),
                dict(data="disk"), dict(distill_alpha=1.5)):
        with pytest.raises(SaeCafeError):
            TrainConfig(**bad).validate()


def test_distillation_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (5,), generator=g)
    cfg = TrainConfig(distill="x", distill_alpha=0.3, distill_temperature=3.0, label_smoothing=0.1)
    # hand-written: KL(p_t || p_s) with softened softmaxes, times T², mixed with smoothed cross-entropy
    ps, pt = torch.softmax(s / 3, 1), torch.softmax(t / 3, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean() * 9
    target = torch.full((5, 12), 0.1 / 12, dtype=torch.float64)
    target[torch.arange(5), y] += 0.9
    ce = -(target * torch.log_softmax(s, 1)).sum(1).mean()
    assert _loss(s, y, t, cfg).item() == pytest.approx((0.7 * ce + 0.3 * kl).item(), rel=1e-12)
    assert _loss(s, y, s, cfg).item() == pytest.approx(0.7 * ce.item(), rel=1e-12)  # KL(p‖p) = 0
    assert _loss(s, y, None, cfg).item() == pytest.approx(F.cross_entropy(s, y, label_smoothing=0.1).item())
    assert math.isfinite(_loss(s, y, t, cfg).item())


def test_distilled_run_records_teacher(tmp_path):
    rec = run(tiny(steps=2, distill="mini_resnet", checkpoint_every=1), tmp_path, "d")
    assert rec["teacher"]["model"] == "mini_resnet" and len(rec["teacher"]["weights_sha256"]) == 64
    assert rec["architecture"]["patch_size"] == 8 and "distillation from mini_resnet" in rec["recipe"]
    assert "--checkpoint-dir" in rec["command"] and rec["cpu_time_s"] > 0


def test_cli_train_model_resumes(tmp_path, capsys):
    from sae_cafe.cli import main

    args = ["train-model", "--arch", "mini_vit", "--steps", "3", "--batch-size", "2", "--warmup", "1",
            "--distill", "none", "--eval-n", "8", "--checkpoint-every", "1", "--threads", "1",
            "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "m")]
    assert main(args) == 0
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["config"]["distill"] is None and rec["config"]["data"] == "fresh" and rec["eval"]["n"] == 8
    assert "--distill none" in rec["command"] and "--steps 3" in rec["command"]
    assert main(args) == 0  # finished: resumes at step 3 and only re-evaluates
    assert "resumed_from" in capsys.readouterr().out
