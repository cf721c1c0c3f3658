"""Token kinds of a ViT's prefix tokens and the high-norm outlier report of an extraction.

High-norm tokens ("artifact" tokens of large ViTs such as DINOv2: a few patch tokens per image whose norm is
many times the others', holding global information) would dominate an SAE's reconstruction loss. They are
found per image with a robust rule: a token (patch or prefix) is an outlier when its norm exceeds

    median + k · max(MAD, 0.1 · median)     (median and MAD of the norms of the image's patch tokens)

with ``k = outlier_k`` (default 10: about 6.7 σ for normally distributed norms, where σ ≈ 1.4826 · MAD). The
MAD floor makes an outlier at least (1 + k/10) × the median norm (2× with the default k), so a layer whose
tokens have nearly equal norms flags nothing, while DINOv2's artifact tokens — norms several times the
median — are flagged. Layers with fewer than :data:`MIN_TOKENS` patch tokens per image (small CNN grids) are
not checked: a median of so few norms says little (the report says so); neither are CNN feature maps (their
positions are not tokens, and post-ReLU norms are heavy-tailed by design). The extraction counts them per
layer (how many, of which kinds, at which grid positions, their norm ratio to the image's median) into the
acts manifest and flags each stored row (shard column ``outlier``), so SAE training either reports them or
leaves them out (``outliers = "report" | "exclude"``).

Written by hand: no library reports high-norm tokens of vision models.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

#: floor of the MAD as a fraction of the median (a layer with (nearly) equal token norms flags nothing)
MAD_FLOOR = 0.1
#: images with fewer patch tokens than this are not checked
MIN_TOKENS = 8


def prefix_kinds(adapter: Any, n: int | None = None) -> list[str]:
    """The kinds (``"cls"``, ``"register"``, ``"dist"``) of the adapter's ``n`` prefix tokens, in token order.

    Uses the adapter's ``prefix_kinds()`` when it has one (timm: class, distillation, register tokens from the
    model's attributes); else a class token followed by register tokens (Hugging Face / open_clip towers, whose
    prefix is that). ``n`` defaults to ``adapter.num_prefix_tokens``.
    """
    n = int(getattr(adapter, "num_prefix_tokens", 0)) if n is None else int(n)
    own = getattr(adapter, "prefix_kinds", None)
    kinds = list(own()) if callable(own) else None
    if kinds is None or len(kinds) != n:
        kinds = (["cls"] + ["register"] * (n - 1)) if n else []
    return kinds


def flag_outliers(pfv_BND: torch.Tensor, extra_BED: torch.Tensor | None, k: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """High-norm outliers of one batch: ``(flag (B, N) bool, ratio (B, N), flag_extra (B, E), ratio_extra (B, E))``
    on the CPU; ``ratio`` = norm / median of the image's patch-token norms (E = 0 without prefix tokens). With
    fewer than :data:`MIN_TOKENS` patch tokens nothing is flagged and the ratios are None (not checked)."""
    B, N = pfv_BND.shape[:2]
    E = extra_BED.shape[1] if extra_BED is not None else 0
    if N < MIN_TOKENS:
        return torch.zeros(B, N, dtype=torch.bool), None, torch.zeros(B, E, dtype=torch.bool), None
    norm = pfv_BND.detach().float().norm(dim=-1).cpu()  # (B, N)
    med = norm.median(dim=1, keepdim=True).values
    mad = (norm - med).abs().median(dim=1, keepdim=True).values
    thr = med + k * torch.maximum(mad, MAD_FLOOR * med)
    scale = med.clamp_min(torch.finfo(torch.float32).tiny)
    if extra_BED is not None and extra_BED.shape[1]:
        ne = extra_BED.detach().float().norm(dim=-1).cpu()
    else:
        ne = torch.zeros(norm.shape[0], 0)
    return norm > thr, norm / scale, ne > thr, ne / scale


@dataclass
class OutlierTally:
    """Running count of high-norm outliers of one layer (kept in ``progress.json`` across a resume)."""

    n_tokens: int = 0
    n: int = 0
    n_images: int = 0
    images_with: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    ratio_max: float = 0.0
    ratio_min: float = 0.0
    ratio_sum: float = 0.0

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> OutlierTally:
        return cls(**d) if d else cls()

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def add(self, flag_BN: torch.Tensor, ratio_BN: torch.Tensor | None, positions_N2: torch.Tensor,
            flag_BE: torch.Tensor, ratio_BE: torch.Tensor | None, kinds_E: list[str], first_image: int,
            images_done: int = 0) -> None:
        """Count the outliers (:func:`flag_outliers`) of the images of a batch with index ≥ ``images_done``."""
        if ratio_BN is None or ratio_BE is None:  # not checked (too few patch tokens)
            return
        skip = max(0, images_done - first_image)
        flag_BN, ratio_BN, flag_BE, ratio_BE = flag_BN[skip:], ratio_BN[skip:], flag_BE[skip:], ratio_BE[skip:]
        B = flag_BN.shape[0]
        if not B:
            return
        self.n_images += B
        self.n_tokens += flag_BN.numel() + flag_BE.numel()
        self.images_with += int((flag_BN.any(1) | (flag_BE.any(1) if flag_BE.shape[1] else False)).sum())
        ratios = torch.cat([ratio_BN[flag_BN], ratio_BE[flag_BE]])
        if not ratios.numel():
            return
        n_patch = int(flag_BN.sum())
        counts = Counter({"patch": n_patch} if n_patch else {})
        for j, kind in enumerate(kinds_E):
            c = int(flag_BE[:, j].sum())
            if c:
                counts[kind] += c
        for kind, c in counts.items():
            self.by_kind[kind] = self.by_kind.get(kind, 0) + c
        for p in positions_N2[flag_BN.nonzero()[:, 1]].tolist():
            key = f"{p[0]},{p[1]}"
            self.positions[key] = self.positions.get(key, 0) + 1
        self.ratio_min = float(ratios.min()) if not self.n else min(self.ratio_min, float(ratios.min()))
        self.n += int(ratios.numel())
        self.ratio_max = max(self.ratio_max, float(ratios.max()))
        self.ratio_sum += float(ratios.double().sum())

    def report(self, k: float) -> dict[str, Any]:
        """The manifest's ``outliers`` entry."""
        top = sorted(self.positions.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return {"rule": "norm > median + k·MAD of the image's patch-token norms (MAD floored at "
                        f"{MAD_FLOOR:g} × median)", "k": float(k),
                "min_patch_tokens": MIN_TOKENS, "checked": bool(self.n_images),
                "n": self.n, "n_tokens_checked": self.n_tokens, "fraction": self.n / max(self.n_tokens, 1),
                "images_with_outliers": self.images_with, "n_images": self.n_images, "by_kind": dict(self.by_kind),
                "top_positions": [{"row": int(p.split(",")[0]), "col": int(p.split(",")[1]), "n": c}
                                  for p, c in top],
                "norm_ratio": {"min": self.ratio_min, "mean": self.ratio_sum / max(self.n, 1),
                               "max": self.ratio_max} if self.n else None,
                "note": self.note(k) if self.n else None}

    def note(self, k: float) -> str:
        """One sentence for the user: how many, which kinds and positions, their norm ratio."""
        top = sorted(self.positions.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        pos = ", ".join(f"({p})×{c}" for p, c in top)
        r = {"n": self.n, "n_tokens_checked": self.n_tokens, "fraction": self.n / max(self.n_tokens, 1),
             "by_kind": self.by_kind, "images_with_outliers": self.images_with, "n_images": self.n_images,
             "norm_ratio": {"min": self.ratio_min, "mean": self.ratio_sum / max(self.n, 1), "max": self.ratio_max}}
        kinds = ", ".join(f"{v} {kind}" for kind, v in sorted(r["by_kind"].items()))
        nr = r["norm_ratio"]
        return (f"{r['n']} high-norm outlier tokens of {r['n_tokens_checked']} ({r['fraction']:.2%}; {kinds}) in "
                f"{r['images_with_outliers']} of {r['n_images']} images, norm {nr['min']:.1f}–{nr['max']:.1f}× "
                f"the image's median (mean {nr['mean']:.1f}×; rule: median + {k:g}·MAD)"
                + (f"; most frequent grid positions (row,col): {pos}" if pos else "")
                + ". They are flagged in the shards' outlier column; SAE training reports them "
                  "(outliers='report') or leaves them out (outliers='exclude')")
