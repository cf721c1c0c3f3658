"""Evaluation of an SAE as reloaded from disk: explained variance, L0, dead and dense latents, firing-frequency
histogram (PNG), and the model's accuracy / logit KL with the SAE reconstruction spliced into the layer.

Written by hand: sae-lens's evals run language models on token datasets.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_cafe.activations import ShardReader
from sae_cafe.artifacts import atomic_write_json
from sae_cafe.errors import SaeCafeError
from sae_cafe.image_source import ImageSource
from sae_cafe.labels import Labels, labels_for_source
from sae_cafe.models import get_adapter
from sae_cafe.saes import check_sae_fits, load_sae, reconstruct_layer, sae_tokens, token_rows

DEAD_MIN_PFVS = 100_000


class _PFVStats:
    """Running explained variance / L0 / firing counts over PFV batches (float64 sums)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = torch.zeros((), dtype=torch.float64)
        self.sse = torch.zeros((), dtype=torch.float64)
        self.l0 = torch.zeros((), dtype=torch.float64)
        self.fires = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def add(self, sae: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.to(sae.dtype).to(sae.device)
        z = sae.encode(x)
        xh = sae.decode(z)
        xd = x.double().cpu()
        self.n += x.shape[0]
        self.sum_x += xd.sum(0)
        self.sum_x2 += xd.pow(2).sum()
        self.sse += (xh.double().cpu() - xd).pow(2).sum()
        active = (z != 0).cpu()
        self.l0 += active.sum()
        self.fires += active.sum(0).double()
        return xh

    def result(self, dense_threshold: float, total_available: int | None) -> dict[str, Any]:
        if self.n == 0:
            raise SaeCafeError("no PFVs to evaluate on")
        total_var = self.sum_x2 - self.sum_x.pow(2).sum() / self.n
        freq = self.fires / self.n
        reliable = self.n >= DEAD_MIN_PFVS or (total_available is not None and self.n >= total_available)
        dead = int((self.fires == 0).sum())
        return {
            "n_pfvs": self.n,
            "explained_variance": float(1 - self.sse / total_var),
            "mse_per_pfv": float(self.sse / self.n),
            "l0": float(self.l0 / self.n),
            "dead_latents": dead, "dead_fraction": dead / freq.numel(),
            "dead_count_reliable": bool(reliable),
            "dense_latents": int((freq > dense_threshold).sum()), "dense_threshold": dense_threshold,
            "d_sae": int(freq.numel()),
            "_freq": freq,
        }


def firing_histogram_png(freq: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing frequency per latent (dead latents in a separate bar) → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = freq.double()
    alive = f[f > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if alive.numel():
        ax.hist(torch.log10(alive).numpy(), bins=50, color="#3b7dd8")
    n_dead = int((f == 0).sum())
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}  (dead: {n_dead} of {f.numel()})".strip())
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _eval_labels(images: Any, adapter: Any, labels: Any, class_names: Any = None
                 ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Labels for the accuracy metrics, by :mod:`sae_cafe.labels`: ``labels`` is a mode (``"class_names"``,
    ``"folder"``, ``"predicted"``), a :class:`~sae_cafe.labels.Labels`, (N,) class ids, or None (an
    ImageFolder source under the ``"folder"`` policy; no accuracy for other sources). Returns the ids (None:
    no accuracy) and the recorded decision. ``class_names``: a class-names file (or list) for the policy."""
    if labels is None:
        src = ImageSource(images)
        if src.total is None or any(src.label(i) is None for i in range(len(src))):
            return None, {"kind": "none", "note": "the images carry no labels; accuracy is not measured"}
        labels = "folder"
    if isinstance(labels, str):
        labels = labels_for_source(images, labels, adapter, class_names=class_names)
    if isinstance(labels, Labels):
        if not labels.decision.model_classes:
            return None, labels.decision.to_json()
        return torch.tensor(labels.ids).long(), labels.decision.to_json()
    return torch.as_tensor(labels).long(), {"kind": "given", "model_classes": True,
                                            "note": "labels given by the caller as the model's class ids"}


@torch.no_grad()
def evaluate_sae(sae_dir: str | Path, acts: str | Path | ShardReader | None = None,
                 image_range: tuple[int, int] | None = None, model: Any = None, images: Any = None,
                 labels: Any = None, max_pfvs: int = 1_000_000, batch_size: int = 64,
                 dense_threshold: float = 0.1, out_dir: str | Path | None = None, progress: bool = True,
                 class_names: str | Path | list[str] | None = None) -> dict[str, Any]:
    """Evaluate the SAE at ``sae_dir`` as loaded by ``sae_lens.SAE.load_from_disk``.

    PFV metrics come from held-out images: the ``image_range`` of the ``acts`` stage, or (preferred when
    given) the PFVs of ``images`` through ``model``. With ``model`` and ``images`` the model's accuracy
    (``labels``, or ImageFolder class folders), top-1 agreement and mean KL(clean ‖ spliced) of the
    logits with the SAE spliced in are also measured. ``labels`` follow :mod:`sae_cafe.labels`: a mode
    (``"class_names"``, ``"folder"``, ``"predicted"``), :class:`~sae_cafe.labels.Labels`, class ids, or None
    (ImageFolder folders under the ``"folder"`` policy); ``class_names`` is an optional class-names file. The
    label decision is recorded under ``"labels"`` (its sentence under ``"labels_note"``); labels that are not
    the model's class ids give no accuracy. Writes ``eval/metrics.json`` and ``eval/firing_frequency.png``
    under ``out_dir`` (default ``sae_dir``).
    """
    sae_dir = Path(sae_dir)
    out = Path(out_dir) if out_dir is not None else sae_dir / "eval"
    if model is not None and images is not None:
        res = _eval_on_images(sae_dir, model, images, labels, max_pfvs, batch_size, dense_threshold, progress,
                              class_names)
    elif acts is not None:
        res = _eval_on_acts(sae_dir, acts, image_range, max_pfvs, dense_threshold)
    else:
        raise SaeCafeError("evaluate_sae needs held-out PFVs: acts (+ image_range) or model and images")
    freq = res.pop("_freq")
    res["histogram_png"] = str(firing_histogram_png(freq, out / "firing_frequency.png",
                                                    title=f"{res.get('layer', '')}"))
    atomic_write_json(out / "metrics.json", res)
    from safetensors.torch import save_file

    save_file({"firing_frequency": freq.float().contiguous()}, str(out / "firing_frequency.safetensors"))
    return res


def _eval_on_acts(sae_dir: Path, acts: Any, image_range: tuple[int, int] | None, max_pfvs: int,
                  dense_threshold: float) -> dict[str, Any]:
    reader = acts if isinstance(acts, ShardReader) else ShardReader(acts)
    sae = load_sae(sae_dir)
    check_sae_fits(sae, reader.d_in, reader.layer, reader.model, f"the PFVs at {reader.directory}",
                   reader.weights_hash, source=f"SAE at {sae_dir}")
    stats = _PFVStats(sae.cfg.d_in, sae.cfg.d_sae)
    total = 0
    info = sae.cfg.metadata.get("sae_cafe") or {}  # the token kinds / outlier rows the SAE was trained on
    for acts_b, img, _pos in reader.iter_batches(8192, dtype=torch.float32, with_provenance=True,
                                                 tokens=sae_tokens(sae),
                                                 exclude_outliers=info.get("outliers") == "exclude"):
        if image_range is not None:
            m = (img >= image_range[0]) & (img < image_range[1])
            if not m.any():
                continue
            acts_b = acts_b[m]
        total += acts_b.shape[0]
        if stats.n < max_pfvs:
            stats.add(sae, acts_b[: max_pfvs - stats.n])
    res = stats.result(dense_threshold, total)
    res.update({"source": "acts", "acts_dir": str(reader.directory), "image_range": list(image_range or ()),
                "layer": reader.layer, "model": reader.model})
    return res


def _eval_on_images(sae_dir: Path, model: Any, images: Any, labels: Any, max_pfvs: int, batch_size: int,
                    dense_threshold: float, progress: bool, class_names: Any = None) -> dict[str, Any]:
    adapter = get_adapter(model)
    sae = load_sae(sae_dir, adapter)  # checks d_in / layer / model against the adapter
    layer = adapter.resolve_layer(sae.cfg.metadata.hook_name)
    labels_t, label_decision = _eval_labels(images, adapter, labels, class_names)
    stats = _PFVStats(sae.cfg.d_in, sae.cfg.d_sae)
    n_img = correct = correct_sp = agree = 0
    kl_sum = 0.0
    src = ImageSource(images)
    bar = tqdm(total=src.total, desc="evaluate SAE", unit="img", disable=not progress)
    for ids, x, _next in src.batches(adapter, batch_size):
        got: dict[str, torch.Tensor] = {}

        def keep(_m, _i, o, got=got):
            got["act"] = o

        with adapter.hooks({layer: keep}):
            logits = adapter.model(x)
        act = got["act"]
        batch = adapter.to_pfv(act)
        if stats.n < max_pfvs:
            flat = token_rows(sae, adapter, batch)  # the token kinds the SAE was trained on
            stats.add(sae, flat[: max_pfvs - stats.n])
        rec = reconstruct_layer(sae, adapter, act)
        logits_sp = adapter.forward_from(layer, rec, x)
        p = F.log_softmax(logits.double(), -1)
        q = F.log_softmax(logits_sp.double(), -1)
        kl_sum += float((p.exp() * (p - q)).sum(-1).sum())
        pred, pred_sp = logits.argmax(-1).cpu(), logits_sp.argmax(-1).cpu()
        agree += int((pred == pred_sp).sum())
        if labels_t is not None:
            y = labels_t[n_img:n_img + len(ids)]
            correct += int((pred == y).sum())
            correct_sp += int((pred_sp == y).sum())
        n_img += len(ids)
        bar.update(len(ids))
    bar.close()
    res = stats.result(dense_threshold, None if stats.n >= max_pfvs else stats.n)
    res.update({"source": "images", "n_images": n_img, "layer": layer, "model": adapter.name,
                "top1_agreement": agree / max(n_img, 1), "logit_kl": kl_sum / max(n_img, 1),
                "labels": label_decision, "labels_note": label_decision["note"]})
    if labels_t is not None:
        res.update({"accuracy": correct / n_img, "spliced_accuracy": correct_sp / n_img,
                    "accuracy_drop": (correct - correct_sp) / n_img})
    if math.isnan(res["explained_variance"]):
        raise SaeCafeError(f"explained variance is NaN for {sae_dir}; the SAE or the activations are broken")
    return res
