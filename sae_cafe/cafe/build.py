"""``build_cafe``: mine top-k exemplars, anchor them to SRD iERFs, index them in FAISS, write the stage.

Stage layout (``indexes/<run>/cafe/<model>/<layer>/``)::

    manifest.json          kind "cafe": config, index strings, counts, timings, upstream
    topk.safetensors       TopKState (top-k + uniform sample + firing statistics)
    exemplars.safetensors  ex_latent/ex_rank/ex_image/ex_row/ex_col (E,), ex_activation (E,), ex_pfv (E, D)
    anchors.safetensors    ierf16 (E, H, W) fp16, ierf_scale (E,), act_map (E, h, w) fp16
    latents.safetensors    per-latent table (S,) (also latents.json, for viewers)
    decoder.faiss          latent decoder directions (ids = latent); decoder.safetensors W_dec, b_dec
    exemplars.faiss        exemplar PFVs (ids = exemplar row → exemplars/anchors)
    images.json            image names, labels and the image source path
    class_push.safetensors (S, C) logit change per unit of each latent (only for layers under a linear head)
    labels.json            concept label per latent (iERF and activation-map evidence; only when built with
                           ground-truth attribute maps — see ``sae_cafe.concepts``)

The build is resumable (``sae_cafe.artifacts.stage_dir(resume=True)``): the partial state (``resume.json``
with the inputs' fingerprint, the mining checkpoint ``mining_state.safetensors``, finished anchoring chunks
``anchor_*.safetensors``) lives in the temporary stage directory ``.<layer>.tmp`` beside the outputs being
written, and a rerun with the same inputs continues from it. The manifest is written last of the outputs and
the partial state removed after it, so a process killed at any point leaves either a resumable or a
finished temporary stage (which the next run only publishes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import (
    MANIFEST,
    atomic_write_json,
    hash_json,
    read_manifest,
    stage_dir,
    stage_path,
    write_manifest,
)
from ..concepts.label import LABELS_FILE, label_all, labels_document, load_calibration
from ..errors import ArtifactError, SaeCafeError
from ..model_record import KEY as MODEL_RECORD
from ..model_record import record_for, state_hash
from ..models import get_adapter
from ..saes import check_sae, encode_images
from .anchor import IerfFn, anchor_exemplars
from .index import make_index
from .metrics import concentration, purity_table
from .source import ImageSource
from .store import Cafe, load_cafe
from .topk import TopKMiner, TopKState

STATE = "mining_state.safetensors"
RESUME = "resume.json"


@dataclass
class CafeConfig:
    """CAFE build settings.

    Attributes:
        k: top exemplars kept per latent. distinct_images: at most one exemplar per image (its best
            position; spec §3.2) — False keeps the top (image, position) pairs.
        n_anchor: exemplars per latent anchored to iERFs (≤ k; None = k).
        n_sample: uniform-sample slots per latent (lower activation quantiles; 0 = off).
        seed_mode: ``"pfv"`` one-hot at the exemplar PFV (default) or ``"actmap"`` (latent activation map).
        index: FAISS spec of the exemplar index (``Flat`` | ``IVF`` | ``HNSW`` | factory string);
            ``decoder_index`` the same for decoder directions. ``index_params`` search params (None = auto).
        batch_size: images per mining batch. checkpoint_every: mining batches between saved checkpoints.
        seeds_per_pass: iERF seeds per image per SRD call. anchor_batch: images per SRD call.
        anchor_chunk: images per saved anchoring chunk. sample_seed: hash seed of the uniform sample.
    """

    k: int = 16
    distinct_images: bool = True
    n_anchor: int | None = None
    n_sample: int = 32
    seed_mode: str = "pfv"
    index: str = "Flat"
    decoder_index: str = "Flat"
    index_params: str | None = None
    batch_size: int = 32
    checkpoint_every: int = 10
    seeds_per_pass: int = 64
    anchor_batch: int = 8
    anchor_chunk: int = 64
    sample_seed: int = 0

    def validate(self) -> None:
        if self.k < 1 or (self.n_anchor is not None and not 0 < self.n_anchor <= self.k):
            raise SaeCafeError(f"CafeConfig: need k >= 1 and 0 < n_anchor <= k, got k={self.k}, "
                               f"n_anchor={self.n_anchor}")
        if self.seed_mode not in ("pfv", "actmap"):
            raise SaeCafeError(f"CafeConfig: seed_mode must be 'pfv' or 'actmap', got {self.seed_mode!r}")


def sae_hash(sae) -> str:
    """sha256 of an SAE's parameters (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_hash(adapter) -> str:
    """The model's weights hash: the weights file's sha256, else the sha256 of its parameters (see
    :mod:`sae_cafe.model_record`, whose record the manifest also stores)."""
    return adapter.weights_hash or state_hash(adapter.model)


@torch.no_grad()
def class_push(adapter, sae, layer: str, x: torch.Tensor, tol: float = 1e-3, progress: bool = False,
               chunk: int = 32) -> torch.Tensor | None:
    """(S, C) logit change per unit of each latent, when the layer sits under a linear head; else None.

    A latent's push is g(d_k) - g(0), where g(v) = logits of ``x`` (1 image) with the layer's PFVs replaced
    by ``v`` at every position and d_k is the latent's decoder direction. Under a linear head g is affine,
    g(v) = g(0) + J v, so the pushes of all S latents are one matmul W_dec J^T.

    Hand-written for speed: one forward of ``x`` whose layer output is replaced (in a hook) by a batch of two,
    v = 0 (tracked by autograd) and a random direction a; J (C, D) comes from reverse passes through the part
    of the model after ``layer`` only (batched over ``chunk`` classes, with a progress bar). The head counts as
    linear when u·(g(a) - g(0)) = (u J)·a for a random u (one reverse pass, so a non-linear head costs no
    Jacobian) and g(a) - g(0) = J a, within ``tol``; otherwise None. Equal to the per-latent forward (tested
    in float64).
    """
    src = adapter.resolve_layer(layer)
    gen = torch.Generator().manual_seed(0)
    held: dict[str, torch.Tensor] = {}

    def replace(_m, _i, out):
        batch = adapter.to_pfv(out)
        N, D = batch.pfv.shape[1:]
        torch.set_grad_enabled(True)  # the part after the layer only (restored by the enclosing no_grad)
        held["v"] = v = torch.zeros(D, dtype=batch.pfv.dtype, device=batch.pfv.device, requires_grad=True)
        held["a"] = a = torch.randn(D, generator=gen).to(batch.pfv)
        pfv = torch.stack([v, a])[:, None, :].expand(2, N, D)
        extra = None if batch.extra is None else batch.extra.expand(2, *batch.extra.shape[1:])
        return adapter.from_pfv(type(batch)(pfv, batch.positions, batch.grid, extra))

    with torch.no_grad(), adapter.hooks({src: replace}):
        # (2, C): g(0), g(a). The image runs twice, so that layers that bypass ``layer`` (DenseNet's
        # concatenations, skips) see the same batch size as its replaced output
        out = adapter.model(x[:1].expand(2, *x.shape[1:]))
    v, a = held["v"], held["a"]
    C = out.shape[1]
    got = (out[1] - out[0]).detach()
    if got.abs().max() == 0:
        return None  # the head ignores the layer (e.g. a zero-initialised head)
    # cheap first test with one reverse pass: u·(g(a) - g(0)) = (u J)·a for a random u
    u = torch.randn(C, generator=gen).to(out)
    with torch.enable_grad():
        uJ = torch.autograd.grad(out[0], v, grad_outputs=u, retain_graph=True)[0]
    if (uJ @ a - u @ got).abs() > tol * (1 + u.norm() * got.norm()):
        return None  # not under a linear head
    eye = torch.eye(C, dtype=out.dtype, device=out.device)
    starts = range(0, C, chunk)
    rows = []
    with torch.enable_grad():
        for s in tqdm(starts, desc=f"class push {layer}", unit="chunk", disable=not progress):
            rows.append(torch.autograd.grad(out[0], v, grad_outputs=eye[s:s + chunk], is_grads_batched=True,
                                            retain_graph=s + chunk < C)[0])
    J = torch.cat(rows)  # (C, D)
    if (J @ a - got).abs().max() > tol * (1 + got.abs().max()):
        return None  # not under a linear head
    W = sae.W_dec.detach().to(J)  # (S, D)
    return (W @ J.T).float().cpu()


def _fingerprint(adapter, sae, layer: str, source: ImageSource, cfg: CafeConfig) -> dict:
    return {"model": adapter.name, "model_hash": model_hash(adapter), "layer": layer, "sae_hash": sae_hash(sae),
            "images": source.fingerprint(), "config": hash_json(asdict(cfg))}


def _open_work(work: Path, final: Path, fp: dict) -> bool:
    """Prepare the temporary stage dir ``work`` (from ``stage_dir(resume=True)``) for inputs ``fp``.

    Partial state for the same inputs is kept, anything else is cleared. Returns True when ``work`` already
    holds the finished stage for these inputs (killed between its manifest and publishing).
    """
    if (work / MANIFEST).exists():
        try:
            if read_manifest(work, "cafe").get("build_key") == hash_json(fp):
                return True
        except ArtifactError:
            pass
        _clear(work)
    try:
        old = json.loads((work / RESUME).read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    if old != fp and any(work.iterdir()):
        if old is not None:
            warnings.warn(f"{work}: partial CAFE state is for other inputs; starting over", stacklevel=3)
        _clear(work)
    atomic_write_json(work / RESUME, fp)
    return False


def _clear(d: Path) -> None:
    for p in d.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _drop_work_files(work: Path) -> None:
    """Remove the partial state from a finished temporary stage (``resume.json`` last)."""
    for p in [work / STATE, *sorted(work.glob("anchor_*.safetensors")), work / RESUME]:
        p.unlink(missing_ok=True)


def mine(adapter, sae, layer: str, source: ImageSource, cfg: CafeConfig, work: Path | None = None,
         progress: bool = True) -> tuple[TopKState, torch.Tensor, tuple[int, int]]:
    """Stream all images through model+SAE into a :class:`TopKState` (checkpointed in ``work``).

    Returns the state, the dataset mean colour (3,) in the model's input space and the layer grid.
    """
    S = sae.W_dec.shape[0]
    n = len(source)
    state, done, csum, npx = None, 0, torch.zeros(3, dtype=torch.float64), 0
    if work is not None and (work / STATE).exists():
        state, meta = TopKState.load(work / STATE)
        done, npx = int(meta["done"]), int(meta["n_pixels"])
        csum = torch.tensor(meta["colour_sum"], dtype=torch.float64)
    miner = TopKMiner(S, cfg.k, cfg.n_sample, cfg.sample_seed, state=state, distinct_images=cfg.distinct_images)
    grid = adapter.grid(layer)
    bar = tqdm(total=n, initial=done, desc=f"mining top-{cfg.k} {layer}", unit="img", disable=not progress)
    for nb, start in enumerate(range(done, n, cfg.batch_size), 1):
        idx = list(range(start, min(n, start + cfg.batch_size)))
        x = source.batch(idx, adapter)
        _, lat, grid = encode_images(sae, adapter, layer, x)
        miner.update(lat, torch.tensor(idx))
        csum += x.double().sum((0, 2, 3)).cpu()
        npx += x.shape[0] * x.shape[2] * x.shape[3]
        bar.update(len(idx))
        if work is not None and (nb % cfg.checkpoint_every == 0 or idx[-1] == n - 1):
            miner.state.save(work / STATE, {"done": idx[-1] + 1, "n_pixels": npx, "colour_sum": csum.tolist()})
    bar.close()
    return miner.state, (csum / max(npx, 1)).float(), tuple(grid)


def exemplar_table(state: TopKState, n_anchor: int, grid_w: int) -> dict[str, torch.Tensor]:
    """Flatten the top ``n_anchor`` exemplars of every latent into rows (latent-major, rank order)."""
    v, i, p = state.values[:, :n_anchor], state.image[:, :n_anchor], state.pos[:, :n_anchor]
    S, K = v.shape
    ok = i >= 0
    lat = torch.arange(S)[:, None].expand(S, K)[ok]
    rank = torch.arange(K)[None, :].expand(S, K)[ok]
    pos = p[ok]
    return {"ex_latent": lat.contiguous(), "ex_rank": rank.contiguous(), "ex_image": i[ok].contiguous(),
            "ex_pos": pos.contiguous(), "ex_row": (pos // grid_w).contiguous(), "ex_col": (pos % grid_w).contiguous(),
            "ex_activation": v[ok].contiguous()}


def build_cafe(model, sae, layer: str | int, images: object, out_dir: str | Path | None = None, run: str | None = None,
               root: str | Path | None = None, config: CafeConfig | None = None, ierf_fn: IerfFn | None = None,
               attributes: dict[str, object] | None = None, upstream: dict[str, str | Path] | None = None,
               progress: bool = True, extra_manifest: dict | None = None, **overrides) -> Cafe:
    """Build the CAFE stage of ``model``'s ``layer`` with ``sae`` over ``images`` and return it loaded.

    Args:
        model: adapter or nn.Module. sae: any ``sae_lens.SAE`` trained on ``layer``.
        images: folder, list of images/paths, indexable dataset or preprocessed (N,3,H,W) tensor; image ids
            are positions in this sequence.
        out_dir: stage directory (default ``stage_path(run, "cafe", model, layer, root=root)``).
        config / overrides: :class:`CafeConfig` (keyword overrides, e.g. ``k=8``, ``index="HNSW"``).
        ierf_fn: iERF engine (default SRD ``srd_ierf_from_relevance``).
        attributes: optional ground truth {name: (N, H, W) int maps, -1 = n/a} aligned with ``images``
            (input resolution), for the per-latent attribute purity.
        extra_manifest: additional JSON fields for the manifest (e.g. ``sae_path``).
    """
    adapter = get_adapter(model)
    cfg = config or CafeConfig()
    if overrides:
        cfg = CafeConfig(**{**asdict(cfg), **overrides})
    cfg.validate()
    layer = adapter.resolve_layer(layer)
    check_sae(sae, adapter, layer, check_model=False, source="the SAE")
    sae.eval()
    source = ImageSource(images)
    if out_dir is None:
        if run is None:
            raise SaeCafeError("build_cafe: pass out_dir or run (the stage goes to indexes/<run>/cafe/<model>/"
                               "<layer>)")
        out_dir = stage_path(run, "cafe", adapter.name, layer, root=root)
    final = Path(out_dir)
    fp = _fingerprint(adapter, sae, layer, source, cfg)
    with stage_dir(final, resume=True) as work:
        if not _open_work(work, final, fp):
            _build(adapter, sae, layer, source, cfg, work, fp, ierf_fn, attributes, upstream, progress,
                   extra_manifest)
        _drop_work_files(work)
    return load_cafe(final)


def _build(adapter, sae, layer: str, source: ImageSource, cfg: CafeConfig, work: Path, fp: dict,
           ierf_fn: IerfFn | None, attributes: dict[str, object] | None, upstream: dict[str, str | Path] | None,
           progress: bool, extra_manifest: dict | None) -> None:
    """Mine, anchor, index and write the stage into ``work`` (resuming from the partial state in it)."""
    t0 = time.perf_counter()
    state, mean_colour, grid = mine(adapter, sae, layer, source, cfg, work, progress)
    t_mine = time.perf_counter() - t0
    ex = exemplar_table(state, cfg.n_anchor or cfg.k, grid[1])
    if ex["ex_latent"].numel() == 0:
        raise SaeCafeError(f"no latent of the SAE fires on any of the {len(source)} images at layer {layer!r}; "
                           "check that the SAE belongs to this model and layer")
    t1 = time.perf_counter()
    anchors = anchor_exemplars(adapter, sae, layer, source, ex["ex_latent"], ex["ex_image"], ex["ex_pos"],
                               seed=cfg.seed_mode, seeds_per_pass=cfg.seeds_per_pass, batch_images=cfg.anchor_batch,
                               chunk_images=cfg.anchor_chunk, ierf_fn=ierf_fn, work_dir=work, progress=progress)
    t_anchor = time.perf_counter() - t1
    ex["ex_pfv"] = anchors.pop("pfv").float().contiguous()
    n_ierf, ierf_seconds = int(anchors.pop("n_ierf")), float(anchors.pop("seconds"))
    ex["ex_activation_check"] = anchors.pop("activation").float().contiguous()
    x_in = source.batch([0], adapter)
    H, W = x_in.shape[-2:]
    # --- per-latent table
    S = state.values.shape[0]
    conc_i, conc_a = concentration(anchors["ierf16"], anchors["ierf_scale"], anchors["act_map"], (H, W))
    table = latent_table(state, ex["ex_latent"], conc_i, conc_a)
    labels_doc = None
    if attributes is not None:
        shares: dict = {}
        pur = purity_table(anchors, ex, attributes, S, (H, W), shares_out=shares)
        table.update(pur)
        labels_doc = stage_labels(shares, ex["ex_latent"], S)
    t_push = time.perf_counter()
    push = class_push(adapter, sae, layer, x_in, progress=progress)
    t_push = time.perf_counter() - t_push
    # --- FAISS
    t2 = time.perf_counter()
    ex_index = make_index(ex["ex_pfv"], cfg.index, params=cfg.index_params)
    dec_index = make_index(sae.W_dec.detach().float().cpu(), cfg.decoder_index, params=cfg.index_params)
    t_index = time.perf_counter() - t2
    from safetensors.torch import save_file

    # outputs beside the partial state (non-atomic writes are redone on resume); the manifest last
    d = work
    state.save(d / "topk.safetensors", {"layer": layer})
    save_file({k: v.contiguous() for k, v in ex.items()}, str(d / "exemplars.safetensors"))
    save_file({k: v.contiguous() for k, v in anchors.items()}, str(d / "anchors.safetensors"))
    save_file({k: v.contiguous() for k, v in table.items()}, str(d / "latents.safetensors"))
    save_file({"W_dec": sae.W_dec.detach().float().cpu().contiguous(),
               "b_dec": sae.b_dec.detach().float().cpu().contiguous()}, str(d / "decoder.safetensors"))
    if push is not None:
        save_file({"class_push": push.contiguous()}, str(d / "class_push.safetensors"))
    atomic_write_json(d / "latents.json", latents_json(table, push, adapter.class_names))
    if labels_doc is not None:
        atomic_write_json(d / LABELS_FILE, labels_doc)
    atomic_write_json(d / "images.json", {
        "n": len(source), "names": source.names,
        "labels": [source.label(i) for i in range(len(source))],
        "source": str(source.root) if source.root is not None else None})
    ex_index.write(d / "exemplars.faiss")
    dec_index.write(d / "decoder.faiss")
    write_manifest(
        d, "cafe", cfg, upstream,
        model=adapter.name, model_hash=fp["model_hash"], layer=layer, sae_hash=fp["sae_hash"],
        sae_cfg={"d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae), "architecture": sae.cfg.architecture()},
        grid=list(grid), input_size=[int(H), int(W)], mean_colour=mean_colour.tolist(),
        n_images=len(source), n_latents=S, n_exemplars=int(ex["ex_latent"].numel()),
        indexes={"exemplars": {"spec": ex_index.spec, "params": ex_index.params, "ntotal": ex_index.ntotal},
                 "decoder": {"spec": dec_index.spec, "params": dec_index.params, "ntotal": dec_index.ntotal}},
        timings={"mine_s": t_mine, "anchor_s": t_anchor, "ierf_s": ierf_seconds, "index_s": t_index,
                 "class_push_s": t_push,
                 "n_ierf": n_ierf, "ierf_per_s": n_ierf / max(ierf_seconds, 1e-9)},
        has_class_push=push is not None, has_purity=attributes is not None, class_names=adapter.class_names,
        purity_attributes=list(attributes) if attributes is not None else [],
        has_labels=labels_doc is not None,
        images_source=images_folder(source),
        build_key=hash_json(fp), **{MODEL_RECORD: record_for(adapter).to_json(), **(extra_manifest or {})})


def stage_labels(shares: dict[str, list], ex_latent: torch.Tensor, n_latents: int) -> dict:
    """``labels.json`` of a stage built with attribute maps: every latent's concept label from the iERF
    (primary) and from the activation map, reusing the per-exemplar shares of the purity table (no extra
    pass over the maps; :mod:`sae_cafe.concepts.label`)."""
    cal = load_calibration()
    return labels_document({k: label_all(v, ex_latent, n_latents, k, cal) for k, v in shares.items()}, "ierf",
                           calibration=cal)


def images_folder(source: ImageSource) -> str | None:
    """The folder the images were read from, resolved (recorded as ``images_source`` for viewers): the
    source's folder, else the common folder of a list of image files; None for in-memory images."""
    if source.root is not None:
        return str(Path(source.root).resolve())
    items = source.items if isinstance(source.items, (list, tuple)) else []
    if not items or not all(isinstance(f, (str, Path)) for f in items):
        return None
    common = Path(os.path.commonpath([str(Path(f).resolve()) for f in items]))
    return str(common.parent if common.is_file() else common)


def latent_table(state: TopKState, ex_latent: torch.Tensor, conc_ierf: torch.Tensor,
                 conc_act: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-latent stats (S,): firing frequency, image frequency, mean/max activation, concentrations."""
    S = state.values.shape[0]
    n_pfv, n_img = max(int(state.n_pfv), 1), max(int(state.n_images), 1)

    def per_latent(v: torch.Tensor) -> torch.Tensor:
        s = torch.zeros(S, dtype=torch.float64).index_add_(0, ex_latent, v.double())
        c = torch.zeros(S, dtype=torch.float64).index_add_(0, ex_latent, torch.ones_like(v, dtype=torch.float64))
        return torch.where(c > 0, s / c.clamp(min=1), torch.full_like(s, float("nan"))).float()

    return {
        "firing_frequency": (state.n_fire.double() / n_pfv).float(),
        "image_frequency": (state.n_img_fire.double() / n_img).float(),
        "mean_activation": (state.sum_act / state.n_fire.clamp(min=1)).float(),
        "max_activation": state.max_act.float(),
        "n_exemplars": (state.image >= 0).sum(1),
        "concentration_ierf": per_latent(conc_ierf),
        "concentration_act": per_latent(conc_act),
    }


def latents_json(table: dict[str, torch.Tensor], push: torch.Tensor | None,
                 class_names: list[str] | None) -> list[dict]:
    """The per-latent table as a list of JSON rows (NaN → None), with the top pushed classes."""
    S = len(table["firing_frequency"])
    rows = []
    for s in range(S):
        r: dict = {"latent": s}
        for k, v in table.items():
            x = v[s].item()
            r[k] = None if isinstance(x, float) and x != x else x
        if push is not None:
            top = torch.argsort(push[s], descending=True)[:3].tolist()
            r["pushes"] = [{"class": class_names[c] if class_names else c, "logit": float(push[s, c])} for c in top]
        rows.append(r)
    return rows


def open_cafe(path: str | Path) -> Cafe:
    """Load a finished CAFE stage (alias of :func:`load_cafe` with a manifest check)."""
    read_manifest(path, "cafe")
    return load_cafe(path)


__all__ = ["CafeConfig", "build_cafe", "class_push", "exemplar_table", "mine", "open_cafe"]
