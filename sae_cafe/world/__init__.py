"""Embedded concept world: generated 64×64 scenes with ground truth, export/loading, mini-model training."""

from .dataset import WorldDataset, WorldSample, load_world, write_world
from .generator import World, WorldConfig, generate
from .vocab import BACKGROUNDS, CLASS_NAMES, COLOURS, NUM_CLASSES, PATTERNS, SHAPES, vocabulary

__all__ = ["BACKGROUNDS", "CLASS_NAMES", "COLOURS", "NUM_CLASSES", "PATTERNS", "SHAPES", "World",
           "WorldConfig", "WorldDataset", "WorldSample", "generate", "load_world", "vocabulary",
           "write_world"]
