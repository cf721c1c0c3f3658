"""Stage ``acts/<model>``: PFV shards of all of a model's layers in one pass
(``sae_cafe.activations.extract_activations``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dag import Stage


@dataclass(frozen=True)
class ExtractSettings:
    """Activation extraction (``sae_cafe.activations.extract_activations``)."""

    batch_size: int = 64
    """images per forward pass"""
    dtype: str = "float32"
    """shard dtype: float32 | float16 | bfloat16 (SAEs train in float32 either way)"""
    shard_size: int = 65536
    """PFV rows per shard file"""
    positions_per_image: int | None = None
    """keep this many random grid positions per image (None: all of them)"""
    tokens: str = "patch"
    """ViT token rows stored: patch (grid positions) | all (also class/register/distillation tokens) | cls"""
    outlier_k: float = 10.0
    """high-norm outlier tokens: norm > median + k·MAD of the image's patch-token norms (reported, flagged)"""

    def __post_init__(self) -> None:
        from sae_cafe.activations.shards import check_tokens

        check_tokens(self.tokens, "[extract] tokens")


def stages(ctx) -> list[Stage]:
    out = []
    for m in ctx.cfg.models:
        out.append(Stage(f"acts/{m.name}", ctx.image_deps(),
                         {**ctx.model_key(m), "layers": list(m.layers), "extract": ctx.cfg.extract,
                          "max_images": ctx.cfg.max_images},
                         lambda m=m: [ctx.stage_dir("acts", m.name, n) for n in ctx.layers(m)],
                         lambda notes, m=m: build(ctx, m, notes)))
    return out


def build(ctx, m, notes: list[str] | None = None) -> dict[str, Any]:
    from sae_cafe.activations import ShardReader, extract_activations

    ad = ctx.adapter(m)
    e = ctx.cfg.extract
    dirs = extract_activations(ad, ctx.image_source(), ctx.layers(m), run=ctx.cfg.run, root=ctx.root,
                               dtype=e.dtype, shard_size=e.shard_size, batch_size=e.batch_size,
                               positions_per_image=e.positions_per_image, overwrite=True, tokens=e.tokens,
                               outlier_k=e.outlier_k,
                               dataset="concept world" if not ctx.cfg.images else ctx.cfg.images)
    out = {}
    for layer, d in dirs.items():
        r = ShardReader(d)
        out[layer] = f"{r.n:,} PFVs × {r.d_in} ({r.n_images} images)"
        report = r.outlier_report or {}
        if report.get("n") and notes is not None:
            notes.append(f"{layer}: {report['note']}")
    return out
