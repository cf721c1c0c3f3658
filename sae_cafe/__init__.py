"""sae-cafe: explain vision models from pixels (SRD, iERFs) to concepts (SAEs, CAFE) to decisions (ICAT)."""

__version__ = "0.1.0"
