"""Audit a dictionary trained elsewhere: read SAEs from SAELens folders, saev checkpoints and ViT-Prisma SAEs
(:func:`load_foreign_sae`) and convert them into sae-cafe's SAE stage (:func:`convert_sae`,
``sae-cafe convert-sae``), hook names mapped to layer ids (:func:`map_hook_name`). See ``docs/sae_import.md``."""

from .common import FORMATS, ForeignSAE, ImportFormatError
from .convert import ConvertConfig, convert_sae, resolve_import_layer
from .formats import load_foreign_sae, read_prisma, read_saelens, read_saev
from .hooks import map_hook_name

__all__ = ["FORMATS", "ConvertConfig", "ForeignSAE", "ImportFormatError", "convert_sae", "load_foreign_sae",
           "map_hook_name", "read_prisma", "read_saelens", "read_saev", "resolve_import_layer"]
