"""Stage ``world``: the generated concept world (``sae_cafe.world.write_world``), used when the run has no
image folder of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dag import Stage


@dataclass(frozen=True)
class WorldSettings:
    """The generated concept world (used when ``images`` is not set)."""

    n: int = 400
    """number of scenes (images) generated"""
    seed: int = 0
    """generator seed: the same (n, seed, size) gives the same images"""
    size: int = 64
    """image side in pixels"""


def stages(ctx) -> list[Stage]:
    """The world stage of a run without ``images`` (else none)."""
    if ctx.cfg.images:
        return []
    return [Stage("world", [], {"world": ctx.cfg.world}, lambda: [ctx.stage_dir("world")],
                  lambda notes: build(ctx), reuse=lambda outs: matches(ctx, outs))]


def matches(ctx, outs: list[Path]) -> bool:
    """Reuse a world exported by ``sae-cafe make-world`` with the same n, seed and size."""
    from sae_cafe.artifacts import read_manifest

    c = read_manifest(outs[0], "world")["config"]
    w = ctx.cfg.world
    return c.get("n") == w.n and c.get("seed") == w.seed and (c.get("world") or {}).get("size") == w.size


def build(ctx) -> dict[str, Any]:
    from sae_cafe.world import WorldConfig, write_world

    w = ctx.cfg.world
    ctx.reset_world()
    path = write_world(ctx.cfg.run, n=w.n, seed=w.seed, config=WorldConfig(size=w.size), root=ctx.root)
    return {"images": w.n, "examples_png": str(path / "examples.png")}
