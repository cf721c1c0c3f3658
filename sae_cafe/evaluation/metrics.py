"""Saliency metrics in torch, batched over images (CPU or GPU).

Every metric takes maps already passed through its one post-processing (``postprocess``); which one, and a
few metric details, depend on the definition set (``"source"`` or ``"paper"``, :mod:`.definitions`,
docs/metrics.md). :func:`evaluate_maps` applies them. Definitions (checked equal to Quantus, and
insertion/deletion to an independent NumPy version, in ``tests/test_metrics.py``):

* pointing game: share of the tied arg-max pixels within ``tolerance`` px (Euclidean) of a mask pixel (1/0
  without ties); a constant map scores 0; ``tolerance`` defaults to 15 px at 224, scaled by H/224. NaN for
  an empty mask.
* attribution localisation: Σ_mask a / (Σ a + 1e-9); NaN for an empty mask or a ratio > 1.
* sparseness: Gini index of the sorted map (+1e-7), as Quantus ``Sparseness``.
* μ-fidelity: Pearson (source) or Spearman (paper) correlation over random subsets S between the drop of the
  target logit when S is set to the baseline and Σ_{i∈S} a_i; S = 20 % of the cells of a 9×9 grid (cells of
  224/9 px at 224, scaled by H/224), 200 subsets.
* stability: mean over noise samples of ‖a(x) − a(x + u)‖_F / ‖a(x)‖_F with u ~ U(0, r) added in model
  input space (Quantus ``AvgSensitivity``); lower is better.
* insertion / deletion: softmax probability of the target as the most relevant pixels are inserted into a
  substrate (blurred image: source; baseline: paper) / deleted from the image to the baseline (channels
  together) in ``steps`` equal steps; trapezoid AUC over the fraction in [0, 1].

Written by hand because Quantus is numpy-bound and per-image; the Quantus equality tests guard them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import ModelAdapter

ExplainFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_module(model: ModelAdapter | nn.Module) -> nn.Module:
    return model.model if isinstance(model, ModelAdapter) else model


def default_tolerance(H: int) -> float:
    """Pointing-game tolerance: 15 px at 224, scaled by H/224."""
    return 15.0 * H / 224.0


def _disk(radius: float, device) -> torch.Tensor:
    r = int(math.floor(radius))
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1, device=device), torch.arange(-r, r + 1, device=device),
                            indexing="ij")
    return ((yy ** 2 + xx ** 2) <= radius ** 2 + 1e-9).float()


def pointing_game(maps_NHW: torch.Tensor, masks_NHW: torch.Tensor, tolerance: float | None = None
                  ) -> torch.Tensor:
    """(N,) pointing-game score in [0, 1] (NaN for an empty mask).

    The arg-max pixels of each map are its tied maxima; the score is the share of them that lie within
    ``tolerance`` px (Euclidean) of a mask pixel — 1.0/0.0 for a single maximum, fractional for ties. A
    constant map (every pixel tied) points nowhere and scores 0. ``tolerance`` None: 15 px at 224, scaled
    by H/224; 0: the maximum must lie on the mask (Quantus ``PointingGame`` for a map without ties).
    """
    N, H, W = maps_NHW.shape
    tol = default_tolerance(H) if tolerance is None else float(tolerance)
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"pointing-game tolerance must be a finite number of pixels >= 0, got {tolerance!r}")
    masks = masks_NHW.bool()
    if tol > 0:
        k = _disk(tol, maps_NHW.device)
        pad = k.shape[-1] // 2
        near = F.conv2d(masks[:, None].float(), k[None, None], padding=pad)[:, 0] > 0.5
    else:
        near = masks
    flat = maps_NHW.reshape(N, -1)
    is_max = flat == flat.amax(1, keepdim=True)
    n_max = is_max.sum(1)
    hit = (is_max & near.reshape(N, -1)).sum(1).double() / n_max.clamp(min=1)
    hit[n_max == flat.shape[1]] = 0.0  # constant map
    hit[masks.reshape(N, -1).sum(1) == 0] = float("nan")
    return hit.float()


def attribution_localisation(maps_NHW: torch.Tensor, masks_NHW: torch.Tensor) -> torch.Tensor:
    """(N,) share of the map's mass inside the mask (Kohlbrenner et al. 2020); NaN if undefined."""
    N = maps_NHW.shape[0]
    a = maps_NHW.reshape(N, -1).double()
    s = masks_NHW.reshape(N, -1).bool()
    ratio = (a * s).sum(1) / (a.sum(1) + 1e-9)
    ratio[(s.sum(1) == 0) | (ratio > 1)] = float("nan")
    return ratio.float()


def sparseness(maps_NHW: torch.Tensor) -> torch.Tensor:
    """(N,) Gini index of each map (Chalasani et al. 2020; Quantus ``Sparseness``)."""
    N = maps_NHW.shape[0]
    a = torch.sort(maps_NHW.reshape(N, -1).double() + 1e-7, dim=1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    return (((2 * k - n - 1) * a).sum(1) / (n * a.sum(1))).float()


def rankdata(a_NR: torch.Tensor) -> torch.Tensor:
    """Row-wise average ranks (1-based, ties get their mean rank, as ``scipy.stats.rankdata``)."""
    less = (a_NR[:, None, :] < a_NR[:, :, None]).sum(-1)
    equal = (a_NR[:, None, :] == a_NR[:, :, None]).sum(-1)
    return less.double() + (equal.double() + 1) / 2


def pearson(a_NR: torch.Tensor, b_NR: torch.Tensor) -> torch.Tensor:
    """(N,) row-wise Pearson correlation (NaN for a constant row)."""
    a = a_NR.double() - a_NR.double().mean(1, keepdim=True)
    b = b_NR.double() - b_NR.double().mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def spearman(a_NR: torch.Tensor, b_NR: torch.Tensor) -> torch.Tensor:
    """(N,) row-wise Spearman correlation (Pearson of average ranks)."""
    return pearson(rankdata(a_NR), rankdata(b_NR))


def grid_cells(H: int, W: int, grid: int = 9, device=None) -> torch.Tensor:
    """(H, W) long cell index of a ``grid``×``grid`` partition (cells of H/grid px: 224/9 at 224)."""
    rows = torch.clamp((torch.arange(H, device=device) * grid) // H, max=grid - 1)
    cols = torch.clamp((torch.arange(W, device=device) * grid) // W, max=grid - 1)
    return rows[:, None] * grid + cols[None, :]


def grid_subsets(N: int, H: int, W: int, n_subsets: int = 200, grid: int = 9, frac: float = 0.2,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(N, R, H, W) bool random subsets: each is ``round(frac·grid²)`` whole cells of the grid."""
    n_cells = grid * grid
    k = max(1, round(frac * n_cells))
    scores = torch.rand(N, n_subsets, n_cells, generator=generator)
    chosen = torch.zeros(N, n_subsets, n_cells, dtype=torch.bool)
    chosen.scatter_(2, scores.argsort(2)[..., :k], True)
    cells = grid_cells(H, W, grid)
    return chosen[..., cells].to(device)


def _target_logits(module: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int,
                   softmax: bool = False) -> torch.Tensor:
    """Target score of each row of ``x`` (M,C,H,W) with ``target`` (M,), in chunks."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = module(x[i:i + batch_size])
            if softmax:
                logits = logits.softmax(1)
            out.append(logits.gather(1, target[i:i + batch_size, None])[:, 0])
    return torch.cat(out)


def fidelity_deltas(model: ModelAdapter | nn.Module, x: torch.Tensor, target: torch.Tensor,
                    subsets: torch.Tensor, baseline: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """(N, R) drop of the target logit f_t(x) − f_t(x with S := baseline) for each subset S of ``subsets``
    ((N, R, H, W) or (N, R, C, H, W) bool). It does not depend on the map: a benchmark computes it once per
    image and passes it to :func:`mu_fidelity` for every method (``deltas=``)."""
    module = as_module(model)
    N, C, H, W = x.shape
    subsets = subsets.to(x.device)
    R = subsets.shape[1]
    sub = subsets if subsets.ndim == 5 else subsets[:, :, None].expand(N, R, C, H, W)
    y0 = _target_logits(module, x, target, batch_size)
    xp = torch.where(sub, torch.as_tensor(baseline, dtype=x.dtype, device=x.device), x[:, None])
    yp = _target_logits(module, xp.reshape(N * R, C, H, W), target.repeat_interleave(R), batch_size)
    return (y0[:, None] - yp.view(N, R)).double()


def mu_fidelity(model: ModelAdapter | nn.Module, x: torch.Tensor, target: torch.Tensor,
                maps_NHW: torch.Tensor, subsets: torch.Tensor | None = None, n_subsets: int = 200,
                grid: int = 9, frac: float = 0.2, baseline: float = 0.0,
                generator: torch.Generator | None = None, batch_size: int = 64,
                deltas: torch.Tensor | None = None, correlation: str = "spearman") -> torch.Tensor:
    """(N,) μ-fidelity (Bhatt et al. 2020): corr(Σ_S a, f_t(x) − f_t(x with S := baseline)) over subsets S.

    ``correlation``: ``"pearson"`` (Bhatt et al.; Quantus ``FaithfulnessCorrelation``'s default) or
    ``"spearman"`` (the paper protocol).
    ``subsets``: (N, R, H, W) or (N, R, C, H, W) bool; by default :func:`grid_subsets`. A per-channel
    subset sums the map once per selected channel (the map is broadcast over channels, as Quantus does).
    ``deltas``: the (N, R) logit drops of these subsets from :func:`fidelity_deltas` (computed when None).
    """
    N, C, H, W = x.shape
    if subsets is None:
        subsets = grid_subsets(N, H, W, n_subsets, grid, frac, generator, x.device)
    subsets = subsets.to(x.device)
    R = subsets.shape[1]
    sub = subsets if subsets.ndim == 5 else subsets[:, :, None].expand(N, R, C, H, W)
    att = (maps_NHW[:, None, None].double() * sub).flatten(2).sum(2)  # (N, R)
    if correlation not in ("pearson", "spearman"):
        raise ValueError(f"correlation must be 'pearson' or 'spearman', got {correlation!r}")
    if deltas is None:
        deltas = fidelity_deltas(model, x, target, subsets, baseline, batch_size)
    corr = pearson if correlation == "pearson" else spearman
    return corr(att, deltas.to(att.device).double()).float()


def stability_from_maps(maps_NHW: torch.Tensor, noisy_SNHW: torch.Tensor) -> torch.Tensor:
    """(N,) mean over the S noisy maps of ‖a(x) − a(x+u)‖_F / ‖a(x)‖_F (maps already post-processed)."""
    N = maps_NHW.shape[0]
    a = maps_NHW.reshape(N, -1).double()
    b = noisy_SNHW.reshape(noisy_SNHW.shape[0], N, -1).double().to(a.device)
    return ((a[None] - b).norm(dim=2) / a.norm(dim=1)[None]).mean(0).float()


def explain_noisy(explain: ExplainFn, x: torch.Tensor, target: torch.Tensor, noise: torch.Tensor,
                  batch_size: int = 32) -> torch.Tensor:
    """(S, N, H, W) raw maps of the S·N noisy copies x + noise[s] ((S, N, C, H, W)), ``batch_size`` per call."""
    S, N = noise.shape[0], x.shape[0]
    xs = (x[None] + noise.to(x.device, x.dtype)).reshape(S * N, *x.shape[1:])
    ts = target.repeat(S)
    maps = torch.cat([explain(xs[i:i + batch_size], ts[i:i + batch_size]).detach().float()
                      for i in range(0, S * N, batch_size)])
    return maps.reshape(S, N, *maps.shape[1:])


def stability(explain: ExplainFn, x: torch.Tensor, target: torch.Tensor, maps_NHW: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, n_samples: int = 20, radius: float = 0.1,
              generator: torch.Generator | None = None, postprocess: Callable | None = None,
              batch_size: int = 32) -> torch.Tensor:
    """(N,) mean relative change ‖a(x) − a(x+u)‖_F / ‖a(x)‖_F over noise samples (lower is better).

    ``explain(x, target) -> (N,H,W)``; ``postprocess`` (if given) is applied to every map including
    ``maps_NHW`` (the maps of ``x``; recomputed when None). ``noise``: (S, N, C, H, W), else U(0, radius).
    """
    post = postprocess or (lambda m: m)
    a = post(explain(x, target)) if maps_NHW is None else post(maps_NHW)
    if noise is None:
        noise = torch.rand(n_samples, *x.shape, generator=generator).to(x.device) * radius
    noisy = explain_noisy(explain, x, target, noise, batch_size)
    S, N = noisy.shape[:2]
    b = post(noisy.reshape(S * N, *noisy.shape[2:])).reshape(noisy.shape)
    return stability_from_maps(a, b)


def trapezoid_auc(curve_NK: torch.Tensor) -> torch.Tensor:
    """(N,) trapezoid area under curves sampled at equal steps over [0, 1]."""
    k = curve_NK.shape[1] - 1
    return (curve_NK[:, 1:] + curve_NK[:, :-1]).sum(1) / (2 * k)


def blur_kernel(H: int) -> torch.Tensor:
    """(k, k) Gaussian kernel of RISE's insertion substrate: ``gaussian_filter`` of a k×k delta, σ = 5·H/224 px,
    k = 2·⌊5·H/224 + ½⌋ + 1 (11 at 224 px: Petsiuk et al.'s ``gkern(11, 5)``)."""
    from scipy.ndimage import gaussian_filter

    k = max(3, 2 * int(5 * H / 224 + 0.5) + 1)
    delta = torch.zeros(k, k, dtype=torch.float64)
    delta[k // 2, k // 2] = 1
    return torch.from_numpy(gaussian_filter(delta.numpy(), 5.0 * H / 224))


def blurred(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) per-channel blur of ``x`` with :func:`blur_kernel` (zero padding, as RISE's conv2d)."""
    k = blur_kernel(x.shape[2]).to(x.device, x.dtype)
    C = x.shape[1]
    return F.conv2d(x, k.expand(C, 1, *k.shape), padding=k.shape[-1] // 2, groups=C)


def insertion_deletion(model: ModelAdapter | nn.Module, x: torch.Tensor, target: torch.Tensor,
                       maps_NHW: torch.Tensor, mode: str = "deletion", steps: int = 10, baseline: float = 0.0,
                       batch_size: int = 64, substrate: str = "baseline") -> tuple[torch.Tensor, torch.Tensor]:
    """RISE insertion/deletion: returns (auc (N,), curve (N, steps+1)) of the target's softmax probability.

    Step k shows the image with the top ``round(k·H·W/steps)`` pixels (by map value, stable order, all
    channels) kept (insertion; the others from the substrate: the constant ``baseline``, or with
    ``substrate="blur"`` the blurred image, :func:`blurred`) or set to the baseline (deletion).
    """
    if mode not in ("insertion", "deletion"):
        raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}")
    if substrate not in ("baseline", "blur"):
        raise ValueError(f"substrate must be 'baseline' or 'blur', got {substrate!r}")
    if steps < 1:
        raise ValueError(f"insertion/deletion needs steps >= 1, got {steps}")
    module = as_module(model)
    N, C, H, W = x.shape
    P = H * W
    order = maps_NHW.reshape(N, P).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(P, device=order.device).expand(N, P))
    counts = torch.tensor([round(P * k / steps) for k in range(steps + 1)], device=x.device)
    top = (rank[:, None, :] < counts[None, :, None]).view(N, steps + 1, 1, H, W)  # (N, K, 1, H, W)
    keep = top if mode == "insertion" else ~top
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if mode == "insertion" and substrate == "blur":
        base = blurred(x)[:, None]
    xs = torch.where(keep, x[:, None], base).reshape(N * (steps + 1), C, H, W)
    probs = _target_logits(module, xs, target.repeat_interleave(steps + 1), batch_size, softmax=True)
    curve = probs.view(N, steps + 1).float()
    return trapezoid_auc(curve), curve


METRICS = ("pointing", "localisation", "sparseness", "fidelity", "stability", "insertion", "deletion")
HIGHER_IS_BETTER = {"pointing": True, "localisation": True, "sparseness": True, "fidelity": True,
                    "stability": False, "insertion": True, "deletion": False}


def evaluate_maps(model: ModelAdapter | nn.Module, x: torch.Tensor, target: torch.Tensor,
                  maps_NHW: torch.Tensor, masks_NHW: torch.Tensor | None = None, metrics: tuple[str, ...] = METRICS,
                  explain: ExplainFn | None = None, fidelity_subsets: torch.Tensor | None = None,
                  fidelity_deltas: torch.Tensor | None = None, stability_noise: torch.Tensor | None = None,
                  n_subsets: int = 200, n_noise: int = 20,
                  radius: float = 0.1, steps: int | None = None, generator: torch.Generator | None = None,
                  batch_size: int = 64, explain_batch_size: int | None = None, definitions: str = "source",
                  tolerance: float | None = None, stability_maps: torch.Tensor | None = None,
                  fidelity_grid: int = 9, fidelity_frac: float = 0.2) -> dict[str, torch.Tensor]:
    """All requested metrics for one batch of raw maps, each after its post-processing. → {metric: (N,)}.

    ``definitions``: ``"source"`` or ``"paper"`` (:mod:`.definitions`): the post-processing per metric,
    μ-fidelity's correlation, the insertion substrate and the default ``steps``. ``tolerance``: pointing-game
    px (None: 15 px at 224, scaled). Also returns ``insertion_curve`` / ``deletion_curve`` (N, steps+1).
    ``fidelity_deltas``: the (N, R) logit drops of ``fidelity_subsets`` (:func:`fidelity_deltas`), reused
    across methods. Mask metrics need ``masks_NHW``; stability needs either ``stability_maps`` ((S, N, H, W)
    raw maps of the noisy copies) or ``explain(x, target)`` (the raw method), called on
    ``explain_batch_size`` noisy images at a time; ``batch_size`` bounds plain forward passes.
    """
    from .definitions import get_definitions
    from .postprocess import postprocess

    d = get_definitions(definitions)
    steps = d.default_steps if steps is None else steps
    if steps < d.min_steps:
        raise ValueError(f"the {definitions!r} definitions need at least {d.min_steps} insertion/deletion steps, "
                         f"got {steps}")
    out: dict[str, torch.Tensor] = {}
    maps_NHW = maps_NHW.detach().float().to(x.device)
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; expected some of {METRICS}")
        a = postprocess(maps_NHW, d.postprocess[m])
        if m in ("pointing", "localisation"):
            if masks_NHW is None:
                continue
            mk = masks_NHW.to(x.device)
            out[m] = pointing_game(a, mk, tolerance) if m == "pointing" else attribution_localisation(a, mk)
        elif m == "sparseness":
            out[m] = sparseness(a)
        elif m == "fidelity":
            out[m] = mu_fidelity(model, x, target, a, fidelity_subsets, n_subsets, fidelity_grid, fidelity_frac,
                                 generator=generator, batch_size=batch_size, deltas=fidelity_deltas,
                                 correlation=d.fidelity_correlation)
        elif m == "stability":
            if stability_maps is None:
                if explain is None:
                    continue
                if stability_noise is None:
                    stability_noise = torch.rand(n_noise, *x.shape, generator=generator).to(x.device) * radius
                stability_maps = explain_noisy(explain, x, target, stability_noise,
                                               explain_batch_size or batch_size)
            S, N = stability_maps.shape[:2]
            b = postprocess(stability_maps.reshape(S * N, *stability_maps.shape[2:]).float().to(x.device),
                            d.postprocess[m])
            out[m] = stability_from_maps(a, b.reshape(S, N, *b.shape[1:]))
        else:
            auc, curve = insertion_deletion(model, x, target, a, m, steps, batch_size=batch_size,
                                            substrate=d.insertion_substrate if m == "insertion" else "baseline")
            out[m], out[f"{m}_curve"] = auc, curve
    return out
