"""Open-vocabulary labeller interface: plug a model of your own in to name latents.

A **labeller** is any callable ``labeller(crops, direction) -> str``:

* ``crops``: list of (h, w, 3) uint8 arrays, the latent's top exemplars with everything outside the
  smallest pixel set holding ``share`` (default 50 %) of the positive iERF mass greyed out, cropped to that
  set's bounding box (:func:`masked_crops`) — only the pixels the evidence says the latent reads;
* ``direction``: (D,) float32, the latent's SAE decoder direction (a row of ``W_dec``).

:func:`label_with` collects both from a CAFE stage and checks the answer is text. One built-in labeller,
:class:`ClipVocabularyLabeller`, ranks a user-given vocabulary by the cosine between the decoder direction
mapped into the image-embedding space and a local open_clip text tower's embeddings of the words. It is an
*interface example*: its names are only meaningful when the SAE sits on the open_clip image tower's last
block (the map below is then the tower's own read-out, linearised) and the weights are trained; no accuracy
is claimed for it (the label-accuracy benchmark measures the evidence-map labels of :mod:`.label`).

Direction map (``openclip_direction_map``): open_clip's image embedding is ``LN_post(x_cls) @ proj``. A
direction d in the last block's residual stream moves the embedding by ≈ ``(γ ⊙ (d − mean(d))) / σ @ proj``;
dropping the input-dependent 1/σ (cosines ignore scale) leaves the linear map ``M = proj^T diag(γ) (I − 11^T/D)``
(E, D). Hand-written; open_clip provides the towers and the tokenizer, nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import MismatchError, SaeCafeError


@runtime_checkable
class Labeller(Protocol):
    """``labeller(crops, direction) -> str`` (see the module docstring)."""

    def __call__(self, crops: list[np.ndarray], direction: torch.Tensor) -> str: ...


def masked_crops(cafe, latent: int, model, images=None, share: float = 0.5, n: int = 8,
                 pad: int = 2, fill: int = 128) -> list[np.ndarray]:
    """The latent's top-``n`` exemplars as (h, w, 3) uint8 crops of the iERF region holding ``share`` of the
    positive mass (pixels outside it set to ``fill``), ``pad`` pixels around its bounding box. The pixels are
    the model's input (``model``'s resize / crop, denormalised), so they line up with the iERFs. ``images``:
    the build's image source (default: the folder recorded in the stage)."""
    from ..cafe.cards import _images
    from ..cafe.metrics import mass_region
    from ..models import get_adapter

    if not 0 < share <= 1:
        raise SaeCafeError(f"share must be in (0, 1], got {share}")
    ids = cafe.exemplar_ids(int(latent))[:n]
    if not ids:
        return []
    src = _images(cafe, images)
    if src is None:
        raise SaeCafeError(f"the images of the CAFE stage {cafe.path} are not readable (recorded source "
                           f"{cafe.images.get('source')!r}); pass images=")
    adapter = get_adapter(model)
    region = mass_region(cafe.ierf(ids), share).numpy()  # (e, H, W)
    x = adapter.denormalize(src.batch([cafe.record(e).image for e in ids], adapter)).clamp(0, 1)
    if tuple(x.shape[-2:]) != tuple(region.shape[-2:]):
        raise SaeCafeError(f"the model's input size {tuple(x.shape[-2:])} differs from the CAFE stage's "
                           f"{tuple(region.shape[-2:])}; pass the model the stage was built with")
    pix = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    out = []
    for j in range(len(ids)):
        img = pix[j].copy()
        keep = region[j]
        img[~keep] = fill
        if keep.any():
            rows, cols = np.nonzero(keep.any(1))[0], np.nonzero(keep.any(0))[0]
            img = img[max(0, rows[0] - pad):rows[-1] + 1 + pad, max(0, cols[0] - pad):cols[-1] + 1 + pad]
        out.append(img)
    return out


def label_with(labeller: Callable[[list[np.ndarray], torch.Tensor], str], cafe, latent: int, model,
               images=None, share: float = 0.5, n: int = 8) -> str:
    """Ask ``labeller`` to name ``latent`` of a CAFE stage from its masked crops (:func:`masked_crops`, with the
    stage's ``model``) and decoder direction."""
    crops = masked_crops(cafe, latent, model, images, share, n)
    direction = cafe.decoder["W_dec"][int(latent)].float().clone()
    text = labeller(crops, direction)
    if not isinstance(text, str):
        raise SaeCafeError(f"the labeller {labeller!r} returned {type(text).__name__}, a labeller returns text (str)")
    return text


def openclip_direction_map(visual) -> torch.Tensor:
    """(E, D) linear map from the residual stream of an open_clip ``VisionTransformer``'s last block to its
    image-embedding space: ``proj^T diag(γ_ln_post) (I − 11^T/D)`` (module docstring)."""
    proj = getattr(visual, "proj", None)
    ln = getattr(visual, "ln_post", None)
    if proj is None or ln is None or not isinstance(proj, torch.Tensor):
        raise MismatchError(f"{type(visual).__name__} is not an open_clip VisionTransformer with ln_post and proj; "
                            "pass to_embedding= (an (E, D) matrix) yourself")
    D = proj.shape[0]
    gamma = ln.weight.detach().float() if getattr(ln, "weight", None) is not None else torch.ones(D)
    centre = torch.eye(D) - torch.full((D, D), 1.0 / D)
    return proj.detach().float().T @ (gamma[:, None] * centre)


@dataclass(frozen=True)
class ClipVocabularyLabeller:
    """Names a latent with the vocabulary word whose text embedding is closest (cosine) to the latent's decoder
    direction mapped into the image-embedding space (``to_embedding`` (E, D)); ``text_embeddings`` (V, E)
    unit rows in ``vocabulary`` order."""

    vocabulary: tuple[str, ...]
    text_embeddings: torch.Tensor
    to_embedding: torch.Tensor

    @classmethod
    def from_open_clip(cls, model, tokenizer, vocabulary: Sequence[str], template: str = "a photo of {}.",
                       to_embedding: torch.Tensor | None = None) -> ClipVocabularyLabeller:
        """From a local open_clip model (``open_clip.create_model(name, pretrained=<local file>)``) and its
        tokenizer; ``template`` turns a word into the prompt."""
        vocab = tuple(str(v) for v in vocabulary)
        if not vocab:
            raise SaeCafeError("the vocabulary is empty; pass the words to rank")
        with torch.no_grad():
            t = model.encode_text(tokenizer([template.format(v) for v in vocab])).float()
        M = openclip_direction_map(model.visual) if to_embedding is None else torch.as_tensor(to_embedding).float()
        if M.shape[0] != t.shape[1]:
            raise MismatchError(f"to_embedding maps into {M.shape[0]} dims, the text embeddings have {t.shape[1]}")
        return cls(vocab, torch.nn.functional.normalize(t, dim=1), M)

    def rank(self, direction: torch.Tensor) -> list[tuple[str, float]]:
        """[(word, cosine)] best first for a decoder direction (D,)."""
        d = torch.as_tensor(direction).float().flatten()
        if d.shape[0] != self.to_embedding.shape[1]:
            raise MismatchError(f"the decoder direction has {d.shape[0]} dims, the map into the image-embedding "
                                f"space expects {self.to_embedding.shape[1]} (the SAE must sit on the image "
                                "tower's last block, or pass to_embedding=)")
        e = torch.nn.functional.normalize(self.to_embedding @ d, dim=0)
        cos = self.text_embeddings @ e
        order = torch.argsort(cos, descending=True, stable=True).tolist()
        return [(self.vocabulary[i], float(cos[i])) for i in order]

    def __call__(self, crops: list[np.ndarray], direction: torch.Tensor) -> str:
        return self.rank(direction)[0][0]


__all__ = ["ClipVocabularyLabeller", "Labeller", "label_with", "masked_crops", "openclip_direction_map"]
