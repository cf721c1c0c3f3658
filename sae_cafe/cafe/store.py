"""A finished CAFE stage, loaded: exemplar records, iERFs, activation maps, FAISS indexes, latent table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..artifacts import read_manifest
from ..errors import SaeCafeError
from .anchor import unpack_maps, upsample_map
from .index import VectorIndex, read_index


@dataclass
class ExemplarRecord:
    """One exemplar: row ``id`` of the stage tables; (row, col) on the layer grid."""

    id: int
    latent: int
    rank: int
    image: int
    image_name: str
    row: int
    col: int
    activation: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Cafe:
    """Read access to a CAFE stage directory (tensors are loaded on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "cafe")
        self.layer: str = self.manifest["layer"]
        self.grid: tuple[int, int] = tuple(self.manifest["grid"])
        self.input_size: tuple[int, int] = tuple(self.manifest["input_size"])

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.path / name
        if not p.exists():
            raise SaeCafeError(f"{p} is missing; the CAFE stage at {self.path} is incomplete, rebuild it")
        return load_file(str(p))

    @cached_property
    def exemplars(self) -> dict[str, torch.Tensor]:
        return self._load("exemplars.safetensors")

    @cached_property
    def anchors(self) -> dict[str, torch.Tensor]:
        return self._load("anchors.safetensors")

    @cached_property
    def latents(self) -> dict[str, torch.Tensor]:
        return self._load("latents.safetensors")

    @cached_property
    def latent_rows(self) -> list[dict]:
        return json.loads((self.path / "latents.json").read_text())

    @cached_property
    def images(self) -> dict:
        return json.loads((self.path / "images.json").read_text())

    @cached_property
    def concept_labels(self) -> dict:
        """``{latent: sae_cafe.concepts.ConceptLabel}`` from ``labels.json`` (primary evidence: iERF); {} for a
        stage built without ground-truth attribute maps (see :mod:`sae_cafe.concepts`)."""
        from ..concepts.label import read_labels

        return read_labels(self.path)

    @cached_property
    def class_push(self) -> torch.Tensor | None:
        p = self.path / "class_push.safetensors"
        return self._load(p.name)["class_push"] if p.exists() else None

    @cached_property
    def exemplar_index(self) -> VectorIndex:
        m = self.manifest["indexes"]["exemplars"]
        return read_index(self.path / "exemplars.faiss", m["spec"], m["params"])

    @cached_property
    def decoder_index(self) -> VectorIndex:
        m = self.manifest["indexes"]["decoder"]
        return read_index(self.path / "decoder.faiss", m["spec"], m["params"])

    @cached_property
    def decoder(self) -> dict[str, torch.Tensor]:
        return self._load("decoder.safetensors")

    def nearest_latents(self, pfv_ND: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents whose decoder directions are nearest (cosine) to ``pfv - b_dec``: similarities, ids (N, k)."""
        q = pfv_ND.float().cpu() - self.decoder["b_dec"]
        sims, ids = self.decoder_index.search(q, k)
        return torch.from_numpy(sims), torch.from_numpy(ids)

    @property
    def n_latents(self) -> int:
        return int(self.manifest["n_latents"])

    @property
    def n_exemplars(self) -> int:
        return int(self.manifest["n_exemplars"])

    def record(self, e: int) -> ExemplarRecord:
        ex = self.exemplars
        img = int(ex["ex_image"][e])
        return ExemplarRecord(int(e), int(ex["ex_latent"][e]), int(ex["ex_rank"][e]), img,
                              self.images["names"][img], int(ex["ex_row"][e]), int(ex["ex_col"][e]),
                              float(ex["ex_activation"][e]))

    def exemplar_ids(self, latent: int) -> list[int]:
        """Exemplar rows of ``latent`` in rank order."""
        if not 0 <= latent < self.n_latents:
            raise SaeCafeError(f"latent {latent} out of range: this CAFE has {self.n_latents} latents")
        ex = self.exemplars
        ids = (ex["ex_latent"] == latent).nonzero().flatten()
        return ids[torch.argsort(ex["ex_rank"][ids])].tolist()

    @cached_property
    def topk_state(self):
        from .topk import TopKState

        return TopKState.load(self.path / "topk.safetensors")[0]

    def sample(self, latent: int) -> list[dict]:
        """The latent's uniform sample of firing PFVs (lower activation quantiles), by activation desc."""
        st = self.topk_state
        ok = st.s_image[latent] >= 0
        v, i, p = st.s_values[latent][ok], st.s_image[latent][ok], st.s_pos[latent][ok]
        w = self.grid[1]
        return [{"activation": float(v[j]), "image": int(i[j]), "image_name": self.images["names"][int(i[j])],
                 "row": int(p[j]) // w, "col": int(p[j]) % w} for j in torch.argsort(v, descending=True).tolist()]

    def quantile_examples(self, latent: int, quantiles=(0.1, 0.25, 0.5, 0.75)) -> list[dict]:
        """One sampled firing PFV at each activation quantile of the latent (from the uniform sample)."""
        s = self.sample(latent)[::-1]  # ascending
        if not s:
            return []
        return [dict(s[min(len(s) - 1, int(q * len(s)))], quantile=q) for q in quantiles]

    def ierf(self, ids: int | list[int]) -> torch.Tensor:
        """iERF maps (E, H, W) float32 of exemplar rows (signed, each sums to ≈1)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        a = self.anchors
        return unpack_maps(a["ierf16"][ids], a["ierf_scale"][ids])

    def act_map(self, ids: int | list[int], upsample: bool = True) -> torch.Tensor:
        """The latent's activation map on the exemplar image: (E, H, W) upsampled, or (E, h, w)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        m = self.anchors["act_map"][ids].float()
        return upsample_map(m, self.input_size) if upsample else m

    def __repr__(self) -> str:
        spec = self.manifest["indexes"]["exemplars"]["spec"]
        return (f"Cafe({self.manifest['model']}/{self.layer}: {self.n_latents} latents, {self.n_exemplars} "
                f"exemplars, {self.manifest['n_images']} images, index {spec})")


def load_cafe(path: str | Path) -> Cafe:
    """Open a finished CAFE stage directory."""
    return Cafe(path)
