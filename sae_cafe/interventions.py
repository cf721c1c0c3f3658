"""Interventions on SAE latents inside a vision model: clamp, scale, zero or add a latent at chosen positions.

An :class:`Intervention` names a layer, a latent, an operation and where on the layer grid it applies (all
positions, a :class:`Box`, a boolean mask (h, w) or :class:`Tokens` — grid positions in row-major order, the
patch tokens of a ViT). ``sae_cafe.saes.run_with_saes(..., interventions=...)`` runs the model with every
intervened layer's output replaced by

    out' = out + decode(a') − decode(a)           (keep_error, the default with interventions)
    out' = decode(a')                              (keep_error=False: the SAE reconstruction replaces out)

where ``a = encode(out)`` and ``a'`` is ``a`` after the interventions. Keeping the SAE's reconstruction
error this way makes a no-op intervention (scale 1, add 0) reproduce the model's output bit for bit, and an
intervention change only what the edited latents decode to. ViT class/register tokens are never edited.

Written by hand: sae-lens edits latents only inside language models (``HookedSAETransformer``); the vision
splice (PFV layout, grid positions, class tokens) is this package's own (:mod:`sae_cafe.saes`).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import SaeCafeError
from .models import ModelAdapter

OPS: tuple[str, ...] = ("clamp", "scale", "zero", "add")


class InterventionError(SaeCafeError, ValueError):
    """An intervention that does not fit the model, its SAE or the layer grid."""


@dataclass(frozen=True)
class Box:
    """Rows ``r0 ≤ r < r1`` and columns ``c0 ≤ c < c1`` of the layer grid (half-open, grid units)."""

    r0: int
    c0: int
    r1: int
    c1: int


@dataclass(frozen=True)
class Tokens:
    """Grid positions by index ``n = row · w + col`` (row-major; for a ViT: the patch tokens, class and
    register tokens excluded)."""

    indices: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))


@dataclass(frozen=True)
class Intervention:
    """Edit latent ``latent`` of the SAE at ``layer``.

    Args:
        layer: layer id (as in ``run_with_saes``'s ``saes`` keys; aliases allowed).
        latent: SAE latent id in ``[0, d_sae)``.
        op: ``"zero"`` (a = 0), ``"clamp"`` (a = value), ``"scale"`` (a ·= value), ``"add"`` (a += value).
        value: the operand (ignored by ``zero``; note the default 0 makes ``scale`` an ablation too).
        where: ``"all"`` positions, a :class:`Box` (a plain 4-tuple (r0, c0, r1, c1) is read as a box), a boolean
            mask (h, w) (tensor, array or nested lists; stored as a tuple of tuples) or :class:`Tokens`.
    """

    layer: str | int
    latent: int
    op: Literal["clamp", "scale", "zero", "add"] = "zero"
    value: float = 0.0
    where: Any = "all"

    def __post_init__(self):
        if self.op not in OPS:
            raise InterventionError(f"unknown intervention op {self.op!r}; choose one of {OPS}")
        try:
            object.__setattr__(self, "latent", operator.index(self.latent))
        except TypeError:
            raise InterventionError(f"latent must be an integer id, got {self.latent!r}") from None
        try:
            v = float(self.value)
        except (TypeError, ValueError):
            raise InterventionError(f"intervention value must be a number, got {self.value!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise InterventionError(f"intervention value must be finite, got {self.value!r}")
        object.__setattr__(self, "value", v)
        w = self.where
        if w is None or (isinstance(w, str) and w == "all"):
            object.__setattr__(self, "where", "all")
        elif isinstance(w, str):
            raise InterventionError(f"where={w!r}: use 'all', a Box, a boolean (h, w) mask or Tokens")
        elif isinstance(w, Box | Tokens):
            pass
        elif isinstance(w, tuple) and len(w) == 4 and all(isinstance(i, int) for i in w):
            object.__setattr__(self, "where", Box(*w))
        else:
            try:
                m = torch.as_tensor(w)
            except (TypeError, ValueError, RuntimeError):
                raise InterventionError(f"where={w!r}: use 'all', a Box, a boolean (h, w) mask or Tokens") from None
            if m.ndim != 2 or m.dtype != torch.bool:
                raise InterventionError(f"a mask `where` must be a boolean (h, w) array, got dtype {m.dtype} "
                                        f"shape {tuple(m.shape)}; use Box or Tokens for indices")
            object.__setattr__(self, "where", tuple(tuple(bool(b) for b in row) for row in m.tolist()))

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Boolean (h·w,) selection of the grid positions this intervention edits (row-major)."""
        h, w = grid
        sel = torch.zeros(h, w, dtype=torch.bool)
        where = self.where
        if where == "all":
            sel[:] = True
        elif isinstance(where, Box):
            b = where
            if not (0 <= b.r0 < b.r1 <= h and 0 <= b.c0 < b.c1 <= w):
                raise InterventionError(f"box (r0={b.r0}, c0={b.c0}, r1={b.r1}, c1={b.c1}) is empty or outside the "
                                        f"{h}×{w} grid of layer {self.layer!r}; use 0 ≤ r0 < r1 ≤ {h}, "
                                        f"0 ≤ c0 < c1 ≤ {w}")
            sel[b.r0:b.r1, b.c0:b.c1] = True
        elif isinstance(where, Tokens):
            bad = [i for i in where.indices if not 0 <= i < h * w]
            if bad or not where.indices:
                raise InterventionError(f"token indices {bad or '(none)'} of layer {self.layer!r} are outside the "
                                        f"{h * w} grid positions (row-major {h}×{w}; class tokens excluded)")
            sel.view(-1)[list(where.indices)] = True
        else:
            m = torch.tensor(where, dtype=torch.bool)
            if tuple(m.shape) != (h, w):
                raise InterventionError(f"mask of shape {tuple(m.shape)} does not fit the {h}×{w} grid of layer "
                                        f"{self.layer!r}; pass a boolean ({h}, {w}) mask")
            sel = m
        return sel.reshape(-1)


def edit_latents(a_BNS: torch.Tensor, interventions: Sequence[Intervention], grid: tuple[int, int]
                 ) -> torch.Tensor:
    """Latents (B, N, S) with ``interventions`` applied in order (a new tensor; ``a_BNS`` is unchanged)."""
    out = a_BNS.clone()
    S = a_BNS.shape[-1]
    for iv in interventions:
        if not 0 <= iv.latent < S:
            raise InterventionError(f"latent {iv.latent} out of range for the SAE at layer {iv.layer!r} "
                                    f"(d_sae={S}); use an id in [0, {S})")
        sel = iv.positions(grid).to(out.device)
        col = out[:, sel, iv.latent]
        if iv.op == "zero":
            col = torch.zeros_like(col)
        elif iv.op == "clamp":
            col = torch.full_like(col, iv.value)
        elif iv.op == "scale":
            col = col * iv.value
        else:
            col = col + iv.value
        out[:, sel, iv.latent] = col
    return out


def group_interventions(adapter: ModelAdapter, saes: Mapping[str, Any], interventions: Sequence[Intervention],
                        input_hw: tuple[int, int]) -> dict[str, list[Intervention]]:
    """Check ``interventions`` against the model (layer ids), the SAEs ``{canonical layer: sae}`` (latent
    ids) and the layer grids for an input of ``input_hw`` (boxes, masks, tokens); group them by layer."""
    by_layer: dict[str, list[Intervention]] = {}
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise InterventionError(f"interventions must be Intervention objects, got {type(iv).__name__}")
        name = adapter.resolve_layer(iv.layer)  # UnknownLayerError lists the valid layers
        if name not in saes:
            raise InterventionError(f"intervention on layer {iv.layer!r} but `saes` has no SAE for it (has "
                                    f"{list(saes)}); pass {{{name!r}: sae}}")
        d_sae = int(saes[name].cfg.d_sae)
        if not 0 <= iv.latent < d_sae:
            raise InterventionError(f"latent {iv.latent} out of range for the SAE at layer {name!r} "
                                    f"(d_sae={d_sae}); use an id in [0, {d_sae})")
        iv.positions(adapter.grid(name, input_hw))  # box / mask / tokens against the grid
        by_layer.setdefault(name, []).append(iv)
    return by_layer

