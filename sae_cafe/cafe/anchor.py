"""iERF anchoring: the SRD iERF of every exemplar PFV, many seeds per forward pass, stored compactly.

For exemplar ``e = (latent s, image i, position p)`` the default seed is one-hot at ``p`` (the iERF of the
exemplar PFV, spec §3.3); ``seed="actmap"`` seeds with the latent's own activation map on image ``i``
(normalised to sum 1). iERFs are stored as fp16 maps scaled by their max |value| (``scale`` float32 keeps
the true values: ``ierf = ierf16 * scale``), beside the latent's activation map on the layer grid
(upsampled bilinearly on read, :func:`upsample_map`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SaeCafeError
from ..saes import encode_images
from ..srd import srd_ierf_from_relevance

IerfFn = Callable[[object, torch.Tensor, str, torch.Tensor], torch.Tensor]


def default_ierf_fn() -> IerfFn:
    """``sae_cafe.srd.srd_ierf_from_relevance``."""
    return srd_ierf_from_relevance


def encode_layer(adapter, sae, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Alias of :func:`sae_cafe.saes.encode_images` with this module's former argument order
    (``adapter, sae``): PFVs (B, N, D), SAE latents (B, N, S) of ``x`` at ``layer`` and the grid (h, w)."""
    return encode_images(sae, adapter, layer, x)


def upsample_map(maps_NHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of grid maps (N, h, w) to pixels (N, H, W), float32."""
    return F.interpolate(maps_NHW.float()[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


def pack_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, H, W) float → (fp16 maps scaled to max |value| 1, (E,) float32 scale)."""
    scale = maps.flatten(1).abs().amax(1).clamp(min=1e-30).float()
    return (maps / scale[:, None, None]).half(), scale


def unpack_maps(maps16: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return maps16.float() * scale.float()[:, None, None]


def seed_relevance(lat_NS_map: torch.Tensor, pos: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Seeds (S, h, w) for S exemplars of one image.

    Args:
        lat_NS_map: (N, S) activations of each exemplar's latent at all N positions of its image.
        pos: (S,) flat exemplar positions. mode: ``"pfv"`` (one-hot) or ``"actmap"`` (activation map).
    """
    h, w = grid
    S = pos.shape[0]
    if mode == "pfv":
        rel = torch.zeros(S, h * w)
        rel[torch.arange(S), pos] = 1.0
    elif mode == "actmap":
        a = lat_NS_map.T.clamp(min=0)
        rel = a / a.sum(1, keepdim=True).clamp(min=1e-12)
    else:
        raise SaeCafeError(f"unknown iERF seed mode {mode!r}; use 'pfv' (one-hot at the exemplar) or 'actmap'")
    return rel.reshape(S, h, w)


def compute_ierfs(ierf_fn: IerfFn, adapter, x: torch.Tensor, layer: str, rel_NShw: torch.Tensor,
                  seeds_per_pass: int) -> torch.Tensor:
    """iERFs (N, S, H, W) for seeds (N, S, h, w), at most ``seeds_per_pass`` seeds per image per call."""
    outs = []
    for j in range(0, rel_NShw.shape[1], seeds_per_pass):
        r = rel_NShw[:, j:j + seeds_per_pass].to(x.device)
        outs.append(ierf_fn(adapter, x, layer, r).float().cpu())
    return torch.cat(outs, 1)


def anchor_exemplars(adapter, sae, layer: str, source, ex_latent: torch.Tensor, ex_image: torch.Tensor,
                     ex_pos: torch.Tensor, seed: str = "pfv", seeds_per_pass: int = 64, batch_images: int = 8,
                     chunk_images: int = 64, ierf_fn: IerfFn | None = None, work_dir: str | Path | None = None,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Anchor E exemplars (``ex_latent``, ``ex_image``, ``ex_pos`` (E,) long) to their iERFs.

    Images are processed in chunks of ``chunk_images``; each finished chunk is saved in ``work_dir`` (if
    given) and skipped when the call is repeated (resume).

    Returns:
        ``ierf16`` (E, H, W) fp16, ``ierf_scale`` (E,), ``act_map`` (E, h, w) fp16, ``pfv`` (E, D) float32,
        ``activation`` (E,) recomputed latent activation at the exemplar, ``n_ierf`` () iERFs computed and
        ``seconds`` () time spent in the iERF calls (for the iERFs/s benchmark).
    """
    import time

    from safetensors.torch import load_file, save_file

    ierf_fn = ierf_fn or default_ierf_fn()
    E = ex_latent.shape[0]
    images = torch.unique(ex_image).tolist()
    by_image = {i: (ex_image == i).nonzero().flatten() for i in images}
    # images with many seeds first, so one batch pads little
    images.sort(key=lambda i: (-len(by_image[i]), i))
    chunks = [images[c:c + chunk_images] for c in range(0, len(images), chunk_images)]
    parts: list[dict[str, torch.Tensor]] = []
    work = Path(work_dir) if work_dir is not None else None
    n_ierf, seconds = 0, 0.0
    bar = tqdm(total=E, desc=f"iERF anchoring {layer}", disable=not progress, unit="iERF")
    for ci, chunk in enumerate(chunks):
        f = work / f"anchor_{ci:05d}.safetensors" if work is not None else None
        if f is not None and f.exists():
            part = load_file(str(f))
            parts.append(part)
            bar.update(part["index"].numel())
            continue
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("index", "ierf16", "ierf_scale", "act_map",
                                                            "pfv", "activation")}
        for b in range(0, len(chunk), batch_images):
            imgs = chunk[b:b + batch_images]
            x = source.batch(imgs, adapter)
            pfv, lat, grid = encode_images(sae, adapter, layer, x)
            S = max(len(by_image[i]) for i in imgs)
            rel = torch.zeros(len(imgs), S, *grid)
            for j, i in enumerate(imgs):
                idx = by_image[i]
                lat_i = lat[j][:, ex_latent[idx]].cpu()  # (N, s)
                rel[j, :len(idx)] = seed_relevance(lat_i, ex_pos[idx], grid, seed)
            t0 = time.perf_counter()
            maps = compute_ierfs(ierf_fn, adapter, x, layer, rel, seeds_per_pass)
            seconds += time.perf_counter() - t0
            for j, i in enumerate(imgs):
                idx = by_image[i]
                m16, sc = pack_maps(maps[j, :len(idx)])
                lat_j = lat[j].cpu()
                out["index"].append(idx)
                out["ierf16"].append(m16)
                out["ierf_scale"].append(sc)
                out["act_map"].append(lat_j[:, ex_latent[idx]].T.reshape(len(idx), *grid).half())
                out["pfv"].append(pfv[j].cpu()[ex_pos[idx]])
                out["activation"].append(lat_j[ex_pos[idx], ex_latent[idx]])
                n_ierf += len(idx)
                bar.update(len(idx))
        part = {k: torch.cat(v).contiguous() for k, v in out.items()}
        if f is not None:
            tmp = f.with_name(f".{f.name}.part")
            save_file(part, str(tmp))
            tmp.replace(f)
        parts.append(part)
    bar.close()
    idx = torch.cat([p["index"] for p in parts])
    order = torch.empty_like(idx)
    order[idx] = torch.arange(idx.numel())
    res = {k: torch.cat([p[k] for p in parts])[order] for k in ("ierf16", "ierf_scale", "act_map", "pfv",
                                                                "activation")}
    res["n_ierf"] = torch.tensor(n_ierf)
    res["seconds"] = torch.tensor(seconds)
    return res
