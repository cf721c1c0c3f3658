"""Query by example: image (+ optional box) → its PFVs → matching latents with exemplars, and its own latents."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SaeCafeError
from ..images import to_pil
from ..model_record import check_model, read_record
from ..models import get_adapter
from ..saes import encode_images
from .anchor import IerfFn, compute_ierfs, default_ierf_fn
from .store import Cafe, load_cafe


def box_to_input(adapter, box: tuple[float, float, float, float], original_size: tuple[int, int]
                 ) -> tuple[float, float, float, float]:
    """Map a box (x0, y0, x1, y1) in original-image pixels (``original_size`` = (W, H)) to model-input
    pixels, following the adapter's resize + centre crop (or plain resize)."""
    w, h = original_size
    H, W = adapter.input_size
    if adapter.resize is not None:
        s = adapter.resize / min(h, w)
        nh, nw = max(H, round(h * s)), max(W, round(w * s))
        top, left = (nh - H) // 2, (nw - W) // 2
        sy, sx = nh / h, nw / w
    else:
        top = left = 0
        sy, sx = H / h, W / w
    x0, y0, x1, y1 = box
    cx = lambda v: min(max(v * sx - left, 0.0), float(W))  # noqa: E731
    cy = lambda v: min(max(v * sy - top, 0.0), float(H))  # noqa: E731
    return cx(x0), cy(y0), cx(x1), cy(y1)


def box_mask(box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: pixels whose centres lie inside the box (x1, y1 exclusive)."""
    H, W = size
    x0, y0, x1, y1 = box
    ys = torch.arange(H).float()[:, None] + 0.5
    xs = torch.arange(W).float()[None, :] + 0.5
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


@dataclass
class QueryResult:
    """Result of :func:`query`.

    Attributes:
        positions: (n, 2) selected grid positions (row, col). inside: (n,) positive iERF mass share in the box.
        matches: latents whose exemplars are nearest to the selected PFVs: {latent, score, hits, exemplars}.
        own_latents: the image's own top-activating latents: {latent, activation, position}.
        nearest_directions: latents whose decoder directions are nearest to the mean selected PFV − b_dec.
    """

    positions: torch.Tensor
    inside: torch.Tensor | None
    matches: list[dict] = field(default_factory=list)
    own_latents: list[dict] = field(default_factory=list)
    nearest_directions: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"positions": self.positions.tolist(),
                "inside": None if self.inside is None else [round(float(v), 4) for v in self.inside],
                "matches": self.matches, "own_latents": self.own_latents,
                "nearest_directions": self.nearest_directions}


def _parse_box(box) -> tuple[float, float, float, float] | None:
    if box is None:
        return None
    if isinstance(box, str):
        try:
            box = tuple(float(v) for v in box.split(","))
        except ValueError as e:
            raise SaeCafeError(f"box {box!r} must be x0,y0,x1,y1 (numbers, original-image pixels)") from e
    box = tuple(float(v) for v in box)
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise SaeCafeError(f"box {box} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, in original-image pixels")
    return box


@torch.no_grad()
def query(cafe: Cafe | str | Path, model, sae, image: object, box=None, k_latents: int = 10,
          k_exemplars: int = 5, n_neighbours: int = 32, min_inside: float = 0.5, ierf_fn: IerfFn | None = None,
          seeds_per_pass: int = 64) -> QueryResult:
    """Search a CAFE by example.

    Args:
        image: path, PIL image, array, or preprocessed (1, 3, H, W) tensor (then ``box`` is in input pixels).
        box: (x0, y0, x1, y1) or "x0,y0,x1,y1" in original-image pixels; PFVs whose positive iERF mass lies
            ≥ ``min_inside`` inside it are used (all PFVs without a box).
        n_neighbours: nearest exemplar PFVs retrieved per selected PFV.

    ``model`` must be the model the stage was built with (its recorded weights; see
    :mod:`sae_cafe.model_record`), else :class:`~sae_cafe.model_record.ModelMismatchError`.
    """
    cafe = cafe if isinstance(cafe, Cafe) else load_cafe(cafe)
    adapter = get_adapter(model)
    rec = read_record(cafe.manifest, str(cafe.path))
    if rec is not None:  # the stage's own model and weights only (ModelMismatchError naming both hashes)
        check_model(rec, adapter, f"the CAFE stage {cafe.path}")
    layer = cafe.layer
    box = _parse_box(box)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        x = image[:1].to(adapter.device)
        in_box = box
    else:
        pil = to_pil(image) if not isinstance(image, (str, Path)) else to_pil(Path(image))
        x = adapter.preprocess(pil)
        in_box = box_to_input(adapter, box, pil.size) if box is not None else None
    pfv, lat, grid = encode_images(sae, adapter, layer, x)
    pfv, lat = pfv[0].cpu(), lat[0].cpu()
    N = pfv.shape[0]
    inside = None
    sel = torch.arange(N)
    if in_box is not None:
        rel = torch.eye(N).reshape(1, N, *grid)
        maps = compute_ierfs(ierf_fn or default_ierf_fn(), adapter, x, layer, rel, seeds_per_pass)[0]
        pos = maps.clamp(min=0)
        mask = box_mask(in_box, tuple(x.shape[-2:]))
        share = (pos * mask).flatten(1).sum(1) / pos.flatten(1).sum(1).clamp(min=1e-30)
        sel = (share >= min_inside).nonzero().flatten()
        inside = share[sel]
    w = grid[1]
    res = QueryResult(torch.stack([sel // w, sel % w], 1), inside)
    if sel.numel() == 0:
        return res
    # the image's own latents: max activation over the selected PFVs
    a = lat[sel]
    best, arg = a.max(0)
    for s in torch.argsort(best, descending=True)[:k_latents].tolist():
        if best[s] <= 0:
            break
        p = int(sel[arg[s]])
        res.own_latents.append({"latent": s, "activation": float(best[s]), "position": [p // w, p % w]})
    # nearest exemplars → latents (score = best cosine similarity)
    sims, ids = cafe.exemplar_index.search(pfv[sel], n_neighbours)
    ex_lat = cafe.exemplars["ex_latent"]
    score: dict[int, float] = {}
    hits: dict[int, list[tuple[float, int]]] = {}
    for row_s, row_i in zip(sims.tolist(), ids.tolist()):
        for sv, e in zip(row_s, row_i):
            if e < 0:
                continue
            s = int(ex_lat[e])
            score[s] = max(score.get(s, -2.0), sv)
            hits.setdefault(s, []).append((sv, e))
    for s in sorted(score, key=lambda t: (-score[t], t))[:k_latents]:
        best_hits = sorted(set(hits[s]), key=lambda t: (-t[0], t[1]))[:k_exemplars]
        res.matches.append({"latent": s, "score": score[s], "hits": len(hits[s]),
                            "matched_exemplars": [dict(cafe.record(e).to_json(), similarity=sv)
                                                  for sv, e in best_hits],
                            "exemplars": [cafe.record(e).to_json() for e in cafe.exemplar_ids(s)[:k_exemplars]]})
    # nearest decoder directions to the mean selected PFV
    d_s, d_i = cafe.nearest_latents(pfv[sel].mean(0, keepdim=True), k_latents)
    res.nearest_directions = [{"latent": int(i), "similarity": float(v)} for v, i in zip(d_s[0], d_i[0]) if i >= 0]
    return res
