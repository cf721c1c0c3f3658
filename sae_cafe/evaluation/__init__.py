"""Saliency evaluation: metrics (torch, batched) under two definition sets (``source`` / ``paper``,
docs/metrics.md), baselines registry (incl. ViT attention baselines), manipulation attack, benchmark.

Heavy libraries (Captum, pytorch-grad-cam, zennit, skimage) are imported inside the functions that use them.
"""

from .baselines import REGISTRY, NotApplicable, applicability, explain, list_baselines, register_baseline
from .benchmark import (
           BenchmarkConfig,
           BenchmarkConfigError,
           BenchmarkResult,
           run_saliency_benchmark,
           run_saliency_definitions,
           write_saliency_benchmark,
)
from .definitions import DEFINITIONS, get_definitions
from .map_cache import MapCache
from .metrics import (
           METRICS,
           attribution_localisation,
           evaluate_maps,
           insertion_deletion,
           mu_fidelity,
           pointing_game,
           sparseness,
           stability,
)
from .postprocess import METRIC_POSTPROCESS, for_metric

__all__ = ["DEFINITIONS", "METRICS", "METRIC_POSTPROCESS", "REGISTRY", "BenchmarkConfig", "BenchmarkConfigError",
           "BenchmarkResult", "MapCache", "NotApplicable", "get_definitions", "run_saliency_definitions",
           "applicability", "attribution_localisation", "evaluate_maps", "explain", "for_metric",
           "insertion_deletion", "list_baselines", "mu_fidelity", "pointing_game", "register_baseline",
           "run_saliency_benchmark", "sparseness", "stability", "write_saliency_benchmark"]
