"""Saliency evaluation: metrics (torch, batched), baselines registry, manipulation attack, benchmark.

Heavy libraries (Captum, pytorch-grad-cam, zennit, skimage) are imported inside the functions that use them.
"""

from .baselines import REGISTRY, NotApplicable, applicability, explain, list_baselines, register_baseline
from .benchmark import BenchmarkConfig, BenchmarkResult, run_saliency_benchmark, write_saliency_benchmark
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

__all__ = ["METRICS", "METRIC_POSTPROCESS", "REGISTRY", "BenchmarkConfig", "BenchmarkResult", "NotApplicable",
           "applicability", "attribution_localisation", "evaluate_maps", "explain", "for_metric",
           "insertion_deletion", "list_baselines", "mu_fidelity", "pointing_game", "register_baseline",
           "run_saliency_benchmark", "sparseness", "stability", "write_saliency_benchmark"]
