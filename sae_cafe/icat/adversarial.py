"""FGSM and PGD (L∞) in pixel space, for the adversarial case studies, using Captum's ``captum.robust``.

The attack runs on ``pixels ∈ [0, 1]`` through a wrapper that applies the adapter's normalisation, so ε is
in pixel units (8/255 means 8 grey levels) and the adversarial image stays a valid image.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import get_adapter


class _PixelModel(nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.register_buffer("mean", torch.tensor(adapter.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(adapter.std).view(1, 3, 1, 1))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.adapter.model((p - self.mean.to(p)) / self.std.to(p))


def _labels(y, n: int, device) -> torch.Tensor:
    return torch.as_tensor(y, device=device).long().expand(n) if torch.as_tensor(y).ndim == 0 else \
        torch.as_tensor(y, device=device).long()


def fgsm(model, x: torch.Tensor, y, eps: float = 8 / 255) -> torch.Tensor:
    """Untargeted FGSM on preprocessed images x (N, 3, H, W) with labels y → adversarial x (same space)."""
    from captum.robust import FGSM

    adapter = get_adapter(model)
    pm = _PixelModel(adapter)
    p = adapter.denormalize(x).clamp(0, 1)
    adv = FGSM(pm, lower_bound=0.0, upper_bound=1.0).perturb(p, eps, _labels(y, len(x), x.device))
    return (adv.detach() - pm.mean.to(adv)) / pm.std.to(adv)


def pgd(model, x: torch.Tensor, y, eps: float = 8 / 255, step_size: float = 1 / 255, steps: int = 40,
        random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Untargeted L∞ PGD (Madry et al., random start) on preprocessed images x (N, 3, H, W) → adversarial x.

    Defaults (40 steps of 1/255) flip 98 % of 100 correctly classified concept-world scenes for the mini
    ResNet at ε = 8/255 (10 steps of 2/255: 82 %).
    """
    from captum.robust import PGD

    adapter = get_adapter(model)
    pm = _PixelModel(adapter)
    p = adapter.denormalize(x).clamp(0, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adv = PGD(pm, lower_bound=0.0, upper_bound=1.0).perturb(
            p, eps, step_size, steps, _labels(y, len(x), x.device), random_start=random_start)
    return (adv.detach() - pm.mean.to(adv)) / pm.std.to(adv)


@torch.no_grad()
def flip_rate(model, x: torch.Tensor, x_adv: torch.Tensor, y) -> float:
    """Share of images whose prediction on ``x_adv`` differs from label ``y``."""
    adapter = get_adapter(model)
    return float((adapter(x_adv).argmax(1) != _labels(y, len(x), x.device)).float().mean())
