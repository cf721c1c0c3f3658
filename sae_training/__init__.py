"""SAE training on activation shards through sae-lens: data provider, training, evaluation, CLI."""

from .data import ShardDataProvider, holdout_split
from .evaluate import evaluate_sae, firing_histogram_png
from .train import ARCHITECTURES, SAETrainConfig, make_training_sae, train_sae

__all__ = ["ARCHITECTURES", "SAETrainConfig", "ShardDataProvider", "evaluate_sae", "firing_histogram_png",
           "holdout_split", "make_training_sae", "train_sae"]
