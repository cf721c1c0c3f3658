"""The sae-lens seams of SAE-training checkpoints (sae_training.checkpoint): fails loudly when an upgrade of
sae-lens changes the trainer state or the methods relied on; checkpoints hold no pickles."""

from __future__ import annotations

import inspect

import pytest
import torch
from sae_lens.training.sae_trainer import SAETrainer

from sae_cafe.activations.extract import extract_activations
from sae_cafe.errors import ArtifactError, SaeCafeError
from sae_training import checkpoint
from sae_training.data import ShardDataProvider
from sae_training.train import SAETrainConfig, make_trainer, make_training_sae


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from tiny_models import tiny_resnet

    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    acts = extract_activations(tiny_resnet(), x, "layer2", root=tmp_path_factory.mktemp("idx"),
                               progress=False)["layer2"]
    cfg = SAETrainConfig(architecture="jumprelu", steps=10, batch_size=32)
    prov = ShardDataProvider(acts, 32, seed=0)
    tr = make_trainer(make_training_sae(cfg, 128), prov, cfg, 10)
    tr.activation_scaler.scaling_factor = 0.25
    for _ in range(3):
        tr.step(next(prov))
        tr.n_training_steps += 1
    return tr


def test_our_checkpoint_covers_every_field_of_sae_lens_trainer_state(tmp_path, trainer):
    """sae-lens's own ``save_trainer_state`` (a torch pickle, read here with weights_only=True) writes exactly
    the fields our safetensors + JSON checkpoint restores; a new field in a sae-lens upgrade fails here."""
    from sae_lens.constants import TRAINER_STATE_FILENAME

    trainer.save_trainer_state(tmp_path / "theirs")
    theirs = torch.load(tmp_path / "theirs" / TRAINER_STATE_FILENAME, weights_only=True)
    assert set(theirs) == set(checkpoint.TRAINER_STATE_FIELDS)
    checkpoint.save_checkpoint(trainer, tmp_path / "ours", elapsed=1.5, extra={"provider_batches": 3})
    assert all(p.suffix in (".json", ".safetensors") for p in (tmp_path / "ours").iterdir())  # no pickles
    fresh = make_trainer(make_training_sae(SAETrainConfig(architecture="jumprelu", seed=5), 128),
                         trainer.data_provider, SAETrainConfig(architecture="jumprelu", steps=10, batch_size=32), 10)
    assert checkpoint.load_checkpoint(fresh, tmp_path / "ours") == 1.5
    ref = make_trainer(make_training_sae(SAETrainConfig(architecture="jumprelu", seed=7), 128),
                       trainer.data_provider, SAETrainConfig(architecture="jumprelu", steps=10, batch_size=32), 10)
    ref.load_trainer_state(tmp_path / "theirs")  # sae-lens's own restore of the same state
    for f in checkpoint.TRAINER_STATE_FIELDS:
        a, b = getattr(fresh, f), getattr(ref, f)
        if f in ("optimizer", "lr_scheduler"):
            a, b = a.state_dict(), b.state_dict()
        elif f == "coefficient_schedulers":
            a, b = {k: v.state_dict() for k, v in a.items()}, {k: v.state_dict() for k, v in b.items()}
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f
        elif f == "optimizer":
            assert a["param_groups"] == b["param_groups"]
            for pid, st in a["state"].items():
                for k, v in st.items():
                    assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k])), (f, pid, k)
        else:
            assert a == b, f
    assert fresh.activation_scaler.scaling_factor == ref.activation_scaler.scaling_factor == 0.25


def test_methods_and_attributes_relied_on_exist(trainer):
    checkpoint.check_seams(trainer)
    for name, params in checkpoint.TRAINER_METHODS.items():
        assert set(params) <= set(inspect.signature(getattr(SAETrainer, name)).parameters), name
    # step() must not advance n_training_steps (the loop does, after logging and checkpointing)
    n = trainer.n_training_steps
    trainer.step(next(trainer.data_provider))
    assert trainer.n_training_steps == n


def test_a_changed_seam_is_a_clear_error(monkeypatch, trainer):
    monkeypatch.delattr(SAETrainer, "maybe_reset_sparsity")
    with pytest.raises(SaeCafeError, match=r"lacks SAETrainer.maybe_reset_sparsity\(\).*pinned"):
        checkpoint.check_seams()


def test_incomplete_checkpoint_is_refused(tmp_path, trainer):
    checkpoint.save_checkpoint(trainer, tmp_path / "ck", elapsed=0.0)
    (tmp_path / "ck" / checkpoint.SCALER).unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        checkpoint.load_checkpoint(trainer, tmp_path / "ck")
    assert checkpoint.latest_checkpoint(tmp_path) is None  # only step_* directories count
