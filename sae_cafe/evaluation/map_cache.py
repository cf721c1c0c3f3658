"""Cache of the expensive inputs of the saliency metrics, so that both definition sets (and any rerun with other
metric settings) are derived from one set of explanations.

Per method and image it holds the map (float32, (H, W)) with the seconds it took; the raw maps of the
stability metric's noisy copies, float16 (each divided by its max |value|, the scale kept in float32, so a
map's relative shape survives float16 whatever its magnitude), (S, H, W); and, per image, the μ-fidelity
logit drops of its subsets, which no method changes. Every entry records the target class it explains and
is ignored when another target is asked for.

On disk (``directory`` given) the layout is ``<directory>/<method>/<image id>.safetensors``,
``<directory>/<method>/<image id>.noisy-<key>.safetensors`` and ``<directory>/_fidelity/<image id>.<key>
.safetensors``, each written through a temporary file and renamed; an unreadable file is a miss (recomputed).
Without a directory the cache lives in memory for the life of the object. The caller keys the directory by
model, weights, input shape and seed (:func:`sae_cafe.evaluation.benchmark.run_saliency_benchmark`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import atomic_write_bytes


class MapCache:
    """Maps, noisy-copy maps and μ-fidelity drops of one benchmark setting (see the module docstring)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._mem: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}

    def _path(self, key: tuple) -> Path:
        group, image_id, suffix = key
        return self.directory / group / f"{image_id}{suffix}.safetensors"

    def _get(self, key: tuple, target: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        if self.directory is None:
            hit = self._mem.get(key)
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(self._path(key)), "pt") as f:
                    hit = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
            except Exception:  # noqa: BLE001 (missing, cut short or garbled: recompute)
                return None
        if hit is None or hit[1].get("target") != str(int(target)):
            return None
        return hit

    def _put(self, key: tuple, target: int, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        meta = {k: str(v) for k, v in (meta or {}).items()} | {"target": str(int(target))}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.directory is None:
            self._mem[key] = tensors, meta
            return
        from safetensors.torch import save

        atomic_write_bytes(self._path(key), save(tensors, metadata=meta))

    # ------------------------------------------------------------------ maps --------------------------------
    def get_map(self, method: str, image_id: str, target: int) -> tuple[torch.Tensor, float] | None:
        """((H, W) float32 map, seconds) or None."""
        hit = self._get((method, image_id, ""), target)
        return None if hit is None else (hit[0]["map"], float(hit[1].get("seconds", "nan")))

    def put_map(self, method: str, image_id: str, target: int, map_HW: torch.Tensor, seconds: float) -> None:
        self._put((method, image_id, ""), target, {"map": map_HW.float()}, {"seconds": seconds})

    # ------------------------------------------------------------------ noisy copies ------------------------
    def get_noisy(self, method: str, image_id: str, target: int, key: str) -> torch.Tensor | None:
        """(S, H, W) float32 maps of the noisy copies (float16 precision relative to each map's max) or None."""
        hit = self._get((method, image_id, f".noisy-{key}"), target)
        if hit is None:
            return None
        maps, scale = hit[0]["maps"], hit[0]["scale"]
        return maps.float() * scale.view(-1, 1, 1)

    def put_noisy(self, method: str, image_id: str, target: int, key: str, maps_SHW: torch.Tensor) -> torch.Tensor:
        """Store (S, H, W) raw maps; returns them as they read back (float16-rounded), so that a first run and a
        resumed one see the same numbers."""
        maps_SHW = maps_SHW.detach().float().cpu()
        scale = maps_SHW.abs().flatten(1).amax(1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        half = (maps_SHW / scale.view(-1, 1, 1)).half()
        self._put((method, image_id, f".noisy-{key}"), target, {"maps": half, "scale": scale})
        return half.float() * scale.view(-1, 1, 1)

    # ------------------------------------------------------------------ μ-fidelity drops --------------------
    def get_deltas(self, image_id: str, target: int, key: str) -> torch.Tensor | None:
        """(R,) float64 logit drops or None."""
        hit = self._get(("_fidelity", image_id, f".{key}"), target)
        return None if hit is None else hit[0]["deltas"]

    def put_deltas(self, image_id: str, target: int, key: str, deltas_R: torch.Tensor) -> None:
        self._put(("_fidelity", image_id, f".{key}"), target, {"deltas": deltas_R.double()})
