"""PFV extraction into sharded safetensors with provenance (:func:`extract_activations`, :class:`ShardReader`)."""

from .extract import ExtractConfig, extract_activations
from .shards import ShardReader, ShardWriter, parse_dtype

__all__ = ["ExtractConfig", "ShardReader", "ShardWriter", "extract_activations", "parse_dtype"]
