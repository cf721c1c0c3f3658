"""PFV extraction into sharded safetensors with provenance (:func:`extract_activations`, :class:`ShardReader`),
and the one images → PFV rows path every other module uses (:mod:`.rows`: :func:`capture_pfv`,
:func:`pfv_rows`, :func:`token_pfv`)."""

from .extract import ExtractConfig, extract_activations
from .rows import capture_pfv, layer_pfv, pfv_rows, prefix_index, token_pfv
from .shards import ShardReader, ShardWriter, parse_dtype

__all__ = ["ExtractConfig", "ShardReader", "ShardWriter", "capture_pfv", "extract_activations", "layer_pfv",
           "parse_dtype", "pfv_rows", "prefix_index", "token_pfv"]
