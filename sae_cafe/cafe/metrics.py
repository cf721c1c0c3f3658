"""CAFE metrics (issue 7; protocol fixed before results were looked at).

(a) label faithfulness — per exemplar, region A = the smallest pixel set holding 50 % of the positive iERF
    mass, region B = the same number of pixels with the highest upsampled activation of the same latent; each
    is filled with the dataset mean colour, the model re-run, and the latent's activation read at the same
    PFV. Reported: paired mean of (drop_A − drop_B) ± s.e. and a two-sided sign test.
(b) concentration — share of the positive mass in the top 10 % of pixels, iERF vs activation map.
(c) attribute purity (concept world, held-out images) — share of a latent's exemplar positive mass on pixels
    carrying its dominant ground-truth attribute value, iERF vs activation map. To avoid selecting and
    scoring on the same maps, the dominant value is picked on even-rank exemplars and the share measured on
    odd-rank ones; each map type picks its own dominant value.
"""

from __future__ import annotations

import math

import torch

from ..saes import encode_images
from .anchor import unpack_maps, upsample_map


def top_mass_share(maps_EHW: torch.Tensor, frac: float = 0.1) -> torch.Tensor:
    """(E,) share of each map's positive mass held by its top ``frac`` of pixels (NaN if no mass)."""
    m = maps_EHW.float().clamp(min=0).flatten(1)
    n = max(1, int(round(frac * m.shape[1])))
    top = m.topk(n, dim=1).values.sum(1)
    tot = m.sum(1)
    return torch.where(tot > 0, top / tot.clamp(min=1e-30), torch.full_like(tot, float("nan")))


def concentration(ierf16: torch.Tensor, scale: torch.Tensor, act_map: torch.Tensor, size: tuple[int, int],
                  chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(b): top-10 % mass share per exemplar for the iERF and for the upsampled activation map, (E,) each."""
    ci, ca = [], []
    for s in range(0, ierf16.shape[0], chunk):
        ci.append(top_mass_share(unpack_maps(ierf16[s:s + chunk], scale[s:s + chunk])))
        ca.append(top_mass_share(upsample_map(act_map[s:s + chunk], size)))
    return torch.cat(ci), torch.cat(ca)


def mass_region(maps_EHW: torch.Tensor, share: float = 0.5) -> torch.Tensor:
    """(E, H, W) bool: the smallest pixel set holding ``share`` of each map's positive mass."""
    m = maps_EHW.float().clamp(min=0).flatten(1)
    v, o = m.sort(1, descending=True)
    cum = v.cumsum(1)
    need = share * cum[:, -1:]
    n = ((cum < need).sum(1) + 1).clamp(max=m.shape[1])  # pixels until the share is reached
    keep = torch.arange(m.shape[1])[None, :] < n[:, None]
    keep &= v > 0
    out = torch.zeros_like(keep)
    out.scatter_(1, o, keep)
    return out.reshape(maps_EHW.shape)


def top_n_region(maps_EHW: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(E, H, W) bool: the ``n[e]`` highest pixels of each map (ties by pixel order)."""
    m = maps_EHW.float().flatten(1)
    o = torch.argsort(m, dim=1, descending=True, stable=True)
    keep = torch.arange(m.shape[1])[None, :] < n[:, None]
    out = torch.zeros_like(keep)
    out.scatter_(1, o, keep)
    return out.reshape(maps_EHW.shape)


def sign_test(diff: torch.Tensor) -> dict:
    """Two-sided exact binomial sign test on paired differences (zeros dropped)."""
    pos, neg = int((diff > 0).sum()), int((diff < 0).sum())
    n = pos + neg
    if n == 0:
        return {"n_pos": 0, "n_neg": 0, "p": 1.0}
    k = min(pos, neg)
    # log-space binomial tail: P(X <= k) for X ~ Bin(n, 1/2)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    mx = max(logs)
    tail = math.exp(mx) * sum(math.exp(x - mx) for x in logs)
    return {"n_pos": pos, "n_neg": neg, "p": min(1.0, 2 * tail)}


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x[torch.isfinite(x)].double()
    if x.numel() == 0:
        return float("nan"), float("nan")
    se = float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return float(x.mean()), se


@torch.no_grad()
def label_faithfulness(cafe, model, sae, images, ids: list[int] | None = None, batch: int = 32) -> dict:
    """(a) for exemplar rows ``ids`` (default all) of a built CAFE; ``images`` = the build's image source."""
    from ..models import get_adapter
    from .source import ImageSource

    adapter, source = get_adapter(model), ImageSource(images)
    ex = cafe.exemplars
    ids = list(range(cafe.n_exemplars)) if ids is None else list(ids)
    colour = torch.tensor(cafe.manifest["mean_colour"]).view(1, 3, 1, 1)
    a0s, das, dbs, npx = [], [], [], []
    for s in range(0, len(ids), batch):
        b = ids[s:s + batch]
        x = source.batch(ex["ex_image"][b].tolist(), adapter).cpu()
        ra = mass_region(cafe.ierf(b), 0.5)
        n = ra.flatten(1).sum(1)
        rb = top_n_region(cafe.act_map(b), n)
        xa = torch.where(ra[:, None], colour, x)
        xb = torch.where(rb[:, None], colour, x)
        lat, pos = ex["ex_latent"][b], ex["ex_pos"][b]
        out = []
        for xx in (x, xa, xb):
            _, acts, _ = encode_images(sae, adapter, cafe.layer, xx.to(adapter.device))
            out.append(acts.cpu()[torch.arange(len(b)), pos, lat])
        a0s.append(out[0])
        das.append(out[0] - out[1])
        dbs.append(out[0] - out[2])
        npx.append(n.float())
    a0, da, db = torch.cat(a0s), torch.cat(das), torch.cat(dbs)
    diff = da - db
    rel = diff / a0.clamp(min=1e-6)
    m, se = mean_se(diff)
    mr, ser = mean_se(rel)
    return {"n": len(ids), "drop_ierf": mean_se(da), "drop_act": mean_se(db), "diff_mean": m, "diff_se": se,
            "rel_diff_mean": mr, "rel_diff_se": ser, "sign_test": sign_test(diff),
            "region_pixels_mean": float(torch.cat(npx).mean())}


def concentration_summary(cafe) -> dict:
    """(b) over all exemplars of a built CAFE: mean ± s.e. for iERF and activation map, paired sign test."""
    a = cafe.anchors
    ci, ca = concentration(a["ierf16"], a["ierf_scale"], a["act_map"], cafe.input_size)
    ok = torch.isfinite(ci) & torch.isfinite(ca)
    return {"n": int(ok.sum()), "ierf": mean_se(ci[ok]), "act": mean_se(ca[ok]),
            "diff": mean_se(ci[ok] - ca[ok]), "sign_test": sign_test(ci[ok] - ca[ok])}


def _attr_masks(attributes: dict[str, object], image: int) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """All (attribute, value) pairs of one image and their pixel masks (V, H, W)."""
    keys, masks = [], []
    for name, maps in attributes.items():
        m = torch.as_tensor(maps[image]).long()
        for v in torch.unique(m).tolist():
            if v >= 0:
                keys.append((name, int(v)))
                masks.append(m == v)
    return keys, torch.stack(masks) if masks else torch.zeros(0, 1, 1, dtype=torch.bool)


def attribute_mass(maps_EHW: torch.Tensor, images: torch.Tensor, attributes: dict[str, object]
                   ) -> list[dict[tuple[str, int], float]]:
    """Per exemplar: share of its positive mass on each (attribute, value) present in its image."""
    out = []
    for e in range(maps_EHW.shape[0]):
        keys, masks = _attr_masks(attributes, int(images[e]))
        m = maps_EHW[e].float().clamp(min=0)
        if masks.shape[-2:] != m.shape:
            m = torch.nn.functional.interpolate(m[None, None], size=masks.shape[-2:], mode="bilinear",
                                                align_corners=False)[0, 0].clamp(min=0)
        tot = float(m.sum())
        out.append({k: float((m * masks[j]).sum()) / tot for j, k in enumerate(keys)} if tot > 0 else {})
    return out


def purity_table(anchors: dict[str, torch.Tensor], ex: dict[str, torch.Tensor], attributes: dict[str, object],
                 n_latents: int, size: tuple[int, int], shares_out: dict | None = None) -> dict[str, torch.Tensor]:
    """(c) per latent: ``purity_ierf``, ``purity_act`` (S,) (NaN where a latent has < 2 exemplars), and the
    (attribute, value) each purity names: ``purity_<kind>_attr`` (S,) int64, the position of the dominant
    attribute in ``list(attributes)`` (the build records that list as ``purity_attributes`` in the manifest),
    and ``purity_<kind>_value`` (S,) int64, its value id; -1 where the purity is NaN. ``shares_out``, when
    given, receives the per-exemplar shares ``{kind: [attribute_mass rows]}`` (reused by the concept labels)."""
    names = list(attributes)
    E = ex["ex_latent"].shape[0]
    res = {}
    for kind in ("ierf", "act"):
        shares = []
        for s in range(0, E, 256):
            sl = slice(s, min(E, s + 256))
            maps = (unpack_maps(anchors["ierf16"][sl], anchors["ierf_scale"][sl]) if kind == "ierf"
                    else upsample_map(anchors["act_map"][sl], size))
            shares += attribute_mass(maps, ex["ex_image"][sl], attributes)
        if shares_out is not None:
            shares_out[kind] = shares
        pur = torch.full((n_latents,), float("nan"))
        attr = torch.full((n_latents,), -1, dtype=torch.int64)
        value = torch.full((n_latents,), -1, dtype=torch.int64)
        lat, rank = ex["ex_latent"], ex["ex_rank"]
        for s_ in torch.unique(lat).tolist():
            rows = (lat == s_).nonzero().flatten().tolist()
            pick = [r for r in rows if rank[r] % 2 == 0 and shares[r]]
            score = [r for r in rows if rank[r] % 2 == 1 and shares[r]]
            if not pick or not score:
                continue
            tot: dict[tuple[str, int], float] = {}
            for r in pick:
                for k, v in shares[r].items():
                    tot[k] = tot.get(k, 0.0) + v
            best = max(sorted(tot), key=lambda k: tot[k])
            pur[s_] = sum(shares[r].get(best, 0.0) for r in score) / len(score)
            attr[s_], value[s_] = names.index(best[0]), best[1]
        res[f"purity_{kind}"] = pur
        res[f"purity_{kind}_attr"] = attr
        res[f"purity_{kind}_value"] = value
    return res


#: attribute order assumed for stages built before ``purity_attributes`` was recorded (the concept world's
#: ``World.attribute_maps()`` order)
WORLD_ATTRIBUTES = ("shape", "colour", "pattern", "background")


def purity_attributes(cafe, kind: str = "ierf") -> dict[int, dict]:
    """Per latent with a purity value: ``{latent: {"attribute": name, "value": id, "purity": p}}`` — the
    dominant ground-truth (attribute, value) that the latent's ``kind`` ("ierf", CAFE's purity, or "act")
    purity is measured on. Empty for stages built without attributes or before the attribute was stored."""
    t = cafe.latents
    if f"purity_{kind}_attr" not in t:
        return {}
    names = cafe.manifest.get("purity_attributes") or list(WORLD_ATTRIBUTES)
    pur, attr, val = t[f"purity_{kind}"], t[f"purity_{kind}_attr"], t[f"purity_{kind}_value"]
    return {s: {"attribute": names[int(attr[s])], "value": int(val[s]), "purity": float(pur[s])}
            for s in (attr >= 0).nonzero().flatten().tolist()}


def purity_summary(cafe) -> dict:
    """(c) summary over latents with a purity value (both map types): mean ± s.e., paired sign test."""
    t = cafe.latents
    if "purity_ierf" not in t:
        return {"n": 0, "note": "built without ground-truth attributes"}
    pi, pa = t["purity_ierf"], t["purity_act"]
    ok = torch.isfinite(pi) & torch.isfinite(pa)
    return {"n": int(ok.sum()), "ierf": mean_se(pi[ok]), "act": mean_se(pa[ok]), "diff": mean_se(pi[ok] - pa[ok]),
            "sign_test": sign_test(pi[ok] - pa[ok])}
