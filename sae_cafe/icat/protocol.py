"""Interlayer insertion/deletion protocol (spec §4.4).

For an image and a target latent j of the target layer: rank the source latents active on the image by a
method's scores for j, signed by the direction of the target's change (score · sign(T_full − T_base), so
for a target that *rises* when the latents are removed the most negative contributors come first);
*deletion* sets the top-r ranked latents to the baseline (at every position),
*insertion* starts with all active latents at the baseline and restores them in rank order. The target is
tracked through the isolated sub-network (error term frozen) and normalised,
ρ = (T − T_base) / (T_full − T_base) clamped to [−0.5, 1.5], where T_base has every active latent at the
baseline (inactive latents keep their code 0 throughout, so both curves run from T_full to T_base).
AUCs over the fraction of active latents (``n_points`` points, trapezoid rule): deletion lower is better,
insertion higher is better; summary = AUC(ins) − AUC(del). Written by hand (no library implements it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attribute import ICATResult, PairContext


@dataclass
class CurveResult:
    """Per (image, target) pair: fractions (P,), curves (Q, P) and AUCs (Q,); Q valid pairs."""

    fractions: torch.Tensor
    deletion_QP: torch.Tensor
    insertion_QP: torch.Tensor
    auc_del_Q: torch.Tensor
    auc_ins_Q: torch.Tensor
    pairs_Q2: torch.Tensor  # (image, target column)
    n_degenerate: int

    def summary(self) -> dict[str, float]:
        """Means and standard errors of the AUCs and of their difference."""
        def ms(v: torch.Tensor) -> tuple[float, float]:
            if len(v) == 0:
                return float("nan"), float("nan")
            return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0

        d, ds = ms(self.auc_del_Q)
        i, is_ = ms(self.auc_ins_Q)
        f, fs = ms(self.auc_ins_Q - self.auc_del_Q)
        return {"n_pairs": len(self.auc_del_Q), "n_degenerate": self.n_degenerate, "auc_del": d,
                "auc_del_se": ds, "auc_ins": i, "auc_ins_se": is_, "auc_diff": f, "auc_diff_se": fs}


def _trapz(y_QP: torch.Tensor, x_P: torch.Tensor) -> torch.Tensor:
    return ((y_QP[:, 1:] + y_QP[:, :-1]) / 2 * (x_P[1:] - x_P[:-1])).sum(1)


@torch.no_grad()
def insertion_deletion(ctx: PairContext, result: ICATResult, n_points: int = 12, batch_size: int = 64,
                       clamp: tuple[float, float] = (-0.5, 1.5), min_delta: float = 1e-6) -> CurveResult:
    """Run the protocol for every (image, target) of ``result`` (computed on ``ctx``).

    The baseline is ``result.baseline_S`` (the one the scores were computed with). Pairs whose target does
    not move (|T_full − T_base| < ``min_delta``·max(1, |T_full|)) are skipped and counted as degenerate.
    """
    a = ctx.a_BNS
    base = result.baseline_S
    B, _, J = result.scores_BSJ.shape
    active_BS = (a != 0).any(1)
    fractions = torch.linspace(0, 1, n_points)
    masks, owners, pairs = [], [], []
    t_full_all = result.t_full_BJ
    # direction of the change each target undergoes (T_full vs every active latent at the baseline)
    rows = torch.arange(B, device=a.device)
    base_codes = torch.where(active_BS[:, None, :], base, a)
    t_base_all = torch.cat([ctx.evaluate(base_codes[c:c + batch_size], rows[c:c + batch_size],
                                         result.targets_BJ[c:c + batch_size]) for c in range(0, B, batch_size)])
    sign_BJ = torch.where(t_full_all >= t_base_all, 1.0, -1.0)
    for b in range(B):
        act = active_BS[b].nonzero()[:, 0]
        if len(act) == 0:
            continue
        for j in range(J):
            key = result.scores_BSJ[b, act, j] * sign_BJ[b, j]
            order = act[key.argsort(descending=True, stable=True)]
            r = (fractions * len(act)).round().long()
            q = len(pairs)
            pairs.append((b, j))
            for kind in (0, 1):  # 0: deletion (top-r at baseline), 1: insertion (all but top-r at baseline)
                for ri in r.tolist():
                    m = torch.zeros_like(active_BS[b])
                    if kind == 0:
                        m[order[:ri]] = True
                    else:
                        m[order[ri:]] = True
                    masks.append(m)
                    owners.append(q)
    if not pairs:
        empty = torch.zeros(0)
        return CurveResult(fractions, torch.zeros(0, n_points), torch.zeros(0, n_points), empty, empty,
                           torch.zeros(0, 2, dtype=torch.long), 0)
    masks_MS = torch.stack(masks)
    owners_t = torch.tensor(owners)
    pairs_t = torch.tensor(pairs)
    vals = []
    for c in range(0, len(masks_MS), batch_size):
        own = owners_t[c:c + batch_size]
        b_idx, j_idx = pairs_t[own, 0], pairs_t[own, 1]
        codes = torch.where(masks_MS[c:c + batch_size, None, :], base, a[b_idx])
        tg = result.targets_BJ[b_idx, j_idx][:, None]
        vals.append(ctx.evaluate(codes, b_idx.to(a.device), tg)[:, 0])
    T = torch.cat(vals).view(len(pairs), 2, n_points)
    t_full = t_full_all[pairs_t[:, 0], pairs_t[:, 1]]
    t_base = T[:, 1, 0]  # insertion with nothing restored = every active latent at the baseline
    delta = t_full - t_base
    ok = delta.abs() >= min_delta * t_full.abs().clamp_min(1.0)
    rho = ((T - t_base[:, None, None]) / delta[:, None, None]).clamp(*clamp)[ok]
    dele, ins = rho[:, 0], rho[:, 1]
    return CurveResult(fractions, dele, ins, _trapz(dele, fractions), _trapz(ins, fractions),
                       pairs_t[ok], int((~ok).sum()))
