"""Activation extraction: run a model over images, collect PFVs at one or more layers in one forward pass,
stream them to sharded safetensors (see :mod:`.shards`) with provenance, resumably.

Written by hand: sae-lens caches language-model activations only; vision PFV layouts, provenance and
resumable sharding are ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..artifacts import (
    MANIFEST,
    atomic_write_bytes,
    clean_partial_files,
    finished_temp_stage,
    hash_json,
    is_finished,
    publish_stage,
    stage_path,
    temp_stage_path,
    write_manifest,
)
from ..errors import ArtifactError, ImageReadError, SaeCafeError, UnsupportedModuleError
from ..image_source import ImageSource
from ..images import SkipReport
from ..model_record import record_for
from ..models import ModelAdapter, get_adapter
from ..srd import srd_relevance
from .shards import CANONICAL_DTYPE, IMAGES_FILE, ShardReader, ShardWriter, parse_dtype, write_progress

PROGRESS = "progress.json"


@dataclass(frozen=True)
class ExtractConfig:
    """What is extracted and how (recorded in every layer's manifest).

    ``positions_per_image``: keep k PFVs per image (None: all); ``sampling``: ``"uniform"`` or ``"logit"``
    (weighted by the position's SRD relevance for the predicted logit; gradient × activation for a model SRD
    has no rules for — the manifest's ``sampling_relevance`` and ``warnings`` say which). ``include_cls``: also
    store ViT class/register tokens (row = -1).
    """

    layers: list[str] = field(default_factory=list)
    dtype: str = "float32"
    shard_size: int = 65536
    batch_size: int = 32
    include_cls: bool = False
    positions_per_image: int | None = None
    sampling: str = "uniform"
    seed: int = 0
    skip_bad: bool = False


# ----- position selection ------------------------------------------------------------------------------------
def _logit_relevance(adapter: ModelAdapter, x: torch.Tensor, layers: list[str]) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Relevance of each PFV position for the predicted logit: ``{layer: (B, N)}``, the activations and the
    method used.

    The method is ``"srd"`` (``sae_cafe.srd.srd_relevance``) or, for a model SRD has no rules for
    (:class:`UnsupportedModuleError`), ``"gradient_x_activation"`` summed over channels; the caller records
    which one in the manifest.
    """
    with torch.no_grad():
        acts = adapter.capture(x, layers)
        target = adapter.model(x).argmax(-1)
    try:
        rel = srd_relevance(adapter, x, target, layers)
        return {n: rel[n].flatten(1).detach().float() for n in layers}, acts, "srd"
    except UnsupportedModuleError as e:
        reason = f"gradient_x_activation (SRD unavailable for {adapter.name}: {e})"
    held: dict[str, torch.Tensor] = {}

    def keep(n: str):
        def hook(_m, _i, out):
            out.retain_grad()
            held[n] = out
        return hook

    with torch.enable_grad(), adapter.hooks({n: keep(n) for n in layers}):
        xg = x.detach().requires_grad_(True)
        logits = adapter.model(xg)
        logits.gather(1, logits.argmax(-1)[:, None]).sum().backward()
    out = {}
    for n in layers:
        a = held[n]
        ga = (a * a.grad).detach()
        if a.ndim == 4:  # (B, C, h, w)
            out[n] = ga.sum(1).flatten(1)
        else:  # tokens (B, T, D): patch tokens only
            out[n] = adapter.to_pfv(ga).pfv.sum(-1)
    adapter.model.zero_grad(set_to_none=True)
    return out, acts, reason


def _select(n_img: int, n_pos: int, k: int | None, seed: int, first_image: int,
            weights: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Per image, the sorted position indices to keep (None: keep all). Deterministic per image index."""
    if k is None or k >= n_pos:
        return None
    out = []
    for i in range(n_img):
        g = torch.Generator().manual_seed(seed * 1_000_003 + first_image + i)
        if weights is None:
            idx = torch.randperm(n_pos, generator=g)[:k]
        else:
            w = weights[i].clamp(min=0).double().cpu()
            w = w + (w.sum() * 1e-6 if w.sum() > 0 else 1.0)  # every position keeps a small chance
            idx = torch.multinomial(w, k, replacement=False, generator=g)
        out.append(idx.sort().values)
    return out


# ----- main entry point -------------------------------------------------------------------------------------
def _layer_dir_name(layer: str) -> str:
    return layer.replace("/", "_")


def extract_activations(model: ModelAdapter | torch.nn.Module, images: Any, layers: str | Sequence[str],
                        run: str = "default", root: str | Path | None = None, dtype: str = "float32",
                        shard_size: int = 65536, batch_size: int = 32, include_cls: bool = False,
                        positions_per_image: int | None = None, sampling: str = "uniform", seed: int = 0,
                        skip_bad: bool = False, overwrite: bool = False, dataset: str | None = None,
                        out_dirs: dict[str, str | Path] | None = None, progress: bool = True,
                        ) -> dict[str, Path]:
    """Extract PFVs of ``layers`` over ``images`` into ``<root>/<run>/acts/<model>/<layer>/``.

    Args:
        model: adapter or ``nn.Module`` as constructed.
        images: folder (flat/ImageFolder), file, list of paths/PIL/arrays, a preprocessed (N,3,H,W) tensor,
            or an iterable of images or of (N,3,H,W) batches.
        layers: one layer id or several (captured in the same forward pass).
        dtype: shard dtype (``float32``, ``float16``, ``bfloat16``).
        shard_size: PFV rows per shard. Memory stays at about one shard plus one batch per layer.
        positions_per_image / sampling: keep k positions per image, ``"uniform"`` or ``"logit"``-weighted.
        overwrite: re-extract a finished stage (otherwise a finished stage with the same config is kept).
        out_dirs: explicit output directory per layer (default: the run layout).

    Returns ``{layer: finished stage directory}``. An interrupted run resumes from its temporary stage
    directory (finished shards are kept; nothing is lost or duplicated).
    """
    adapter = get_adapter(model)
    names = [adapter.resolve_layer(n) for n in ([layers] if isinstance(layers, (str, int)) else layers)]
    names = list(dict.fromkeys(names))
    if not names:
        raise SaeCafeError("no layers given; pass at least one layer id (see the adapter's .layers())")
    if sampling not in ("uniform", "logit"):
        raise SaeCafeError(f"unknown sampling {sampling!r}; use 'uniform' or 'logit'")
    if positions_per_image is not None and positions_per_image < 1:
        raise SaeCafeError(f"positions_per_image must be ≥ 1, got {positions_per_image}")
    cfg = ExtractConfig(names, CANONICAL_DTYPE[parse_dtype(dtype)], int(shard_size), int(batch_size),
                        bool(include_cls), positions_per_image, sampling, int(seed), bool(skip_bad))
    report = SkipReport()
    source = ImageSource(images)
    infos = adapter.layers()
    finals = {n: Path(out_dirs[n]) if out_dirs and n in out_dirs
              else stage_path(run, "acts", adapter.name, _layer_dir_name(n), root=root) for n in names}
    preprocessing = {"input_size": list(adapter.input_size), "mean": list(adapter.mean),
                     "std": list(adapter.std), "resize": adapter.resize}
    dataset_info = {"name": dataset or source.description, "source": source.description,
                    "fingerprint": source.fingerprint()}

    def layer_key(n: str) -> str:
        c = dataclasses.replace(cfg, layers=[n])
        return hash_json({"config": c, "model": adapter.name, "weights_hash": adapter.weights_hash,
                          "dataset": dataset_info, "preprocessing": preprocessing})

    keys = {n: layer_key(n) for n in names}
    todo = []
    for n in names:
        if not overwrite and is_finished(finals[n]):
            if ShardReader(finals[n]).manifest.get("extract_key") == keys[n]:
                continue
            raise ArtifactError(f"{finals[n]} already holds activations extracted with other settings; pass "
                                "overwrite=True (CLI: --overwrite) or choose another --run")
        if finished_temp_stage(finals[n], "extract_key", keys[n]):
            _publish(temp_stage_path(finals[n]), finals[n])  # killed after its manifest, before publishing
            continue
        todo.append(n)
    if not todo:
        return finals

    # --- open or resume each layer's temporary stage ---
    writers: dict[str, ShardWriter] = {}
    progs: dict[str, dict] = {}
    for n in todo:
        tmp = temp_stage_path(finals[n])
        prog = None
        clean_partial_files(tmp)  # temporaries of atomic writes cut short by a kill
        if tmp.exists() and (tmp / PROGRESS).exists():
            try:
                prog = json.loads((tmp / PROGRESS).read_text())
            except json.JSONDecodeError:
                prog = None
            if prog is not None and (prog.get("key") != keys[n] or (tmp / MANIFEST).exists()):
                warnings.warn(f"{tmp}: partial extraction with other settings; starting over", stacklevel=2)
                prog = None
        if prog is None and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        if prog is not None:
            for f in tmp.glob("shard_*.safetensors"):  # shards written after the last progress record
                if f.name not in {s["file"] for s in prog["shards"]}:
                    f.unlink()
        d_in = infos[n].channels
        writers[n] = ShardWriter(tmp, d_in, cfg.dtype, cfg.shard_size, prog["shards"] if prog else ())
        progs[n] = prog or {}
    start_img = min(w.images_done for w in writers.values())
    start_item = min((w.shards[-1].get("next_item", 0) if w.shards else 0) for w in writers.values())
    if start_item:  # images skipped before the resume point (recorded with the layer that is furthest behind)
        behind = min(todo, key=lambda n: writers[n].shards[-1].get("next_item", 0) if writers[n].shards else 0)
        report.skipped.extend((str(a), str(b)) for a, b in progs[behind].get("skipped", []))
    ids_all: list[str] = []
    first_tmp = temp_stage_path(finals[todo[0]])
    if start_img and (first_tmp / IMAGES_FILE).exists():
        ids_all = (first_tmp / IMAGES_FILE).read_text().splitlines()[:start_img]
    if len(ids_all) != start_img:  # image list lost: restart cleanly
        warnings.warn("image id list of the partial extraction is incomplete; starting over", stacklevel=2)
        for n in todo:
            for f in temp_stage_path(finals[n]).glob("shard_*.safetensors"):
                f.unlink()
            writers[n] = ShardWriter(temp_stage_path(finals[n]), infos[n].channels, cfg.dtype, cfg.shard_size)
        start_img = start_item = 0
        ids_all = []
        report.skipped.clear()
    # images.txt: the ids up to the resume point are rewritten atomically, later ones appended batch by batch
    # (flushed before every progress record, so it always holds at least the recorded images)
    for n in todo:
        atomic_write_bytes(temp_stage_path(finals[n]) / IMAGES_FILE, "".join(i + "\n" for i in ids_all).encode())
    ids_fd = {n: open(temp_stage_path(finals[n]) / IMAGES_FILE, "a") for n in todo}  # noqa: SIM115

    need_grad = cfg.positions_per_image is not None and cfg.sampling == "logit"
    # which relevance weighted the logit sampling (kept in progress.json across a resume, recorded in the manifest)
    relevance = next((progs[n]["relevance"] for n in todo if progs[n].get("relevance")), None)
    n_img = start_img
    bar = tqdm(total=source.total, initial=start_item, desc=f"extract {adapter.name}", unit="img",
               disable=not progress)
    try:
        for ids, x, next_item in source.batches(adapter, cfg.batch_size, start_item, cfg.skip_bad, report):
            bar.update(next_item - bar.n)
            if not ids:
                continue
            b = len(ids)
            for fd in ids_fd.values():
                fd.write("".join(i + "\n" for i in ids))
            if need_grad:
                weights, acts, relevance = _logit_relevance(adapter, x, todo)
            else:
                weights = None
                with torch.no_grad():
                    acts = adapter.capture(x, todo, stop_early=True)
            for n in todo:
                w = writers[n]
                if n_img + b <= w.images_done:
                    continue  # this layer already has these images (resume)
                rows, img_idx, pos = _rows(adapter, acts[n], n_img, cfg, weights[n] if weights else None)
                keep = img_idx >= w.images_done
                if not keep.all():
                    rows, img_idx, pos = rows[keep], img_idx[keep], pos[keep]
                if w.add(rows, img_idx, pos, images_end=n_img + b, next_item=next_item):
                    _save_progress(w, keys[n], ids_fd[n], n_img + b, report, relevance)
            n_img += b
        for n in todo:
            writers[n].flush(images_end=n_img, next_item=source.total if source.total is not None else -1)
            _save_progress(writers[n], keys[n], ids_fd[n], n_img, report, relevance)
    finally:
        bar.close()
        for fd in ids_fd.values():
            fd.close()
    if n_img == 0:
        raise ImageReadError(f"no readable images in {source.description}" + (
            f"\n{report.summary()}" if report.skipped else ""))
    if report.skipped:
        warnings.warn(report.summary(), stacklevel=2)
    notes = []
    if relevance is not None and relevance != "srd":
        notes.append(f"sampling='logit' weighted positions by {relevance}")
        warnings.warn(notes[-1], stacklevel=2)

    for n in todo:
        tmp, w, info = temp_stage_path(finals[n]), writers[n], infos[n]
        # the manifest is written while progress.json still exists: a kill before it leaves a resumable
        # stage, a kill after it a finished temporary stage that the next call only publishes
        write_manifest(
            tmp, "acts", dataclasses.replace(cfg, layers=[n]), upstream=_upstream(source),
            model=adapter.name, family=adapter.family, weights_hash=adapter.weights_hash, layer=n,
            model_record=record_for(adapter).to_json(),
            d_in=info.channels, grid=list(info.grid), layer_kind=info.kind,
            pfv_layout={"rows": "positions of the layer grid, row-major per image" +
                        ("; prefix (class/register) tokens with row=-1, col=token index" if cfg.include_cls
                         else ""),
                        "pos": "(row, col)", "image": "index into images.txt",
                        "num_prefix_tokens": getattr(adapter, "num_prefix_tokens", 0)},
            preprocessing=preprocessing, dataset=dataset_info, dtype=cfg.dtype, shards=w.shards,
            counts={"n": w.n_written, "n_images": n_img, "n_shards": len(w.shards),
                    "skipped_images": len(report.skipped)},
            skipped=report.skipped[:1000], extract_key=keys[n],
            sampling_relevance=relevance if need_grad else None, warnings=notes)
        _publish(tmp, finals[n])
    return finals


def _publish(tmp: Path, final: Path) -> None:
    (tmp / PROGRESS).unlink(missing_ok=True)
    publish_stage(tmp, final)


def _upstream(source: ImageSource) -> dict[str, Path] | None:
    """The stage that holds the images (e.g. ``indexes/<run>/world``), if the source lies inside one."""
    if source.base is None:
        return None
    for d in (source.base, *list(source.base.parents)[:3]):
        if (d / MANIFEST).exists():
            return {"images": d}
    return None


def _rows(adapter: ModelAdapter, act: torch.Tensor, first_image: int, cfg: ExtractConfig,
          weights_BN: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer output → ``(rows (n, D), image (n,), pos (n, 2))`` for the images of one batch."""
    batch = adapter.to_pfv(act.detach())
    pfv, positions = batch.pfv, batch.positions.cpu()
    B, N, D = pfv.shape
    sel = _select(B, N, cfg.positions_per_image, cfg.seed, first_image, weights_BN)
    extra = batch.extra if cfg.include_cls and batch.extra is not None and batch.extra.shape[1] else None
    E = extra.shape[1] if extra is not None else 0
    if sel is None and extra is None:
        rows = pfv.reshape(B * N, D)
        img = torch.arange(first_image, first_image + B).repeat_interleave(N)
        pos = positions.repeat(B, 1)
        return rows, img, pos
    parts, imgs, poss = [], [], []
    extra_pos = torch.stack([torch.full((E,), -1), torch.arange(E)], 1) if E else None
    for i in range(B):
        if E:
            parts.append(extra[i])
            poss.append(extra_pos)
            imgs.append(torch.full((E,), first_image + i))
        idx = sel[i] if sel is not None else torch.arange(N)
        parts.append(pfv[i, idx.to(pfv.device)])
        poss.append(positions[idx])
        imgs.append(torch.full((idx.numel(),), first_image + i))
    return torch.cat(parts), torch.cat(imgs), torch.cat(poss)


def _save_progress(w: ShardWriter, key: str, ids_fd: Any, images_end: int, report: SkipReport,
                   relevance: str | None) -> None:
    """Record the finished shards, the images skipped so far and the logit-sampling relevance method after
    flushing ``images.txt``."""
    ids_fd.flush()
    write_progress(w.directory, {"key": key, "shards": w.shards, "images_end": images_end,
                                 "skipped": [list(s) for s in report.skipped], "relevance": relevance})


def dataset_hash(reader: ShardReader) -> str:
    """sha256 over the image ids of an acts stage (identifies the dataset)."""
    return hashlib.sha256("\n".join(reader.image_ids).encode()).hexdigest()
