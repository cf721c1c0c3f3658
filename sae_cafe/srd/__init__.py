"""Sharing Ratio Decomposition: class saliency, iERFs, hidden relevance and APOP for CNNs and ViTs."""

from .api import apop_forward, srd_diagnostics, srd_ierf, srd_ierf_from_relevance, srd_relevance, srd_saliency

__all__ = ["apop_forward", "srd_diagnostics", "srd_ierf", "srd_ierf_from_relevance", "srd_relevance",
           "srd_saliency"]
