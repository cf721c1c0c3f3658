"""torchvision Swin Transformer v1 adapter (swin_t, swin_s, swin_b).

SRD sees Swin as a stage graph (:func:`.srd_swin.build_swin_graph`). The stage outputs are channels-last
token grids (B, h, w, C); PFVs are their tokens (B, h·w, C), row-major on the stage grid. PFV layers:
``features.0`` (patch embedding), every block ``features.i.j``, every stage ``features.i`` (its last block)
and every patch merging ``features.i``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import SwinTransformer

from ..errors import MismatchError
from .base import PFVBatch, grid_positions
from .cnn import StageGraphAdapter
from .registry import register_adapter, register_model, torchvision_factory


class SwinAdapter(StageGraphAdapter):
    """torchvision ``SwinTransformer`` (v1 blocks and patch merging)."""

    family = "swin"

    def srd_graph(self, dtype):
        from .srd_swin import build_swin_graph

        return build_swin_graph(self.model, dtype)

    def _pfv_layer_names(self) -> list[str]:
        names = []
        for i, m in enumerate(self.model.features):
            if i > 0 and isinstance(m, nn.Sequential):
                names += [f"features.{i}.{j}" for j in range(len(m))]
            names.append(f"features.{i}")
        return names

    def _probe(self, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Layer outputs, and theoretical receptive fields: the patch embedding's kernel, + (window − 1)
        tokens per block (a token's window spans at most that far, shifted or not), + 1 token per merging."""
        p = next(self.model.parameters())
        x = torch.zeros(1, 3, *self.input_size, dtype=p.dtype, device=p.device)
        acts = self.capture(x, names, check=False)
        rf, out = 0, {}
        jump = 1
        for i, m in enumerate(self.model.features):
            if i == 0:
                conv = m[0]
                rf, jump = conv.kernel_size[0], conv.stride[0]
            elif isinstance(m, nn.Sequential):
                for j, blk in enumerate(m):
                    rf += (blk.attn.window_size[0] - 1) * jump
                    out[f"features.{i}.{j}"] = min(rf, max(self.input_size))
            else:
                rf, jump = rf + jump, jump * 2
            out[f"features.{i}"] = min(rf, max(self.input_size))
        return acts, out

    def _grid_and_channels(self, act: torch.Tensor) -> tuple[tuple[int, int], int]:
        if act.ndim != 4:
            raise MismatchError(f"{self.name}: expected a channels-last (B, h, w, C) token grid, got shape "
                                f"{tuple(act.shape)}")
        return (act.shape[1], act.shape[2]), act.shape[3]

    def to_pfv(self, act: torch.Tensor, layer: str | int | None = None) -> PFVBatch:  # noqa: ARG002
        """(B, h, w, C) token grid → PFVs (B, h·w, C), row-major. Exact inverse: :meth:`from_pfv`."""
        (h, w), _ = self._grid_and_channels(act)
        return PFVBatch(act.flatten(1, 2), grid_positions(h, w, act.device), (h, w))

    def from_pfv(self, batch: PFVBatch) -> torch.Tensor:
        h, w = batch.grid
        return batch.pfv.reshape(batch.pfv.shape[0], h, w, -1)


register_adapter(SwinTransformer, SwinAdapter, "torchvision Swin Transformer v1")
for _n in ("swin_t", "swin_s", "swin_b"):
    register_model(_n)(torchvision_factory(_n))
