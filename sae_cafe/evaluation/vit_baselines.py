"""Transformer-specific saliency baselines: attention rollout and Chefer et al.'s gradient-weighted attention
relevance, for torchvision and timm ``VisionTransformer`` models.

* **Attention rollout** (Abnar & Zuidema 2020): per block, the head-mean attention with the residual added,
  Â_l = ½·mean_h A_l + ½·I (rows sum to 1); R = Â_L ⋯ Â_1; the map is the pooled token's row of R over the
  patch tokens. Class-agnostic.
* **Chefer et al. 2021** ("Generic attention-model explainability", ICCV 2021, self-attention rule):
  R = I; for l = 1..L: Ā_l = mean_h (∇_{A_l} y_t ⊙ A_l)⁺, R ← R + Ā_l R; the map is the pooled token's row
  of R over the patch tokens.

The pooled token's row is ``pool_weights``ᵀ R (the class token for ``global_pool="token"``, the mean over
tokens for average pooling). Patch relevances (h, w) are upsampled bilinearly to the input size, as the CAM
baselines are. Written by hand (no installed library implements either for torchvision ViTs); the attention
probabilities come from the functional ViT forward of :mod:`sae_cafe.srd.vit_model`, whose logits equal the
model's (checked in ``tests/test_baselines.py``). The model itself is only read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import ModelAdapter


def vit_check(a: ModelAdapter) -> str | None:
    """None if the attention baselines apply to ``a``, else the reason."""
    if a.kind != "tokens":
        return f"needs a vision transformer's attention ({a.name} is a {a.kind} model)"
    from ..errors import SaeCafeError
    from ..srd.vit_model import make_spec, pool_weights

    try:
        spec = make_spec(a.model)
        pool_weights(spec, spec.n_prefix + spec.grid[0] * spec.grid[1], spec.patch_w)  # no attention-pool head
    except (SaeCafeError, AttributeError) as e:
        return f"no functional ViT forward with fixed token pooling ({str(e).splitlines()[0][:160]})"
    return None


def attention_forward(a: ModelAdapter, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    """Functional forward: logits (N, K), attention probabilities per block [(N, heads, T, T)] (in the
    autograd graph of ``x`` and the weights) and the model's ``Spec``."""
    from ..srd import vit_model as V

    spec = V.make_spec(a.model)
    attn: list[torch.Tensor] = []
    trace = V.run(spec, x, on_block=lambda _l, rec: attn.append(rec.attn))
    return trace.logits, attn, spec


def _pooled_row(spec, R_NTT: torch.Tensor) -> torch.Tensor:
    """(N, T) = pool_weightsᵀ R: the relevance of every token for the pooled (classified) vector."""
    from ..srd.vit_model import pool_weights

    w = pool_weights(spec, R_NTT.shape[-1], R_NTT)
    return torch.einsum("t,nts->ns", w, R_NTT)


def to_pixels(row_NT: torch.Tensor, spec, size: tuple[int, int]) -> torch.Tensor:
    """(N, T) token relevances → (N, H, W): patch tokens on their (h, w) grid, upsampled bilinearly."""
    h, w = spec.grid
    grid = row_NT[:, spec.n_prefix:].reshape(-1, 1, h, w)
    return F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def rollout_matrix(attn: list[torch.Tensor]) -> torch.Tensor:
    """(N, T, T) Abnar & Zuidema's rollout Â_L ⋯ Â_1 with Â_l = ½·mean_h A_l + ½·I."""
    R = None
    for A in attn:
        A_hat = 0.5 * A.mean(1) + 0.5 * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        R = A_hat if R is None else A_hat @ R
    return R


def chefer_matrix(attn: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """(N, T, T) Chefer et al. 2021: R = I, R ← R + mean_h (∇A ⊙ A)⁺ · R over blocks in forward order."""
    N, _, T, _ = attn[0].shape
    R = torch.eye(T, dtype=attn[0].dtype, device=attn[0].device).expand(N, T, T)
    for A, G in zip(attn, grads):
        R = R + (G * A).clamp(min=0).mean(1) @ R
    return R


def attention_rollout(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of the pooled token over the patches. (N, H, W)."""
    with torch.no_grad():
        _, attn, spec = attention_forward(a, x)
        return to_pixels(_pooled_row(spec, rollout_matrix(attn)), spec, tuple(x.shape[-2:]))


def chefer2021(a: ModelAdapter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Chefer et al. 2021 gradient-weighted attention relevance of target ``t`` (N,). (N, H, W)."""
    with torch.enable_grad():
        logits, attn, spec = attention_forward(a, x.detach())
        grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), attn)
    R = chefer_matrix([A.detach() for A in attn], list(grads))
    return to_pixels(_pooled_row(spec, R), spec, tuple(x.shape[-2:]))
