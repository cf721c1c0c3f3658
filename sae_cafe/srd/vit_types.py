"""The ViT SRD form of a model as plain tensors: :class:`Spec` (patch embedding, blocks, head) and its parts.

Library adapters (torchvision, timm: :mod:`sae_cafe.srd.vit_spec`; other libraries in their own modules)
convert a model into a :class:`Spec`; :mod:`sae_cafe.srd.vit_model` runs it and :mod:`sae_cafe.srd.vit_share`
decomposes it. Tensors are shared with the model, never copied, except values derived once from weights
alone (resampled position embeddings, projected latent queries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LN:
    """A LayerNorm (or Identity when ``identity``): y = γ ⊙ (x − mean x)/σ + β, σ = √(var + eps)."""

    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 0.0
    identity: bool = True

    def sigma(self, x: Tensor) -> Tensor:
        """σ per vector, (...) from (..., D); ones for Identity."""
        if self.identity:
            return x.new_ones(x.shape[:-1])
        var = x.var(-1, correction=0)
        return (var + self.eps).sqrt()

    def linear(self, v: Tensor, sigma: Tensor) -> Tensor:
        """Bias-free part with frozen σ (broadcast to v[..., 0]): γ ⊙ (v − mean v)/σ."""
        if self.identity:
            return v
        out = (v - v.mean(-1, keepdim=True)) / sigma[..., None]
        return out * self.weight if self.weight is not None else out

    def shift(self, d: int, like: Tensor) -> Tensor:
        return self.bias if (self.bias is not None and not self.identity) else like.new_zeros(d)

    def adjoint(self, z: Tensor, sigma: Tensor) -> Tensor:
        """Transpose of :meth:`linear` applied to z: P(γ ⊙ z)/σ (P the centring projection), so that
        ⟨linear(v, σ), z⟩ = ⟨v, adjoint(z, σ)⟩."""
        if self.identity:
            return z
        g = z * self.weight if self.weight is not None else z
        return (g - g.mean(-1, keepdim=True)) / sigma[..., None]

    def forward(self, z: Tensor, sigma: Tensor | None = None) -> Tensor:
        """The LayerNorm itself (σ computed, or frozen at ``sigma``, centring always recomputed)."""
        if self.identity:
            return z
        if sigma is None:
            return F.layer_norm(z, z.shape[-1:], self.weight, self.bias, self.eps)
        return self.linear(z, sigma) + self.shift(z.shape[-1], z)


@dataclass
class Block:
    name: str
    ln1: LN
    ln2: LN
    wqkv: Tensor  # (3A, D) fused q, k, v projections
    bqkv: Tensor  # (3A,)
    heads: int
    scale: float
    q_norm: Callable | None
    k_norm: Callable | None
    wo: Tensor  # (D, A), layer scale folded in
    bo: Tensor  # (D,), layer scale folded in
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    ls2: Tensor | None  # (D,) layer scale of the MLP branch

    @property
    def wv(self) -> Tensor:
        return self.wqkv[2 * self.wqkv.shape[0] // 3:]

    @property
    def bv(self) -> Tensor:
        return self.bqkv[2 * self.bqkv.shape[0] // 3:]

    def ln_fwd(self, ln: LN, z: Tensor) -> Tensor:
        return z if ln.identity else F.layer_norm(z, z.shape[-1:], ln.weight, ln.bias, ln.eps)


@dataclass
class AttnPool:
    """Latent-query attention pooling (timm ``AttentionPoolLatent``, SigLIP's "map" head): Lq learned queries
    attend to the final tokens, p = W_O·concat_h(A^h v^h) + b_O, then p + MLP(LN(p)), then the latents are
    pooled (``pool`` "token": latent 0; "avg": their mean)."""

    q: Tensor  # (H, Lq, e) projected (and q-normed) latent queries: constant, derived from weights alone
    wkv: Tensor  # (2A, D) fused key and value projections
    bkv: Tensor  # (2A,)
    heads: int
    scale: float
    k_norm: Callable | None
    wo: Tensor  # (Do, A)
    bo: Tensor  # (Do,)
    norm: LN
    fc1: nn.Linear | None  # None: no MLP residual
    act: nn.Module | None
    fc2: nn.Linear | None
    pool: str = "token"  # over the latents: "token" (latent 0) or "avg"
    include_prefix: bool = False  # the keys include the class/register tokens

    @property
    def wk(self) -> Tensor:
        return self.wkv[: self.wkv.shape[0] // 2]

    @property
    def wv(self) -> Tensor:
        return self.wkv[self.wkv.shape[0] // 2:]

    @property
    def bk(self) -> Tensor:
        return self.bkv[: self.bkv.shape[0] // 2]

    @property
    def bv(self) -> Tensor:
        return self.bkv[self.bkv.shape[0] // 2:]


@dataclass
class Spec:
    """A pre-LN ViT: tokens = norm_pre([prefix; conv(x) + b + pos]); blocks; final norm; readout; head.

    Readout (``pool``): "token" (token 0; with ``dist_head`` also token 1, logits averaged as in distilled
    DeiT), "avg" (mean over patch tokens, or all with ``pool_prefix``) or "map" (``attn_pool``). The head
    chain may be empty (a headless backbone: the output is the pooled feature after ``fc_norm``).
    """

    name: str
    patch_w: Tensor  # (D, C, P, P)
    patch_b: Tensor  # (D,)
    pos_patch: Tensor  # (h·w, D)
    prefix: Tensor  # (E, D) class/register tokens at the input incl. their position embedding
    grid: tuple[int, int]
    patch: int
    blocks: list[Block]
    norm: LN
    pool: str  # "token", "avg", "map" or "cls_avg" ([token 0, mean of the patch tokens], (2D,))
    pool_prefix: bool  # avg pooling includes the prefix tokens
    fc_norm: LN
    head: list[tuple[str, object, object]]  # ("lin", W, b) or ("act", module, None); [] when headless
    has_cls: bool = True
    norm_pre: LN = field(default_factory=LN)  # LayerNorm of all input tokens before block 0 (CLIP's ln_pre)
    attn_pool: AttnPool | None = None  # pool == "map"
    dist_head: list[tuple[str, object, object]] | None = None  # head chain of token 1 (distilled DeiT)

    @property
    def n_prefix(self) -> int:
        return self.prefix.shape[0]

    @property
    def headless(self) -> bool:
        """No classifier: the explained output is the pooled feature vector."""
        return not self.head and not self.dist_head

    def readouts(self) -> list[tuple[int, list, float]]:
        """Token readouts (token index, head chain, weight) of a "token" pool."""
        if self.dist_head is None:
            return [(0, self.head, 1.0)]
        return [(0, self.head, 0.5), (1, self.dist_head, 0.5)]
