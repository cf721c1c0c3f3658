"""CAFE — Concept-Anchored Feature Explanation: SAE latents anchored to the SRD iERFs of their top exemplars.

``build_cafe(model, sae, layer, images, run=...)`` mines top-k exemplars, anchors them to iERFs and indexes
them with FAISS; ``query(...)`` searches by example; ``concept_card(...)`` summarises one latent.
"""

from .build import CafeConfig, build_cafe
from .cards import concept_card
from .index import make_index, read_index
from .query import query
from .store import Cafe, ExemplarRecord, load_cafe
from .topk import TopKMiner, TopKState, gather_topk, merge_topk

__all__ = ["Cafe", "CafeConfig", "ExemplarRecord", "TopKMiner", "TopKState", "build_cafe", "concept_card",
           "gather_topk", "load_cafe", "make_index", "merge_topk", "query", "read_index"]
