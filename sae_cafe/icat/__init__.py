"""ICAT: interlayer concept attribution between SAE latents, concept graphs and dominant routes.

``attribute(model, saes, x, source_layer, target_layer, method="ig", steps=32, baseline="zeros")`` →
(N, S_source, S_target); ``insertion_deletion`` (the interlayer faithfulness protocol); ``build_graph`` /
``dominant_route``; ``pgd``/``fgsm``; ``build_icat`` writes ``indexes/<run>/icat/<model>/``.
"""

from .adversarial import fgsm, flip_rate, pgd
from .attribute import (
    LOGITS,
    METHODS,
    ICATResult,
    PairContext,
    attribute,
    attribute_pair,
    ig_quadrature,
    latent_means,
    prepare_pair,
    sae_encode_with_pre,
)
from .graph import (
    GraphConfig,
    aggregate_graphs,
    build_graph,
    card_path,
    class_node,
    graph_from_json,
    graph_to_json,
    node_id,
    read_graph,
    write_graph,
)
from .pipeline import ICATConfig, build_icat, case_studies
from .protocol import CurveResult, insertion_deletion
from .routes import Route, compare_routes, dominant_route, jaccard, random_route

__all__ = ["LOGITS", "METHODS", "CurveResult", "GraphConfig", "ICATConfig", "ICATResult", "PairContext",
           "Route", "aggregate_graphs", "attribute", "attribute_pair", "build_graph", "build_icat",
           "card_path", "case_studies", "class_node", "compare_routes", "dominant_route", "fgsm", "flip_rate",
           "graph_from_json", "graph_to_json", "ig_quadrature", "insertion_deletion", "jaccard",
           "latent_means", "node_id", "pgd", "prepare_pair", "random_route", "read_graph", "sae_encode_with_pre",
           "write_graph"]
