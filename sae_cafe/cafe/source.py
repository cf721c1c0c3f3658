"""Image sources of CAFE: the package's one :class:`~sae_cafe.image_source.ImageSource` (re-exported here)."""

from __future__ import annotations

from ..image_source import ImageSource

__all__ = ["ImageSource"]
