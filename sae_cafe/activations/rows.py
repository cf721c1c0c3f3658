"""The one path from images to a layer's PFV rows: one forward pass that stops after the last layer wanted
(:func:`capture_pfv`, :func:`layer_pfv`) and the rows a ``tokens`` setting keeps (:func:`token_pfv`,
:func:`prefix_index`); :func:`pfv_rows` does both.

Rows per image, for a ``tokens`` setting (:data:`sae_cafe.activations.shards.TOKEN_SETTINGS`):

* ``"patch"``: the grid positions, row-major (what CAFE mines and every SAE is trained on by default);
* ``"all"``: the prefix tokens (class / register / distillation, in token order), then the grid positions;
* ``"cls"``: the class token(s) only (an error for a model or layer without one).

Everything that turns images into PFVs goes through here: the shard path
(:func:`sae_cafe.activations.extract.layer_rows`), streamed SAE training (``sae_training.stream_data``, which
reuses ``layer_rows``), SAE encoding of images (:func:`sae_cafe.saes.encode_images`, the encoder of CAFE mining
and anchoring, queries, purity metrics, dissection and the image explorer; :func:`sae_cafe.saes.token_rows`
of SAE evaluation) and concept evidence (:class:`sae_cafe.concepts.evidence.LatentProbe`).

What stays with the callers, and why:

* The SAE encoder call is :func:`sae_cafe.saes.encode_pfv`, and images → latents is
  :func:`sae_cafe.saes.encode_images` (this module's :func:`layer_pfv` + ``encode_pfv``): ``saes`` uses this
  module, so this module cannot use ``saes`` (that would be an import circle).
* ``extract.layer_rows`` adds what the shards store beside each row (image index, grid position, token kind
  code, high-norm outlier flag, the outlier tally) and draws ``positions_per_image`` patch positions, which
  it passes here as ``patch_idx``.
* The stream keeps at most ``rows_per_image`` rows per image and layer (so every layer's buffer fills at the
  same rate) and drops flagged rows under ``outliers="exclude"`` after ``layer_rows``: training choices,
  not a choice of rows.
* ``LatentProbe.__call__`` gathers the exemplar rows before encoding them, with autograd: encoding every
  position and gathering afterwards would cost P× more and give other last bits (another matmul shape).
* ``cafe.build.class_push`` and the SAE splices replace a layer's output inside a hook (``from_pfv``): the
  other direction.

Written by hand: the PFV layouts are the adapters' (``capture`` / ``to_pfv``); this is their glue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import SaeCafeError
from ..models.base import PFVBatch
from .outliers import prefix_kinds
from .shards import check_tokens


def capture_pfv(adapter: Any, x: torch.Tensor, layers: str | int | Sequence[str | int]) -> dict[str, PFVBatch]:
    """Images ``x`` (B, 3, H, W), preprocessed, → ``{layer id: PFVBatch}`` of ``layers`` from one forward pass
    that stops after the last of them (``adapter.capture(..., stop_early=True)`` + ``adapter.to_pfv``).

    Each batch holds ``pfv`` (B, N, D) grid-position rows (row-major), ``positions`` (N, 2), ``grid`` (h, w)
    and, for a ViT, ``extra`` (B, E, D) prefix tokens. The keys are the canonical layer ids
    (``adapter.resolve_layer``). Gradients follow the caller's grad mode (wrap in ``torch.no_grad()`` for
    inference; :class:`~sae_cafe.concepts.evidence.LatentProbe` keeps the graph).
    """
    names = [layers] if isinstance(layers, (str, int)) else list(layers)
    acts = adapter.capture(x, names, stop_early=True)
    return {n: adapter.to_pfv(a) for n, a in acts.items()}


def layer_pfv(adapter: Any, x: torch.Tensor, layer: str | int) -> PFVBatch:
    """The :class:`PFVBatch` of one layer (id or alias) for images ``x`` (B, 3, H, W) (:func:`capture_pfv`)."""
    name = adapter.resolve_layer(layer)
    return capture_pfv(adapter, x, [name])[name]


def prefix_index(adapter: Any, n_prefix: int, tokens: str) -> torch.Tensor:
    """(E',) long: which of a layer's ``n_prefix`` prefix tokens (token order) the ``tokens`` setting keeps —
    none for ``"patch"``, all for ``"all"``, the class tokens for ``"cls"`` (kinds from
    :func:`~sae_cafe.activations.outliers.prefix_kinds`)."""
    check_tokens(tokens)
    if tokens == "patch" or not n_prefix:
        return torch.zeros(0, dtype=torch.long)
    if tokens == "all":
        return torch.arange(int(n_prefix))
    return torch.tensor([j for j, k in enumerate(prefix_kinds(adapter, n_prefix)) if k == "cls"],
                        dtype=torch.long)


def token_pfv(adapter: Any, batch: PFVBatch, tokens: str = "patch", patch_idx: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The rows (B, T, D) of one layer batch that a ``tokens`` setting keeps, per image: the kept prefix tokens
    (:func:`prefix_index`) first, then the grid positions (``patch_idx`` (B, K) long: only these positions of
    each image, in the given order; default all N). ``.reshape(-1, D)`` gives the rows image by image.

    ``"cls"`` on a batch without a class token is a :class:`SaeCafeError`.
    """
    check_tokens(tokens)
    extra = batch.extra if batch.extra is not None and batch.extra.shape[1] else None
    parts = []
    if extra is not None and tokens != "patch":
        parts.append(extra[:, prefix_index(adapter, extra.shape[1], tokens).to(extra.device)])
    if tokens == "cls":
        if not parts or not parts[0].shape[1]:
            raise SaeCafeError(f"tokens='cls' but {adapter.name} gives no class token at this layer; use "
                               "tokens='patch'")
        return parts[0]
    pfv = batch.pfv
    if patch_idx is not None:
        idx = patch_idx.to(pfv.device)
        pfv = pfv[torch.arange(pfv.shape[0], device=pfv.device)[:, None], idx]
    return torch.cat([*parts, pfv], 1) if parts else pfv


def pfv_rows(adapter: Any, x: torch.Tensor, layer: str | int, tokens: str = "patch") -> torch.Tensor:
    """Images ``x`` (B, 3, H, W) → the rows (B, T, D) of ``layer`` that ``tokens`` keeps (T = N grid positions
    for ``"patch"``, E + N for ``"all"``, the number of class tokens for ``"cls"``): :func:`layer_pfv` then
    :func:`token_pfv`."""
    return token_pfv(adapter, layer_pfv(adapter, x, layer), tokens)


__all__ = ["capture_pfv", "layer_pfv", "pfv_rows", "prefix_index", "token_pfv"]
