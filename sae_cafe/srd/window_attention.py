"""SRD rule for a pre-LN transformer block with (shifted) window attention on a token grid (Swin v1).

The block maps the grid x (N, C, H, W) (tokens = positions) to ``y = x + WMSA(LN₁(x))`` (attention add) and
``out = y + MLP(LN₂(y))`` (MLP add). As for the ViT rule (method_spec §2.4; :func:`~sae_cafe.srd.vit_share.
block_share` is reused as is): with the attention probabilities A and the LayerNorms' σ frozen, the attention
add is linear in x; every (source token s, head h) pair in the target's window is a path with bias-free
contribution A^h_{ts} W_O^h W_V^h L₁(x_s) (L₁: LN₁ without its shift), the attention bias
b_attn = W_O(W_V β₁ + b_V) + b_O is shared by those contributions' norms, the skip carries x_t, and
μ = ⟨c, y_t⟩/‖y_t‖². The MLP add mixes no tokens: relevance at out_t passes wholly to y_t.

Shifted windows: the grid is rolled by −shift before the window partition (the model's cyclic shift); the
relative position bias and the shift mask (−100 between regions that are not neighbours in the image, as in
torchvision) only change A, which is frozen. Paths are indexed by the source's slot in the target's window
(J = window area); :meth:`WindowBlockBranch.path_scatter` maps them back through the partition and the roll.

The block is one stage-graph branch (:class:`~sae_cafe.srd.graph.Branch` with ``path_mu``/``path_scatter``,
see :class:`~sae_cafe.srd.engine.SRDRun`) whose node is the block output. Written by hand: no library
decomposes window attention into per-source contribution vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import Branch, FrozenAffine
from .vit_model import BlockRec
from .vit_share import block_share


@dataclass
class WindowBlockParams:
    """Weights of one window-attention block (dtype of the graph).

    Shapes: ln1/ln2 (γ (C,), β (C,), eps); wqkv (3C, C), bqkv (3C,); rel_bias (heads, T, T) with T the window
    area; wo (C, C), bo (C,); fc1 (Hd, C) + bias; fc2 (C, Hd) + bias; act the MLP activation module.
    """

    ln1: tuple[Tensor, Tensor, float]
    ln2: tuple[Tensor, Tensor, float]
    wqkv: Tensor
    bqkv: Tensor
    rel_bias: Tensor
    heads: int
    window: tuple[int, int]
    shift: tuple[int, int]
    wo: Tensor
    bo: Tensor
    fc1: tuple[Tensor, Tensor]
    fc2: tuple[Tensor, Tensor]
    act: nn.Module


@dataclass
class WindowRecord(FrozenAffine):
    """One batch's frozen state of a block: attention A (B', h, T, T), bias-free values v0 (B', T, h, e),
    windowed x and y (B', T, C); for APOP (filled on first use) σ of LN₁/LN₂ (N, H, W, 1) and the MLP gate
    act(a)/a (N, H, W, Hd)."""

    attn: Tensor | None = None
    v0: Tensor | None = None
    xw: Tensor | None = None
    yw: Tensor | None = None
    sig1: Tensor | None = None
    sig2: Tensor | None = None
    gate: Tensor | None = None
    extra: dict = field(default_factory=dict)


def _shift_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], like: Tensor) -> Tensor:
    """torchvision's shifted-window mask (nW, T, T): 0 within a region, −100 across regions."""
    mask = like.new_zeros((hp, wp))
    hs = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    ws = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in hs:
        for w in ws:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    nw = (hp // window[0]) * (wp // window[1])
    mask = mask.view(hp // window[0], window[0], wp // window[1], window[1]).permute(0, 2, 1, 3).reshape(nw, -1)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowBlockBranch(Branch):
    """A whole window-attention block as one branch from its input node (see the module docstring)."""

    def __init__(self, source: str, p: WindowBlockParams, name: str):
        super().__init__(source, freeze=self._freeze)
        self.p, self.name = p, name
        self._wo = SimpleNamespace(wo=p.wo)
        C = p.wo.shape[0]
        wv, bv = p.wqkv[2 * C:], p.bqkv[2 * C:]
        self.b_attn = p.wo @ (wv @ p.ln1[1] + bv) + p.bo  # (C,)

    # ----- geometry ---------------------------------------------------------------------------------------
    def _shift(self, H: int, W: int) -> tuple[int, int]:
        (wh, ww), (sh, sw) = self.p.window, self.p.shift
        return (0 if wh >= H else sh, 0 if ww >= W else sw)

    def _part(self, t: Tensor, shift: tuple[int, int]) -> Tensor:
        """(N, H, W, D) → (N·nW, T, D): roll by −shift, windows row-major, tokens row-major."""
        N, H, W, D = t.shape
        wh, ww = self.p.window
        if any(shift):
            t = torch.roll(t, (-shift[0], -shift[1]), (1, 2))
        t = t.view(N, H // wh, wh, W // ww, ww, D).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(-1, wh * ww, D)

    def _unpart(self, t: Tensor, N: int, H: int, W: int, shift: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`_part`: (N·nW, T, D) → (N, H, W, D)."""
        wh, ww = self.p.window
        t = t.view(N, H // wh, W // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, -1)
        return torch.roll(t, shift, (1, 2)) if any(shift) else t

    # ----- forward with frozen state ----------------------------------------------------------------------
    def _freeze(self, v: Tensor) -> WindowRecord:
        p = self.p
        N, C, H, W = v.shape
        wh, ww = p.window
        if H % wh or W % ww:
            from ..errors import UnsupportedModuleError
            raise UnsupportedModuleError(f"{self.name}: a {H}×{W} token grid is not a multiple of the {wh}×{ww} "
                                         "window (padded windows have no SRD rule): use an input size whose "
                                         "stage grids are multiples of the window")
        shift = self._shift(H, W)
        x = v.permute(0, 2, 3, 1)
        (g1, b1, e1), (g2, b2, e2) = p.ln1, p.ln2
        lin1 = F.layer_norm(x, g1.shape, g1, None, e1)  # L₁(x): LN₁ without its shift
        xw, lw = self._part(x, shift), self._part(lin1, shift)
        Bw, T, _ = xw.shape
        hd = C // p.heads
        qkv = F.linear(lw + b1, p.wqkv, p.bqkv).view(Bw, T, 3, p.heads, hd)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B', h, T, e)
        logits = (q * hd ** -0.5) @ k.transpose(-2, -1) + p.rel_bias
        if any(shift):
            mask = _shift_mask(H, W, p.window, shift, v)
            logits = (logits.view(N, -1, p.heads, T, T) + mask[None, :, None]).view(Bw, p.heads, T, T)
        attn = logits.softmax(-1)
        v0 = F.linear(lw, p.wqkv[2 * C:]).view(Bw, T, p.heads, hd)  # W_V L₁(x_s), bias-free
        yw = xw + (attn @ v0.transpose(1, 2)).transpose(1, 2).reshape(Bw, T, C) @ p.wo.T + self.b_attn
        y = self._unpart(yw, N, H, W, shift)
        out = (y + F.linear(p.act(F.linear(F.layer_norm(y, g2.shape, g2, b2, e2), *p.fc1)), *p.fc2))
        return WindowRecord(out.permute(0, 3, 1, 2), v, attn=attn, v0=v0, xw=xw, yw=yw, extra={"shift": shift})

    def _frozen_stats(self, rec: WindowRecord) -> None:
        """σ of LN₁ and LN₂ and the MLP gate act(a)/a of ``rec``'s input (computed on first use: APOP only)."""
        if rec.gate is not None:
            return
        p = self.p
        (_, _, e1), (g2, b2, e2) = p.ln1, p.ln2
        x = rec.source.permute(0, 2, 3, 1)
        rec.sig1 = torch.sqrt(x.var(-1, correction=0, keepdim=True) + e1)
        y = self._unpart(rec.yw, *x.shape[:3], rec.extra["shift"])
        rec.sig2 = torch.sqrt(y.var(-1, correction=0, keepdim=True) + e2)
        a = F.linear(F.layer_norm(y, g2.shape, g2, b2, e2), *p.fc1)
        rec.gate = torch.where(a != 0, p.act(a) / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))

    def frozen_forward(self, rec: WindowRecord, u: Tensor) -> Tensor:
        """The block applied to another grid ``u`` with A, σ₁, σ₂ and the MLP gates of ``rec`` (APOP)."""
        p = self.p
        self._frozen_stats(rec)
        N, C, H, W = u.shape
        shift = rec.extra["shift"]
        (g1, b1, _), (g2, b2, _) = p.ln1, p.ln2
        x = u.permute(0, 2, 3, 1)
        ln = (x - x.mean(-1, keepdim=True)) / rec.sig1 * g1 + b1
        lw, xw = self._part(ln, shift), self._part(x, shift)
        Bw, T, _ = xw.shape
        val = F.linear(lw, p.wqkv[2 * C:], p.bqkv[2 * C:]).view(Bw, T, p.heads, -1).transpose(1, 2)
        yw = xw + F.linear((rec.attn @ val).transpose(1, 2).reshape(Bw, T, C), p.wo, p.bo)
        y = self._unpart(yw, N, H, W, shift)
        a = F.linear((y - y.mean(-1, keepdim=True)) / rec.sig2 * g2 + b2, *p.fc1)
        return (y + F.linear(a * rec.gate, *p.fc2)).permute(0, 3, 1, 2)

    # ----- SRD paths --------------------------------------------------------------------------------------
    def path_mu(self, v: Tensor, z: Tensor, out: Tensor, rec: WindowRecord) -> Tensor:  # noqa: ARG002
        """μ (N, T, H, W): for every target token, the share of the source in each slot of its window (the
        skip on the target's own slot); Σ over slots = 1 wherever y_t ≠ 0."""
        N, C, H, W = v.shape
        M = block_share(self._wo, BlockRec(rec.xw, rec.attn, rec.v0, rec.yw, None, None, self.b_attn)).M
        return self._unpart(M, N, H, W, rec.extra["shift"]).permute(0, 3, 1, 2)  # M (B', T_target, S)

    def path_scatter(self, src_hw: tuple[int, int]):
        """(B, T, H, W) path-wise relevance at targets → (B, 1, H, W) at the sources."""
        H, W = src_hw
        shift = self._shift(H, W)
        wh, ww = self.p.window

        def scatter(m: Tensor) -> Tensor:
            B, T = m.shape[:2]
            t = torch.roll(m, (-shift[0], -shift[1]), (2, 3)) if any(shift) else m
            s = t.view(B, T, H // wh, wh, W // ww, ww).sum((3, 5))  # (B, S, nWh, nWw): sum over targets
            s = s.view(B, wh, ww, H // wh, W // ww).permute(0, 3, 1, 4, 2).reshape(B, 1, H, W)
            return torch.roll(s, shift, (2, 3)) if any(shift) else s
        return scatter


__all__ = ["WindowBlockBranch", "WindowBlockParams", "WindowRecord"]
