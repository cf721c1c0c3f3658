"""Concept cards: one latent's firing statistics, top exemplars with iERF / activation-map overlays (PNG),
the classes it pushes (layers under a linear head) and its iERF concentration score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SaeCafeError
from .metrics import mass_region, purity_attributes
from .source import ImageSource
from .store import Cafe, load_cafe


def _nan_none(x: float) -> float | None:
    return None if x != x else x


def card_data(cafe: Cafe, latent: int, n: int = 6) -> dict:
    """The card as JSON: statistics, top-``n`` exemplar records, pushed classes and, for stages built with
    ground-truth attributes, the (attribute, value) that the latent's iERF purity names (``purity``) and its
    concept label (``concept``: :class:`sae_cafe.concepts.ConceptLabel` as JSON, None without labels)."""
    t = cafe.latents
    if not 0 <= latent < cafe.n_latents:
        raise SaeCafeError(f"latent {latent} out of range: this CAFE has {cafe.n_latents} latents")
    stats = {k: _nan_none(float(v[latent])) for k, v in t.items()}
    out = {"latent": latent, "model": cafe.manifest["model"], "layer": cafe.layer, "stats": stats,
           "exemplars": [cafe.record(e).to_json() for e in cafe.exemplar_ids(latent)[:n]], "pushes": None,
           "purity": purity_attributes(cafe, "ierf").get(latent)}
    lab = cafe.concept_labels.get(latent)
    out["concept"] = lab.to_json() if lab is not None else None
    push = cafe.class_push
    if push is not None:
        names = cafe.manifest.get("class_names") or None
        order = torch.argsort(push[latent], descending=True).tolist()
        fmt = lambda c: {"class": names[c] if names else c, "logit": float(push[latent, c])}  # noqa: E731
        out["pushes"] = {"up": [fmt(c) for c in order[:3]], "down": [fmt(c) for c in order[::-1][:3]]}
    return out


def _images(cafe: Cafe, images) -> ImageSource | None:
    if images is not None:
        return ImageSource(images)
    src = cafe.images.get("source")
    return ImageSource(src) if src and Path(src).exists() else None


def _overlay(img: np.ndarray, heat: np.ndarray, cmap: str) -> np.ndarray:
    import matplotlib

    h = np.clip(heat, 0, None)
    h = h / h.max() if h.max() > 0 else h
    col = matplotlib.colormaps[cmap](h)[..., :3]
    return 0.45 * img + 0.55 * col


def concept_card(cafe: Cafe | str | Path, latent: int, images=None, model=None, png: str | Path | None = None,
                 n: int = 6) -> dict:
    """Card of ``latent`` (dict); with ``png`` also a figure: per exemplar the image, the upsampled activation
    map overlay, the positive iERF overlay and the image kept inside the 50 %-mass iERF region.

    ``images`` is the build's image source (default: the folder recorded in the stage); ``model`` (adapter)
    is used to denormalise preprocessed tensors.
    """
    cafe = cafe if isinstance(cafe, Cafe) else load_cafe(cafe)
    card = card_data(cafe, latent, n)
    if png is None:
        return card
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    ids = cafe.exemplar_ids(latent)[:n]
    src = _images(cafe, images)
    H, W = cafe.input_size
    rows = max(1, len(ids))
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows + 0.6), squeeze=False)
    s = card["stats"]
    title = (f"{cafe.manifest['model']} {cafe.layer} latent {latent}: fires on {100 * s['firing_frequency']:.2f}% "
             f"PFVs; iERF top-10% mass {s['concentration_ierf'] or float('nan'):.2f} vs act "
             f"{s['concentration_act'] or float('nan'):.2f}")
    if card["concept"] and card["concept"]["name"]:
        c = card["concept"]
        title += f"\nlabel: {c['name']} (confidence {c['confidence']:.2f}, {c['calibration']})"
    if card["purity"]:
        p = card["purity"]
        title += f"; iERF purity {p['purity']:.2f} on {p['attribute']} = {p['value']}"
    if card["pushes"]:
        title += "\npushes " + ", ".join(f"{p['class']} ({p['logit']:+.2f})" for p in card["pushes"]["up"])
    fig.suptitle(title, fontsize=8)
    for r, e in enumerate(ids):
        rec = cafe.record(e)
        if src is not None:
            pil = src.pil(rec.image, model)
            img = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
            img = F.interpolate(img, size=(H, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        else:
            img = np.full((H, W, 3), 0.5, dtype=np.float32)
        ierf = cafe.ierf(e)[0]
        act = cafe.act_map(e)[0]
        keep = mass_region(ierf[None], 0.5)[0].numpy()
        panels = [img, _overlay(img, act.numpy(), "viridis"), _overlay(img, ierf.numpy(), "jet"),
                  img * (0.25 + 0.75 * keep[..., None])]
        labels = [f"#{rec.rank} {rec.image_name[:18]}\na={rec.activation:.2f} @({rec.row},{rec.col})",
                  "activation map", "iERF (SRD)", "50% iERF mass"]
        for c, (p, lab) in enumerate(zip(panels, labels)):
            ax = axes[r, c]
            ax.imshow(np.clip(p, 0, 1), interpolation="nearest")
            ax.set_title(lab, fontsize=6)
            ax.axis("off")
        gh, gw = cafe.grid
        cy, cx = (rec.row + 0.5) * H / gh, (rec.col + 0.5) * W / gw
        axes[r, 1].plot([cx], [cy], "r+", ms=6)
    if not ids:
        axes[0, 0].text(0.5, 0.5, "no exemplars (dead latent)", ha="center")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.stem}.part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    card["png"] = str(png)
    return card
