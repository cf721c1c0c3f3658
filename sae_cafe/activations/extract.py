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
from ..models import ModelAdapter, PFVBatch, get_adapter
from ..srd import srd_relevance
from .outliers import OutlierTally, flag_outliers, prefix_kinds
from .rows import capture_pfv, prefix_index, token_pfv
from .shards import (
    CANONICAL_DTYPE,
    IMAGES_FILE,
    TOKEN_KINDS,
    ShardReader,
    ShardWriter,
    check_tokens,
    kind_codes,
    parse_dtype,
    write_progress,
)

PROGRESS = "progress.json"


@dataclass(frozen=True)
class ExtractConfig:
    """What is extracted and how (recorded in every layer's manifest).

    ``positions_per_image``: keep k PFVs per image (None: all); ``sampling``: ``"uniform"`` or ``"logit"``
    (weighted by the position's SRD relevance for the predicted logit; gradient × activation for a model SRD
    has no rules for — the manifest's ``sampling_relevance`` and ``warnings`` say which). ``tokens``: which
    token rows are stored: ``"patch"`` (grid positions only), ``"all"`` (also the ViT class / register /
    distillation tokens, row = -1, col = token index) or ``"cls"`` (the class token only); every row's kind
    is stored in the shards' ``kind`` column. ``include_cls`` (older name): True means ``tokens="all"``.
    ``outlier_k``: a token whose norm exceeds the median + ``outlier_k`` · MAD of its image's patch-token
    norms is flagged as a high-norm outlier (:mod:`.outliers`; counted in the manifest, flagged per row).
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
    tokens: str = "patch"
    outlier_k: float = 10.0


# ----- position selection ------------------------------------------------------------------------------------
def _logit_relevance(adapter: ModelAdapter, x: torch.Tensor, layers: list[str]) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Relevance of each PFV position for the predicted logit: ``{layer: (B, N)}``, the layers' PFVs
    (:func:`.rows.capture_pfv`) and the method used.

    The method is ``"srd"`` (``sae_cafe.srd.srd_relevance``) or, for a model SRD has no rules for
    (:class:`UnsupportedModuleError`), ``"gradient_x_activation"`` summed over channels; the caller records
    which one in the manifest.
    """
    with torch.no_grad():
        acts = capture_pfv(adapter, x, layers)
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
                        tokens: str | None = None, outlier_k: float = 10.0) -> dict[str, Path]:
    """Extract PFVs of ``layers`` over ``images`` into ``<root>/<run>/acts/<model>/<layer>/``.

    Args:
        model: adapter or ``nn.Module`` as constructed.
        images: folder (flat/ImageFolder), file, list of paths/PIL/arrays, a preprocessed (N,3,H,W) tensor,
            or an iterable of images or of (N,3,H,W) batches.
        layers: one layer id or several (captured in the same forward pass).
        dtype: shard dtype (``float32``, ``float16``, ``bfloat16``).
        shard_size: PFV rows per shard. Memory stays at about one shard plus one batch per layer.
        positions_per_image / sampling: keep k patch positions per image, ``"uniform"`` or ``"logit"``-weighted.
        tokens: ``"patch"`` (default), ``"all"`` or ``"cls"`` (see :class:`ExtractConfig`); ``include_cls=True``
            is the older spelling of ``"all"``.
        outlier_k: high-norm outlier rule (:func:`.outliers.flag_outliers`); the count, kinds, positions and
            norm ratios go into each layer's manifest (``outliers``) and, when any are found, a warning.
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
    if tokens is None:
        tokens = "all" if include_cls else "patch"
    elif include_cls and tokens != "all":
        raise SaeCafeError(f"include_cls=True asks for tokens='all' but tokens={tokens!r}; pass only tokens")
    check_tokens(tokens)
    if not outlier_k > 0:
        raise SaeCafeError(f"outlier_k must be > 0, got {outlier_k}")
    if tokens == "cls":
        if adapter.kind != "tokens" or "cls" not in prefix_kinds(adapter):
            raise SaeCafeError(f"tokens='cls' but {adapter.name} has no class token; use tokens='patch'")
        if positions_per_image is not None:
            raise SaeCafeError("positions_per_image samples patch positions; with tokens='cls' leave it unset")
    cfg = ExtractConfig(names, CANONICAL_DTYPE[parse_dtype(dtype)], int(shard_size), int(batch_size),
                        tokens == "all", positions_per_image, sampling, int(seed), bool(skip_bad), tokens,
                        float(outlier_k))
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
        c = dataclasses.asdict(dataclasses.replace(cfg, layers=[n]))
        # settings added later enter the key only when they differ from what older extractions did, so a
        # finished stage of the same settings is reused (read with the legacy kind/outlier columns)
        if c["tokens"] == ("all" if c["include_cls"] else "patch"):
            del c["tokens"]
        if c["outlier_k"] == ExtractConfig.outlier_k:
            del c["outlier_k"]
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
    tallies: dict[str, OutlierTally] = {}
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
        tallies[n] = OutlierTally.from_json((prog or {}).get("outliers"))
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
            tallies[n] = OutlierTally()
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
                    acts = capture_pfv(adapter, x, todo)
            for n in todo:
                w = writers[n]
                if n_img + b <= w.images_done:
                    continue  # this layer already has these images (resume)
                rows, img_idx, pos, kind, flag = layer_rows(adapter, acts[n], n_img, cfg,
                                                            weights[n] if weights else None, tallies[n], w.images_done)
                keep = img_idx >= w.images_done
                if not keep.all():
                    rows, img_idx, pos, kind, flag = rows[keep], img_idx[keep], pos[keep], kind[keep], flag[keep]
                if w.add(rows, img_idx, pos, kind, flag, images_end=n_img + b, next_item=next_item):
                    _save_progress(w, keys[n], ids_fd[n], n_img + b, report, relevance, tallies[n])
            n_img += b
        for n in todo:
            writers[n].flush(images_end=n_img, next_item=source.total if source.total is not None else -1)
            _save_progress(writers[n], keys[n], ids_fd[n], n_img, report, relevance, tallies[n])
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

    kinds_prefix = prefix_kinds(adapter) if adapter.kind == "tokens" else []
    for n in todo:
        tmp, w, info = temp_stage_path(finals[n]), writers[n], infos[n]
        outlier_report = tallies[n].report(cfg.outlier_k)
        if outlier_report["n"]:  # recorded in the manifest's "outliers" (with its note), printed here
            warnings.warn(f"{adapter.name} {n}: {outlier_report['note']}", stacklevel=2)
        # the manifest is written while progress.json still exists: a kill before it leaves a resumable
        # stage, a kill after it a finished temporary stage that the next call only publishes
        write_manifest(
            tmp, "acts", dataclasses.replace(cfg, layers=[n]), upstream=_upstream(source),
            model=adapter.name, family=adapter.family, weights_hash=adapter.weights_hash, layer=n,
            model_record=record_for(adapter).to_json(),
            d_in=info.channels, grid=list(info.grid), layer_kind=info.kind,
            pfv_layout={"rows": {"patch": "positions of the layer grid, row-major per image",
                                 "all": "per image: prefix (class/register/distillation) tokens with row=-1, "
                                        "col=token index, then the positions of the layer grid, row-major",
                                 "cls": "the class token of each image (row=-1, col=token index)"}[cfg.tokens],
                        "pos": "(row, col)", "image": "index into images.txt",
                        "kind": "token kind code per row: " + ", ".join(f"{i} {k}" for i, k in
                                                                         enumerate(TOKEN_KINDS)),
                        "outlier": "1: high-norm outlier token (see outliers)",
                        "num_prefix_tokens": getattr(adapter, "num_prefix_tokens", 0),
                        "prefix_kinds": kinds_prefix},
            tokens=cfg.tokens, outliers=outlier_report,
            preprocessing=preprocessing, dataset=dataset_info, dtype=cfg.dtype, shards=w.shards,
            counts={"n": w.n_written, "n_images": n_img, "n_shards": len(w.shards),
                    "skipped_images": len(report.skipped), "by_kind": _count_kinds(w)},
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


def layer_rows(adapter: ModelAdapter, act: torch.Tensor | PFVBatch, first_image: int, cfg: ExtractConfig,
               weights_BN: torch.Tensor | None, tally: OutlierTally | None = None, images_done: int = 0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer output (raw, or its :class:`PFVBatch` from :func:`.rows.capture_pfv`) → ``(rows (n, D), image (n,),
    pos (n, 2), kind (n,) uint8, outlier (n,) uint8)`` for the images of one batch: per image the rows of
    ``cfg.tokens`` in :func:`.rows.token_pfv`'s order (kept prefix tokens at pos (-1, token index), then the grid
    positions, ``positions_per_image`` of them when set). High-norm outliers are flagged over every token of each
    image (stored or not) and counted in ``tally`` for images with index ≥ ``images_done`` (a resumed batch is
    not counted twice)."""
    batch = act if isinstance(act, PFVBatch) else adapter.to_pfv(act)
    pfv = batch.pfv.detach()
    positions = batch.positions.cpu()
    B, N, D = pfv.shape
    extra_all = batch.extra.detach() if batch.extra is not None and batch.extra.shape[1] else None
    E0 = extra_all.shape[1] if extra_all is not None else 0
    kinds_e = prefix_kinds(adapter, E0) if E0 else []
    if adapter.kind == "tokens":
        flag_BN, ratio_BN, flag_BE, ratio_BE = flag_outliers(pfv, extra_all, cfg.outlier_k)
    else:  # CNN maps: positions are not tokens, and post-ReLU norms are heavy-tailed by design
        flag_BN, ratio_BN, flag_BE, ratio_BE = (torch.zeros(B, N, dtype=torch.bool), None,
                                                torch.zeros(B, E0, dtype=torch.bool), None)
    if tally is not None:
        tally.add(flag_BN, ratio_BN, positions, flag_BE, ratio_BE, kinds_e, first_image, images_done)
    if cfg.tokens == "cls" and "cls" not in kinds_e:
        raise SaeCafeError(f"tokens='cls' but {adapter.name} gives no class token at this layer; use "
                           "tokens='patch'")
    sel = None if cfg.tokens == "cls" else _select(B, N, cfg.positions_per_image, cfg.seed, first_image,
                                                   weights_BN)
    idx_BK = torch.stack(sel) if sel is not None else None  # (B, K) grid positions kept per image
    rows = token_pfv(adapter, PFVBatch(pfv, batch.positions, batch.grid, extra_all), cfg.tokens, idx_BK)
    T = rows.shape[1]
    e_idx = prefix_index(adapter, E0, cfg.tokens)  # (E',) prefix tokens kept
    pos = [torch.stack([torch.full((e_idx.numel(),), -1), e_idx], 1).expand(B, -1, 2)]
    kind = [kind_codes([kinds_e[j] for j in e_idx.tolist()]).expand(B, -1)]
    flag = [flag_BE[:, e_idx]]
    if cfg.tokens != "cls":
        K = N if idx_BK is None else idx_BK.shape[1]
        pos.append(positions.expand(B, N, 2) if idx_BK is None else positions[idx_BK])
        kind.append(torch.full((B, K), TOKEN_KINDS.index("patch"), dtype=torch.uint8))
        flag.append(flag_BN if idx_BK is None else flag_BN.gather(1, idx_BK))
    img = torch.arange(first_image, first_image + B).repeat_interleave(T)
    return (rows.reshape(B * T, D), img, torch.cat(pos, 1).reshape(B * T, 2), torch.cat(kind, 1).reshape(-1),
            torch.cat(flag, 1).reshape(-1).to(torch.uint8))


def _count_kinds(w: ShardWriter) -> dict[str, int]:
    """Rows per token kind over the finished shards of ``w`` (reads only their ``kind`` columns)."""
    from safetensors import safe_open

    counts = torch.zeros(len(TOKEN_KINDS), dtype=torch.long)
    for s in w.shards:
        with safe_open(str(w.directory / s["file"]), framework="pt") as f:
            counts += torch.bincount(f.get_tensor("kind").long(), minlength=len(TOKEN_KINDS))
    return {k: int(c) for k, c in zip(TOKEN_KINDS, counts.tolist(), strict=True) if c}


def _save_progress(w: ShardWriter, key: str, ids_fd: Any, images_end: int, report: SkipReport,
                   relevance: str | None, tally: OutlierTally) -> None:
    """Record the finished shards, the images skipped so far, the logit-sampling relevance method and the
    outlier tally after flushing ``images.txt``."""
    ids_fd.flush()
    write_progress(w.directory, {"key": key, "shards": w.shards, "images_end": images_end,
                                 "skipped": [list(s) for s in report.skipped], "relevance": relevance,
                                 "outliers": tally.to_json()})


def dataset_hash(reader: ShardReader) -> str:
    """sha256 over the image ids of an acts stage (identifies the dataset)."""
    return hashlib.sha256("\n".join(reader.image_ids).encode()).hexdigest()
