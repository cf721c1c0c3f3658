"""Saliency benchmark: methods × metrics on images with object masks, resumable per image.

:func:`run_saliency_benchmark` is the Python API (the demo calls it with ``methods="cheap"``);
:func:`write_saliency_benchmark` writes the table (CSV, JSON), plots (PNG) and the manifest of a stage
``indexes/<run>/saliency/<model>/``. Per-image results live in ``<state>/<config-hash>/<method>/<id>.json``
(the stage's temporary directory while it runs), so an interrupted run continues where it stopped.

Every method's maps for an image are computed once (timed: seconds per image), then every metric sees
them through its one post-processing (``postprocess.METRIC_POSTPROCESS``). μ-fidelity subsets and
stability noise are drawn per image from ``seed`` and the image index, so every method is scored on the
same subsets and noise; the μ-fidelity logit drops of those subsets do not depend on the map and are computed
once per image for all methods. A record missing a metric that a later run needs (more images for
stability, say) is recomputed; the others are reused.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..artifacts import atomic_write_bytes, atomic_write_json, hash_json, write_manifest
from ..errors import SaeCafeError
from ..models import get_adapter
from ..models.base import ModelAdapter
from . import baselines as B
from .metrics import HIGHER_IS_BETTER, METRICS, evaluate_maps, fidelity_deltas, grid_subsets
from .postprocess import METRIC_POSTPROCESS

CURVES = ("insertion_curve", "deletion_curve")


@dataclass
class BenchmarkConfig:
    """Benchmark parameters (method_spec §5.2). ``n_fidelity``: the first images get μ-fidelity (None: all);
    ``n_stability``: the first images get stability (None: as ``n_fidelity``); ``max_images``: per-method cap
    on the images scored (e.g. ``{"rise": 50}``; its rows then report fewer images); ``max_stability``: the
    same for stability alone (re-explaining 20 noisy copies is what makes it dear). ``batch_size``: images
    per explanation call; ``stability_batch_size``: noisy copies per explanation call in the stability
    metric."""

    metrics: tuple[str, ...] = METRICS
    n_fidelity: int | None = 100
    n_stability: int | None = None
    max_images: dict[str, int] = field(default_factory=dict)
    max_stability: dict[str, int] = field(default_factory=dict)
    n_subsets: int = 200
    fidelity_grid: int = 9
    fidelity_frac: float = 0.2
    n_noise: int = 20
    noise_radius: float = 0.1
    steps: int = 10
    tolerance: float | None = None
    seed: int = 0
    batch_size: int = 8
    stability_batch_size: int = 32
    n_examples: int = 6


def resolve_methods(methods: str | Sequence[str] | None) -> list[str]:
    """``None``/``"all"`` → every registered method; ``"cheap"`` → SRD + the cheap baselines."""
    if methods is None or methods == "all":
        return list(B.REGISTRY)
    if methods == "cheap":
        return B.list_baselines(cheap_only=True)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in B.REGISTRY]
    if unknown:
        raise SaeCafeError(f"unknown saliency method(s) {unknown}; available: {', '.join(B.REGISTRY)}, "
                           "or 'cheap' / 'all'")
    return list(methods)


@dataclass
class BenchmarkResult:
    """Per-image scores. ``scores[method][metric]``: (N,) float (NaN = not computed or undefined);
    ``curves[method][insertion_curve|deletion_curve]``: (N, steps+1); ``seconds[method]``: (N,) seconds
    to compute each image's map; ``not_applicable[method]``: reason; ``examples[method]``: (E,H,W)."""

    model: str
    methods: list[str]
    image_ids: list[str]
    config: BenchmarkConfig
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds: dict[str, np.ndarray] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    examples: dict[str, np.ndarray] = field(default_factory=dict)
    example_images: np.ndarray | None = None

    def table(self) -> list[dict]:
        """One row per method: ``<metric>_mean``, ``<metric>_se``, ``<metric>_n``, ``sec_per_image``, ``status``."""
        rows = []
        for m in self.methods:
            row: dict = {"method": m}
            if m in self.not_applicable or m in self.errors:
                row["status"] = (f"n/a ({self.not_applicable[m]})" if m in self.not_applicable
                                 else f"error ({self.errors[m]})")
                rows.append(row)
                continue
            row["status"] = "ok"
            for k in self.config.metrics:
                v = self.scores[m].get(k, np.array([]))
                v = v[np.isfinite(v)]
                row[f"{k}_n"] = int(v.size)
                row[f"{k}_mean"] = float(v.mean()) if v.size else float("nan")
                row[f"{k}_se"] = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
            s = self.seconds[m]
            s = s[np.isfinite(s)]
            row["sec_per_image"] = float(s.mean()) if s.size else float("nan")
            rows.append(row)
        return rows

    def format_table(self) -> str:
        """Plain-text methods × metrics table (mean ± s.e.), arrows mark the better direction."""
        heads = [f"{k}{'↑' if HIGHER_IS_BETTER[k] else '↓'}" for k in self.config.metrics]
        lines = [f"{'method':<22}" + "".join(f"{h:>17}" for h in heads) + f"{'s/img':>9}"]
        for row in self.table():
            if row["status"] != "ok":
                lines.append(f"{row['method']:<22}{row['status']}")
                continue
            cells = []
            for k in self.config.metrics:
                mu, se = row[f"{k}_mean"], row[f"{k}_se"]
                cells.append("—" if not np.isfinite(mu) else f"{mu:.3f}±{se:.3f}" if np.isfinite(se)
                             else f"{mu:.3f}")
            lines.append(f"{row['method']:<22}" + "".join(f"{c:>17}" for c in cells)
                         + f"{row['sec_per_image']:>9.3f}")
        return "\n".join(lines)


def _as_tensor_images(adapter: ModelAdapter, images) -> torch.Tensor:
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3 and images.is_floating_point():
        return images.to(adapter.device)
    return adapter.preprocess(list(images))


def _per_image_seed(seed: int, index: int, salt: int) -> int:
    return (seed * 1_000_003 + index * 7919 + salt) % (2 ** 63)


def _per_image_generator(seed: int, index: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(_per_image_seed(seed, index, salt))


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Seed torch's global RNG (stochastic baselines such as SmoothGrad draw from it) for one batch; the
    caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _state_key(adapter: ModelAdapter, cfg: BenchmarkConfig, x: torch.Tensor) -> str:
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "stability_batch_size", "n_examples",
                                                              "n_fidelity", "n_stability", "max_images",
                                                              "max_stability")}
    return hash_json({"cfg": keep, "model": adapter.name, "weights": adapter.weights_hash,
                      "shape": list(x.shape[1:])})[:16]


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _record_usable(rec: dict | None, need: set[str]) -> bool:
    """A stored per-image record answers this run when it has every expensive metric the run needs for that
    image (``computed``; older records without it: a stored non-null score)."""
    if rec is None:
        return False
    have = set(rec.get("computed") or [k for k, v in rec.get("scores", {}).items() if v is not None])
    return need <= have


def _nan_list(v) -> list:
    return [None if not np.isfinite(a) else float(a) for a in np.atleast_1d(np.asarray(v, dtype=float))]


def _write_record(mdir: Path, image_id: str, example: torch.Tensor | None, record: dict) -> None:
    """One image's per-method result (and its example map), each written via a temporary file and renamed."""
    from safetensors.torch import save

    if example is not None:
        atomic_write_bytes(mdir / f"{image_id}.example.safetensors", save({"map": example.contiguous().cpu()}))
    atomic_write_json(mdir / f"{image_id}.json", record)


def run_saliency_benchmark(model: ModelAdapter | nn.Module, images, masks=None, targets=None,
                           methods: str | Sequence[str] | None = "cheap", config: BenchmarkConfig | None = None,
                           state_dir: str | Path | None = None, image_ids: Sequence[str] | None = None,
                           progress: bool = True) -> BenchmarkResult:
    """Score saliency ``methods`` on ``images`` ((N,3,H,W) preprocessed tensor, or images the adapter can
    preprocess) with object ``masks`` ((N,H,W) bool at input resolution, or None: no mask metrics) and
    ``targets`` ((N,) classes; None: predicted). ``state_dir`` makes the run resumable per image."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    cfg = config or BenchmarkConfig()
    adapter = get_adapter(model)
    x_all = _as_tensor_images(adapter, images)
    N, C, H, W = x_all.shape
    if masks is not None:
        masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).bool()
        if masks.shape != (N, H, W):
            raise SaeCafeError(f"masks have shape {tuple(masks.shape)}, expected {(N, H, W)} (one mask per "
                               "image at the model's input resolution)")
    t_all = B.as_target(adapter, x_all, targets if targets is None else torch.as_tensor(targets))
    ids = list(image_ids) if image_ids is not None else [f"{i:06d}" for i in range(N)]
    method_list = resolve_methods(methods)
    n_fid = N if cfg.n_fidelity is None else min(N, cfg.n_fidelity)
    n_fid = n_fid if "fidelity" in cfg.metrics else 0
    n_stab = n_fid if cfg.n_stability is None else min(N, cfg.n_stability)
    n_stab = n_stab if "stability" in cfg.metrics else 0
    n_ex = min(cfg.n_examples, N)
    res = BenchmarkResult(adapter.name, method_list, ids, cfg)
    res.example_images = adapter.denormalize(x_all[:n_ex]).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    state = None
    if state_dir is not None:
        state = Path(state_dir) / _state_key(adapter, cfg, x_all)
        state.mkdir(parents=True, exist_ok=True)
    cheap_metrics = tuple(k for k in cfg.metrics if k not in ("fidelity", "stability"))
    fid_cache: dict[int, torch.Tensor] = {}

    def fidelity_inputs(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsets of image i (drawn from seed and i) and their logit drops. The drops are the same for every
        method, so the perturbed forwards run once per image (cached), not once per method and image."""
        sub = grid_subsets(1, H, W, cfg.n_subsets, cfg.fidelity_grid, cfg.fidelity_frac,
                           _per_image_generator(cfg.seed, i, 1)).to(x_all.device)
        if i not in fid_cache:
            fid_cache[i] = fidelity_deltas(adapter, x_all[i:i + 1], t_all[i:i + 1], sub)[0]
        return sub[0], fid_cache[i]

    def score_batch(method: str, explain_fn, idx: list[int], n_st: int):
        """Maps of images ``idx`` (timed: seconds per image) and every metric of them → (maps, scores, dt)."""
        xb, tb = x_all[idx], t_all[idx]
        t0 = time.perf_counter()
        maps = B.explain(method, adapter, xb, tb)
        dt = (time.perf_counter() - t0) / len(idx)
        mb = masks[idx] if masks is not None else None
        out = evaluate_maps(adapter, xb, tb, maps, mb, metrics=cheap_metrics, steps=cfg.steps)
        fid_rows = [j for j, i in enumerate(idx) if i < n_fid]
        if fid_rows:
            inputs = [fidelity_inputs(idx[j]) for j in fid_rows]
            v = evaluate_maps(adapter, xb[fid_rows], tb[fid_rows], maps[fid_rows], metrics=("fidelity",),
                              fidelity_subsets=torch.stack([u[0] for u in inputs]),
                              fidelity_deltas=torch.stack([u[1] for u in inputs]))["fidelity"]
            out["fidelity"] = torch.full((len(idx),), float("nan"))
            out["fidelity"][fid_rows] = v.cpu().float()
        stab_rows = [j for j, i in enumerate(idx) if i < n_st]
        if stab_rows:
            noise = torch.stack([torch.rand(cfg.n_noise, C, H, W, generator=_per_image_generator(
                cfg.seed, idx[j], 2)) * cfg.noise_radius for j in stab_rows], 1)
            v = evaluate_maps(adapter, xb[stab_rows], tb[stab_rows], maps[stab_rows], metrics=("stability",),
                              explain=explain_fn, stability_noise=noise.to(xb.device), n_noise=cfg.n_noise,
                              explain_batch_size=cfg.stability_batch_size)["stability"]
            out["stability"] = torch.full((len(idx),), float("nan"))
            out["stability"][stab_rows] = v.cpu().float()
        return maps, out, dt

    total = len(method_list) * N
    bar = tqdm(total=total, desc=f"saliency {adapter.name}", unit="map", disable=not progress)
    for method in method_list:
        reason = B.applicability(method, adapter)
        if reason:
            res.not_applicable[method] = reason
            bar.update(N)
            continue
        n_m = min(N, cfg.max_images.get(method, N))
        n_st = min(n_stab, cfg.max_stability.get(method, n_stab))
        sc = {k: np.full(N, np.nan) for k in cfg.metrics}
        cv = {k: np.full((N, cfg.steps + 1), np.nan) for k in CURVES}
        secs = np.full(N, np.nan)
        ex = [None] * n_ex
        mdir = state / method if state else None
        if mdir:
            mdir.mkdir(exist_ok=True)
        todo = []
        for i in range(n_m):
            rec = _read_state(mdir / f"{ids[i]}.json") if mdir else None
            need = {k for k, n_k in (("fidelity", n_fid), ("stability", n_st)) if i < n_k}
            if not _record_usable(rec, need) or (i < n_ex and not (mdir / f"{ids[i]}.example.safetensors").exists()):
                todo.append(i)
                continue
            for k in cfg.metrics:
                if rec["scores"].get(k) is not None and (k not in ("fidelity", "stability") or k in need):
                    sc[k][i] = rec["scores"][k]
            for k in CURVES:
                if rec["curves"].get(k) is not None:
                    cv[k][i] = np.array(rec["curves"][k], dtype=float)
            secs[i] = rec["seconds"]
            if i < n_ex:
                ex[i] = load_file(str(mdir / f"{ids[i]}.example.safetensors"))["map"].numpy()
        bar.update(N - len(todo))
        explain_fn = B.make_explainer(method, adapter)
        try:
            for s in range(0, len(todo), cfg.batch_size):
                idx = todo[s:s + cfg.batch_size]
                # stochastic methods (SmoothGrad's noise) draw from a seed of the batch's first image
                with _seeded_global_rng(_per_image_seed(cfg.seed, idx[0], 3), x_all.device):
                    maps, out, dt = score_batch(method, explain_fn, idx, n_st)
                for j, i in enumerate(idx):
                    for k in cfg.metrics:
                        if k in out:
                            sc[k][i] = float(out[k][j])
                    for k in CURVES:
                        if k in out:
                            cv[k][i] = out[k][j].cpu().numpy()
                    secs[i] = dt
                    if i < n_ex:
                        ex[i] = maps[j].cpu().numpy()
                    if mdir:
                        _write_record(mdir, ids[i], maps[j] if i < n_ex else None, {
                            "scores": {k: _nan_list(sc[k][i])[0] for k in cfg.metrics},
                            "computed": [k for k, n_k in (("fidelity", n_fid), ("stability", n_st)) if i < n_k],
                            "curves": {k: _nan_list(cv[k][i]) if np.isfinite(cv[k][i]).all() else None
                                       for k in CURVES},
                            "seconds": dt, "target": int(t_all[i])})
                bar.update(len(idx))
        except B.NotApplicable as e:
            res.not_applicable[method] = e.reason
            continue
        except (RuntimeError, ValueError, TypeError) as e:  # a library failing on this model: report, go on
            res.errors[method] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        res.scores[method], res.curves[method], res.seconds[method] = sc, cv, secs
        if n_ex and all(e is not None for e in ex):
            res.examples[method] = np.stack(ex)
    bar.close()
    return res


# ------------------------------------------------------------------ outputs -----------------------------------
def plot_curves(res: BenchmarkResult, path: Path) -> None:
    """Mean insertion and deletion curves per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k in zip(axes, CURVES):
        for m, c in res.curves.items():
            v = c[k][np.isfinite(c[k]).all(1)]
            if len(v):
                ax.plot(np.linspace(0, 1, v.shape[1]), v.mean(0), label=m, lw=2.2 if m.startswith("srd") else 1.2)
        ax.set_xlabel("fraction of pixels " + ("inserted" if k.startswith("ins") else "deleted"))
        ax.set_ylabel("p(target)")
        ax.set_title(f"{res.model}: {k.split('_')[0]} (mean over images)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(res: BenchmarkResult, path: Path) -> None:
    """Grid: rows = example images, columns = the image and each method's map (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in res.methods if m in res.examples]
    E = 0 if res.example_images is None else len(res.example_images)
    if not E or not methods:
        return
    fig, axes = plt.subplots(E, len(methods) + 1, figsize=(1.3 * (len(methods) + 1), 1.3 * E), squeeze=False)
    for r in range(E):
        axes[r, 0].imshow(res.example_images[r])
        for c, m in enumerate(methods, 1):
            a = res.examples[m][r]
            lim = float(np.abs(a).max()) or 1.0
            axes[r, c].imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
            if r == 0:
                axes[r, c].set_title(m, fontsize=6, rotation=30)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def write_saliency_benchmark(res: BenchmarkResult, directory: str | Path, config: dict | None = None,
                             upstream: dict | None = None) -> None:
    """Write table.csv, results.json (table + per-image scores), curves.png, examples.png, manifest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rows = res.table()
    write_csv(rows, d / "table.csv")
    per_image = {m: {k: _nan_list(v) for k, v in s.items()} | {"seconds": _nan_list(res.seconds[m])}
                 for m, s in res.scores.items()}
    mean_curves = {m: {k: _nan_list(np.nanmean(c[k], 0)) for k in CURVES} for m, c in res.curves.items()}
    atomic_write_json(d / "results.json", {"model": res.model, "table": [{k: (None if isinstance(v, float) and
                      not np.isfinite(v) else v) for k, v in r.items()} for r in rows],
                      "image_ids": res.image_ids, "per_image": per_image, "mean_curves": mean_curves,
                      "not_applicable": res.not_applicable, "errors": res.errors,
                      "postprocess": METRIC_POSTPROCESS})
    atomic_write_bytes(d / "table.txt", (res.format_table() + "\n").encode())
    plot_curves(res, d / "curves.png")
    plot_examples(res, d / "examples.png")
    write_manifest(d, "saliency", {"benchmark": res.config, **(config or {})}, upstream,
                   model=res.model, methods=res.methods, n_images=len(res.image_ids))


