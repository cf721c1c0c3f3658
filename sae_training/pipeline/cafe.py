"""Stage ``cafe/<model>/<layer>``: top-k exemplars, iERFs, FAISS indexes and concept cards of one SAE
(``sae_cafe.cafe.build_cafe``), the index type fitted to the number of exemplars."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dag import Stage

#: FAISS wants about this many training points per IVF list (it warns below it); fewer: exact Flat search
IVF_POINTS_PER_LIST = 39


@dataclass(frozen=True)
class CafeSettings:
    """CAFE (``sae_cafe.cafe.build_cafe`` subset) and the number of concept-card PNGs per layer."""

    k: int = 16
    """top exemplars kept per latent"""
    n_anchor: int | None = 2
    """of which anchored to SRD iERFs (the cost of CAFE is the iERFs; None: all k)"""
    n_sample: int = 16
    """uniform-sample slots per latent (lower quantiles)"""
    index: str = "Flat"
    """FAISS exemplar index: Flat (exact) | IVF | IVF<nlist>,Flat | HNSW | HNSW<M>; an IVF with fewer than
    39 × nlist exemplars is replaced by Flat (with a note)"""
    batch_size: int = 64
    """images per forward pass"""
    cards: int = 3
    """concept-card PNGs of the most frequent (non-dense) latents"""


def stages(ctx) -> list[Stage]:
    out = []
    for m in ctx.cfg.models:
        if not m.cafe:
            continue
        for layer in m.layers:
            out.append(Stage(f"cafe/{m.name}/{layer}", [f"saes/{m.name}/{layer}", *ctx.image_deps()],
                             {"cafe": ctx.cfg.cafe, "images": ctx.images_key(), "max_images": ctx.cfg.max_images},
                             lambda m=m, layer=layer: [ctx.stage_dir("cafe", m.name, ctx.resolve(m, layer))],
                             lambda notes, m=m, layer=layer: build(ctx, m, layer, notes)))
    return out


def fit_index(spec: str, n_points: int, notes: list[str]) -> str:
    """``spec``, or ``"Flat"`` (with a note) when it is an IVF index with fewer than
    :data:`IVF_POINTS_PER_LIST` × nlist points to train on (``n_points``: the expected exemplar count)."""
    from sae_cafe.cafe.index import resolve_spec

    factory, _ = resolve_spec(spec, n_points)
    if not factory.upper().startswith("IVF"):
        return spec
    nlist = int(factory[3:].split(",")[0].split("_")[0])
    need = IVF_POINTS_PER_LIST * nlist
    if n_points < need:
        notes.append(f"cafe.index {spec!r} ({factory}) needs ≥ {need:,} exemplars ({IVF_POINTS_PER_LIST} per list) "
                     f"to train, this layer has about {n_points:,}; using the exact 'Flat' index instead "
                     f"(set cafe.index = 'Flat' to silence this)")
        return "Flat"
    return spec


def build(ctx, m, layer: str, notes: list[str]) -> dict[str, Any]:
    from sae_cafe.activations import ShardReader
    from sae_cafe.cafe import build_cafe, concept_card
    from sae_cafe.saes import load_sae

    ad = ctx.adapter(m)
    name = ctx.resolve(m, layer)
    sae_dir = ctx.stage_dir("saes", m.name, name)
    sae = load_sae(sae_dir, ad, name, device=ctx.device)
    c = ctx.cfg.cafe
    n_images = ShardReader(ctx.stage_dir("acts", m.name, name)).n_images
    dead = ctx.metric(f"saes/{m.name}/{layer}", "dead_fraction")
    live = int(round(sae.W_dec.shape[0] * (1.0 - (dead if isinstance(dead, (int, float)) and dead == dead else 0))))
    index = fit_index(c.index, max(live, 1) * min(c.k, n_images), notes)
    attributes = None
    if not ctx.cfg.images:  # per-latent attribute purity, aligned with the folder order
        import numpy as np

        order = np.array([int(p.stem) for p, _ in ctx.folder_files()])
        attributes = {k: v[order] for k, v in ctx.world().world.attribute_maps().items()}
    out = ctx.stage_dir("cafe", m.name, name)
    cafe = build_cafe(ad, sae, name, ctx.image_source(), out_dir=out, k=c.k, n_anchor=c.n_anchor,
                      n_sample=c.n_sample, index=index, batch_size=c.batch_size, attributes=attributes,
                      upstream={"sae": sae_dir}, extra_manifest={"sae_path": str(sae_dir)})
    cards = []
    freq = cafe.latents["firing_frequency"].float()
    # cards of the most frequent latents that are not dense (dense ones show nothing specific)
    order = freq.argsort(descending=True).tolist()
    picked = [s for s in order if 0 < freq[s] <= 0.2][: c.cards] or order[: c.cards]
    for s in picked:
        card = concept_card(cafe, s, model=ad, png=out / "cards" / f"latent_{s:05d}.png")
        cards.append(str(card.get("png", "")))
    man = cafe.manifest
    ierf = man.get("timings", {}).get("ierf_per_s")
    # concept labels (labels.json, written by build_cafe from the world's attribute maps); a user's image folder
    # has none: label it with sae_cafe.concepts.dissection (a mask folder) or a labeller
    labelled = sum(1 for lab in cafe.concept_labels.values() if lab.labelled) if man.get("has_labels") else None
    return {"latents": man.get("n_latents"), "exemplars": man.get("n_exemplars"), "index": index,
            "ierf_per_s": round(float(ierf), 1) if isinstance(ierf, (int, float)) else ierf, "cards": len(cards),
            "labelled_latents": labelled,
            "card_png": cards[0] if cards else None}
