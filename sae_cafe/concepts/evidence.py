"""Four kinds of evidence of what a latent sees at an exemplar (image, position), as pixel maps (E, H, W).

* ``ierf``: the SRD iERF of the exemplar PFV (one-hot seed at the position, propagated by
  ``sae_cafe.srd.srd_ierf_from_relevance``, the CAFE stage's path, :mod:`sae_cafe.cafe.anchor`).
* ``act``: the latent's activation map on the layer grid, upsampled bilinearly to pixels
  (``cafe.anchor.upsample_map``, what the CAFE stage stores beside the iERF).
* ``gradient``: |∂a/∂x| summed over colour channels, ``a`` the latent's activation at the exemplar's position.
* ``mask``: an optimised soft insertion mask over input patches in the manner of FRI (hand-written here; the
  published toolkit is not a dependency): mask logits θ (E, 1, H/p, W/p), m = σ(θ), θ₀ = 0;
  ``x_m = up(m)·x + (1 − up(m))·b`` with the baseline ``b`` = 0 in normalised space (the world's mean grey);
  objective ``relu(1 − a(x_m)/a(x)) + λ·mean(m)`` minimised by Adam; then the patches are ranked by m and the
  smallest top-n set whose *hard* insertion recovers ≥ ``recover`` of a(x) is the support; the map is m on the
  support, 0 elsewhere (patch-constant). Defaults: p = 4 px, 30 steps, lr 0.1, λ = 0.2, recover = 0.8.

:func:`recovery_share`: the smallest share of pixels, ranked by an evidence map, that keeps ≥ 80 % of the
activation when only those pixels are kept (the rest set to the same baseline b = 0).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..activations.rows import layer_pfv
from ..cafe.anchor import upsample_map
from ..errors import MismatchError, SaeCafeError
from ..models import get_adapter
from ..saes import encode_images, encode_pfv
from ..srd import srd_ierf_from_relevance

#: names as in ``sae_cafe.concepts.label`` (calibration tables are keyed by them)
EVIDENCE_TYPES: tuple[str, ...] = ("ierf", "act", "gradient", "mask")
#: pixel shares tried by :func:`recovery_share` (smallest first)
SHARES: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def world_tensor(adapter, images) -> torch.Tensor:
    """World images (N, H, W, 3) uint8 → the model's normalised input (N, 3, H, W); at the model's input size
    this is ``adapter.preprocess`` without its per-image PIL round trip (its resize to the same size is the
    identity), else ``adapter.preprocess`` itself."""
    adapter = get_adapter(adapter)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise MismatchError(f"world images must be (N, H, W, 3) uint8, got shape {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != tuple(adapter.input_size):
        return adapter.preprocess(list(images))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(adapter.mean).view(1, 3, 1, 1)
    std = torch.tensor(adapter.std).view(1, 3, 1, 1)
    return ((x - mean) / std).to(adapter.device)


class LatentProbe:
    """Differentiable activation of SAE latents at layer positions: ``probe(x, latent, pos)`` → (N,).

    The PFVs are :func:`sae_cafe.activations.rows.layer_pfv`'s and the latents ``sae_cafe.saes.encode_pfv``'s,
    as in ``saes.encode_images`` (which ``maps`` uses), but with the autograd graph kept; only the exemplar rows
    are encoded.

    ``x`` (N, 3, H, W) preprocessed images, ``latent``/``pos`` (N,) latent ids and flat positions (row-major
    layer grid). ``probe.maps(x)`` → all latents at all positions (N, P, S) without gradient.
    """

    def __init__(self, adapter, sae, layer: str, batch: int = 256):
        self.adapter = get_adapter(adapter)
        self.sae = sae
        self.layer = self.adapter.resolve_layer(layer)
        self.batch = batch
        info = self.adapter.layer(self.layer)
        self.grid = tuple(info.grid)

    def pfv(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) → the layer's PFVs (N, P, D), in the caller's grad mode."""
        return layer_pfv(self.adapter, x, self.layer).pfv

    def __call__(self, x: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], self.batch):
            sl = slice(i, i + self.batch)
            pfv = self.pfv(x[sl])
            rows = torch.arange(pfv.shape[0], device=pfv.device)
            z = encode_pfv(self.sae, pfv[rows, pos[sl].to(pfv.device)])  # (n, S)
            out.append(z[rows, latent[sl].to(z.device)])
        return torch.cat(out)

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) → latents (N, P, S) float32 (``saes.encode_images`` in batches of ``batch``)."""
        return torch.cat([encode_images(self.sae, self.adapter, self.layer, x[i:i + self.batch])[1]
                          for i in range(0, x.shape[0], self.batch)])

    def encode_world(self, images) -> torch.Tensor:
        """World images (N, H, W, 3) uint8 → latents (N, P, S) on the CPU (the ``encode`` of
        :func:`sae_cafe.concepts.counterfactual.ground_truth`)."""
        return self.maps(world_tensor(self.adapter, images)).cpu()


@dataclass(frozen=True)
class FRIConfig:
    """Soft insertion mask settings (see the module docstring)."""

    patch: int = 4
    steps: int = 30
    lr: float = 0.1
    area_weight: float = 0.2
    recover: float = 0.8
    baseline: float = 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "objective": "relu(1 - a(x_m)/a(x)) + area_weight * mean(m), m = sigmoid(theta), "
                "theta0 = 0, Adam", "insertion": "x_m = up(m) * x + (1 - up(m)) * baseline (normalised space)",
                "support": "smallest top-n patches (by m) whose hard insertion recovers >= recover * a(x)"}


def _check(x: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise MismatchError(f"x must be images (E, 3, H, W), got {tuple(x.shape)}")
    if latent.shape != (x.shape[0],) or pos.shape != (x.shape[0],):
        raise MismatchError(f"latent {tuple(latent.shape)} and pos {tuple(pos.shape)} must be ({x.shape[0]},), "
                            "one per exemplar image")


def ierf_maps(probe: LatentProbe, x: torch.Tensor, pos: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """SRD iERFs (E, H, W) of the PFVs at ``pos`` (E,) of images ``x`` (E, 3, H, W) (one-hot seeds)."""
    h, w = probe.grid
    out = []
    for i in range(0, x.shape[0], batch):
        p = pos[i:i + batch]
        rel = torch.zeros(len(p), 1, h * w)
        rel[torch.arange(len(p)), 0, p.cpu()] = 1.0
        m = srd_ierf_from_relevance(probe.adapter, x[i:i + batch], probe.layer, rel.reshape(len(p), 1, h, w))
        out.append(m[:, 0].float().cpu())
    return torch.cat(out)


def activation_maps(probe: LatentProbe, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The latent's activation map on each image, upsampled bilinearly to (E, H, W)."""
    lat = probe.maps(x)  # (E, P, S)
    a = lat[torch.arange(x.shape[0]), :, latent.to(lat.device)].reshape(x.shape[0], *probe.grid)
    return upsample_map(a.cpu(), tuple(x.shape[-2:]))


def gradient_maps(probe: LatentProbe, x: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor,
                  batch: int = 64) -> torch.Tensor:
    """|∂a/∂x| summed over the colour channels (E, H, W); ``a`` = the latent's activation at ``pos``."""
    out = []
    for i in range(0, x.shape[0], batch):
        xi = x[i:i + batch].detach().clone().requires_grad_(True)
        a = probe(xi, latent[i:i + batch], pos[i:i + batch])
        (g,) = torch.autograd.grad(a.sum(), xi)
        out.append(g.abs().sum(1).float().cpu())
    return torch.cat(out)


def _insert(x: torch.Tensor, m_patch: torch.Tensor, patch: int, baseline: float) -> torch.Tensor:
    m = F.interpolate(m_patch, scale_factor=patch, mode="nearest")
    return m * x + (1 - m) * baseline


def fri_masks(probe: LatentProbe, x: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor,
              cfg: FRIConfig | None = None, a0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Optimised soft insertion masks and their smallest recovering support (see the module docstring).

    Returns ``maps`` (E, H, W) (m on the support, 0 elsewhere), ``soft`` (E, H/p, W/p) the optimised mask,
    ``support_share`` (E,) share of patches in the support, ``recovered`` (E,) a(x_support)/a(x) (the
    support is all patches, and ``recovered`` < ``cfg.recover``, when no smaller set recovers enough).
    """
    cfg = cfg or FRIConfig()
    _check(x, latent, pos)
    E, _, H, W = x.shape
    if H % cfg.patch or W % cfg.patch:
        raise SaeCafeError(f"FRI patch size {cfg.patch} must divide the image size {H}×{W}")
    gh, gw = H // cfg.patch, W // cfg.patch
    x = x.detach()
    if a0 is None:
        with torch.no_grad():
            a0 = probe(x, latent, pos)
    a0 = a0.detach().clamp(min=1e-12)
    theta = torch.zeros(E, 1, gh, gw, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    for _ in range(cfg.steps):
        m = torch.sigmoid(theta)
        a = probe(_insert(x, m, cfg.patch, cfg.baseline), latent, pos)
        loss = (F.relu(1 - a / a0) + cfg.area_weight * m.flatten(1).mean(1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    soft = torch.sigmoid(theta.detach())[:, 0]  # (E, gh, gw)
    order = torch.sort(soft.flatten(1), dim=1, descending=True, stable=True).indices
    P = gh * gw
    counts = sorted({max(1, round(P * s)) for s in SHARES})
    n_best = torch.full((E,), P)
    rec_best = torch.zeros(E)
    found = torch.zeros(E, dtype=torch.bool)
    with torch.no_grad():
        for n in counts:
            hard = torch.zeros(E, P)
            hard.scatter_(1, order[:, :n], 1.0)
            a = probe(_insert(x, hard.reshape(E, 1, gh, gw), cfg.patch, cfg.baseline), latent, pos)
            r = (a / a0).cpu()
            new = (~found) & (r >= cfg.recover)
            n_best[new], rec_best[new] = n, r[new]
            found |= new
            if n == P:
                rec_best[~found] = r[~found]
    keep = torch.zeros(E, P)
    ranks = torch.arange(P)[None].expand(E, -1)
    keep.scatter_(1, order, (ranks < n_best[:, None]).float())
    sup = soft * keep.reshape(E, gh, gw)
    maps = F.interpolate(sup[:, None], scale_factor=cfg.patch, mode="nearest")[:, 0]
    return {"maps": maps, "soft": soft, "support_share": n_best.float() / P, "recovered": rec_best}


def evidence_maps(kind: str, probe: LatentProbe, x: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor,
                  fri: FRIConfig | None = None) -> tuple[torch.Tensor, float, dict]:
    """Maps (E, H, W) of evidence ``kind`` (one of :data:`EVIDENCE_TYPES`), the seconds spent and extras."""
    _check(x, latent, pos)
    t0 = time.perf_counter()
    extra: dict = {}
    if kind == "ierf":
        maps = ierf_maps(probe, x, pos)
    elif kind == "act":
        maps = activation_maps(probe, x, latent)
    elif kind == "gradient":
        maps = gradient_maps(probe, x, latent, pos)
    elif kind == "mask":
        res = fri_masks(probe, x, latent, pos, fri)
        maps = res.pop("maps")
        extra = res
    else:
        raise SaeCafeError(f"unknown evidence type {kind!r}; use one of {', '.join(EVIDENCE_TYPES)}")
    return maps.float(), time.perf_counter() - t0, extra


@torch.no_grad()
def recovery_share(probe: LatentProbe, x: torch.Tensor, latent: torch.Tensor, pos: torch.Tensor,
                   maps: torch.Tensor, recover: float = 0.8, baseline: float = 0.0,
                   shares: tuple[float, ...] = SHARES) -> torch.Tensor:
    """Smallest share of pixels (from ``shares``) that keeps ≥ ``recover`` of the activation when only the
    pixels ranked highest by ``maps`` (E, H, W) are kept and the rest set to ``baseline`` (normalised space).
    Ties are broken by pixel index. (E,) float; ``inf`` where even all pixels (the original image) fall short.
    """
    _check(x, latent, pos)
    if maps.shape != (x.shape[0], *x.shape[-2:]):
        raise MismatchError(f"maps {tuple(maps.shape)} must be (E, H, W) = {(x.shape[0], *x.shape[-2:])}")
    E = x.shape[0]
    HW = x.shape[-1] * x.shape[-2]
    a0 = probe(x, latent, pos).cpu().clamp(min=1e-12)
    order = torch.sort(maps.reshape(E, HW), dim=1, descending=True, stable=True).indices
    best = torch.full((E,), float("inf"))
    for s in shares:
        todo = torch.isinf(best)
        if not todo.any():
            break
        n = max(1, round(HW * s))
        keep = torch.zeros(E, HW)
        keep.scatter_(1, order[:, :n], 1.0)
        keep = keep.reshape(E, 1, *x.shape[-2:]).to(x.device)
        idx = todo.nonzero().flatten()
        xi = keep[idx] * x[idx] + (1 - keep[idx]) * baseline
        r = probe(xi, latent[idx], pos[idx]).cpu() / a0[idx]
        ok = idx[r >= recover]
        best[ok] = s
    return best
