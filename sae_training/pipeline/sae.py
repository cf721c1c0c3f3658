"""Stage ``saes/<model>/<layer>``: a small sae-lens SAE per layer with held-out metrics
(``sae_training.train.train_sae``), its batch size fitted to the PFVs the layer has."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .dag import Stage

#: above this fraction of dead latents the stage warns (the atlas would be mostly empty)
MAX_DEAD_FRACTION = 0.5


@dataclass(frozen=True)
class SAESettings:
    """Small SAEs (the same names as ``sae_training.SAETrainConfig`` fields)."""

    architecture: str = "batchtopk"
    """sae-lens architecture: standard | topk | batchtopk | jumprelu | matryoshka"""
    expansion: int = 8
    """d_sae = expansion × channels"""
    d_sae: int | None = None
    """latents (overrides ``expansion``)"""
    k: float | None = None
    """active latents per PFV for the top-k family (None: min(32, d_in // 8))"""
    steps: int | None = 400
    """optimizer steps (``steps``/``seconds``: the first reached stops)"""
    seconds: float | None = 25.0
    """training time budget in seconds"""
    batch_size: int = 512
    """PFVs per step; capped at half of the layer's training PFVs (with a note)"""
    holdout: float = 0.1
    """fraction of images (the last ones) kept out of training for the held-out metrics"""
    tokens: str = "patch"
    """ViT token kinds trained on: patch | all | cls (must have been extracted: [extract] tokens)"""
    outliers: str = "report"
    """high-norm outlier rows flagged at extraction: report (train on them, with a note) | exclude"""
    normalize: str = "expected_average_only_in"
    """sae-lens normalize_activations: expected_average_only_in (mean norm √d_in; factor recorded and folded
    into the exported weights) | none"""
    n_checkpoints: int = 0
    """mid-run checkpoints (resume after an interruption)"""
    seed: int = 0
    """seed of initialisation and batch order"""

    def __post_init__(self) -> None:
        from sae_cafe.activations.shards import check_tokens
        from sae_cafe.errors import SaeCafeError

        check_tokens(self.tokens, "[sae] tokens")
        if self.outliers not in ("report", "exclude"):
            raise SaeCafeError(f"[sae] outliers={self.outliers!r}; use 'report' or 'exclude'")


def stages(ctx) -> list[Stage]:
    out = []
    for m in ctx.cfg.models:
        for layer in m.layers:
            s = dataclasses.replace(ctx.cfg.sae, **m.sae)
            out.append(Stage(f"saes/{m.name}/{layer}", [f"acts/{m.name}"], {"sae": s},
                             lambda m=m, layer=layer: [ctx.stage_dir("saes", m.name, ctx.resolve(m, layer))],
                             lambda notes, m=m, layer=layer, s=s: build(ctx, m, layer, s, notes)))
    return out


def fit_batch(s: SAESettings, n_pfvs: int, n_images: int, notes: list[str]) -> SAESettings:
    """``s`` with ``batch_size`` capped at half of the training PFVs (``n_pfvs`` rows over ``n_images``
    images, minus the held-out images), with a note when it was capped."""
    from sae_training.data import holdout_split

    (a, b), _ = holdout_split(n_images, s.holdout)
    n_train = n_pfvs * (b - a) // max(n_images, 1)
    cap = max(1, n_train // 2)
    if s.batch_size > cap:
        notes.append(f"sae.batch_size {s.batch_size} > half of the {n_train:,} training PFVs of this layer; "
                     f"using batch_size = {cap} (set sae.batch_size ≤ {cap}, or use more images, to silence this)")
        return dataclasses.replace(s, batch_size=cap)
    return s


def dead_latent_advice(dead: float | None, s: SAESettings, steps: int | None, seconds: float | None) -> str | None:
    """A warning when more than :data:`MAX_DEAD_FRACTION` of the latents are dead, saying how to fix it."""
    if dead is None or dead != dead or dead <= MAX_DEAD_FRACTION:
        return None
    stopped = ("the time budget" if s.seconds is not None and seconds is not None and seconds >= s.seconds * 0.95
               else "the step budget")
    return (f"{dead:.0%} of the SAE latents are dead after {steps} steps (stopped by {stopped}); the concept atlas "
            f"of this layer will be mostly empty. Fix: raise sae.steps / sae.seconds (now {s.steps} / {s.seconds}), "
            f"or lower sae.expansion (now {s.expansion}), or use more images")


def build(ctx, m, layer: str, s: SAESettings, notes: list[str]) -> dict[str, Any]:
    from sae_cafe.activations import ShardReader
    from sae_cafe.activations.shards import TOKEN_SETTINGS
    from sae_training.train import SAETrainConfig, train_sae

    name = ctx.resolve(m, layer)
    acts = ctx.stage_dir("acts", m.name, name)
    r = ShardReader(acts)
    by_kind = (r.manifest.get("counts") or {}).get("by_kind")  # rows per token kind (None: older shards)
    n = r.n if by_kind is None else sum(by_kind.get(k, 0) for k in TOKEN_SETTINGS[s.tokens])
    s = fit_batch(s, n, r.n_images, notes)
    cfg = SAETrainConfig(**dataclasses.asdict(s), device=ctx.device)  # same field names
    res = train_sae(acts, ctx.stage_dir("saes", m.name, name), config=cfg, overwrite=True, resume=not ctx.fresh)
    notes.extend(res.get("notes", []))  # outlier rows trained on / left out, shards without an outlier report
    ev, tr = res.get("eval", {}), res["training"]
    out = {"d_sae": tr.get("d_sae"), "steps": tr.get("steps"), "batch_size": s.batch_size,
           "train_s": round(float(tr.get("train_seconds") or 0), 1),
           "explained_variance": _round(ev.get("explained_variance")), "l0": _round(ev.get("l0")),
           "dead_fraction": _round(ev.get("dead_fraction"))}
    advice = dead_latent_advice(ev.get("dead_fraction"), s, tr.get("steps"), tr.get("train_seconds"))
    if advice:
        notes.append(f"warning: {advice}")
        out["_reasons"] = {"dead_fraction": advice}
    return out


def _round(v: Any, nd: int = 3) -> Any:
    return round(float(v), nd) if isinstance(v, (int, float)) and v is not None else v
