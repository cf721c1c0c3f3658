"""Sharing Ratio Decomposition: class saliency, iERFs, hidden relevance and APOP — one API (``api``) over
per-family backends (``backend.SRDBackend``: the CNN stage graph, the ViT token/attention backend)."""

from .api import apop_forward, srd_diagnostics, srd_ierf, srd_ierf_from_relevance, srd_relevance, srd_saliency
from .backend import SRDBackend

__all__ = ["SRDBackend", "apop_forward", "srd_diagnostics", "srd_ierf", "srd_ierf_from_relevance", "srd_relevance",
           "srd_saliency"]
