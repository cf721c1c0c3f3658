"""Error types. Every error names the offending input and says what to do about it."""

from __future__ import annotations


class SaeCafeError(Exception):
    """Base class for user-facing errors (the CLI prints them without a traceback)."""


class UnknownLayerError(SaeCafeError, KeyError):
    """A layer id that the model adapter does not list."""

    def __init__(self, layer: object, model_name: str, valid: list[str]):
        self.layer, self.valid = layer, valid
        shown = ", ".join(valid[:40]) + (" …" if len(valid) > 40 else "")
        super().__init__(f"unknown layer {layer!r} for model {model_name!r}; valid PFV layers: {shown}")

    def __str__(self) -> str:  # KeyError would add quotes
        return self.args[0]


class ImageReadError(SaeCafeError, ValueError):
    """An image file that cannot be decoded."""


class WeightsError(SaeCafeError, ValueError):
    """A weights file that is missing, unreadable or does not fit the architecture."""


class UnsupportedModuleError(SaeCafeError, TypeError):
    """A module type that SRD has no rule for."""


class ArtifactError(SaeCafeError, RuntimeError):
    """A missing, partial, corrupt or incompatible artifact directory."""


class NonFiniteError(SaeCafeError, FloatingPointError):
    """NaN or inf in inputs, weights or activations."""


class MismatchError(SaeCafeError, ValueError):
    """Two artifacts (model, layer, SAE, shards) that do not belong together."""
