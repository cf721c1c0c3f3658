"""Saliency benchmark: methods × metrics on images with object masks, resumable per image.

:func:`run_saliency_benchmark` is the Python API (the demo calls it with ``methods="cheap"``);
:func:`write_saliency_benchmark` (:mod:`.outputs`) writes the table (CSV, JSON), plots (PNG) and the manifest
of a stage ``indexes/<run>/saliency/<model>/``.

Two metric definition sets (``BenchmarkConfig.definitions``: ``"source"``, the default, or ``"paper"``;
:mod:`.definitions`, docs/metrics.md) are derived from one set of explanations: every method's map of an
image, the maps of the stability metric's noisy copies and the μ-fidelity logit drops are computed once and
kept in a :class:`~.map_cache.MapCache` (``<state>/maps/<key>/``, key = model, weights, input shape, seed;
in memory without ``state_dir``, or the ``cache`` argument), and a run under the other definitions, or with
other metric settings, only recomputes the metrics. Per-image scores live in
``<state>/<config-hash>/<method>/<id>.json`` (the stage's temporary directory while it runs), so an
interrupted run continues where it stopped.

μ-fidelity subsets and stability noise are drawn per image from ``seed`` and the image index, so every
method is scored on the same subsets and noise. A record missing a metric that a later run needs (more
images for stability, say) is recomputed; the others are reused.
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

from ..artifacts import atomic_write_json, hash_json
from ..errors import SaeCafeError
from ..models import get_adapter
from ..models.base import ModelAdapter
from . import baselines as B
from .definitions import DEFINITIONS, get_definitions
from .map_cache import MapCache
from .metrics import HIGHER_IS_BETTER, METRICS, evaluate_maps, explain_noisy, fidelity_deltas, grid_subsets
from .outputs import CURVES, plot_curves, plot_examples, write_csv, write_saliency_benchmark  # noqa: F401

EXPENSIVE = ("fidelity", "stability")


class BenchmarkConfigError(SaeCafeError):
    """A :class:`BenchmarkConfig` field with a value the benchmark cannot use."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark parameters (docs/metrics.md). ``metrics``: some of :data:`~.metrics.METRICS`;
    ``definitions``: ``"source"`` (each metric as its source defines it) or ``"paper"`` (method_spec §5.2
    post-processing). ``n_fidelity``: the first images get μ-fidelity (None: all); ``n_stability``: the
    first images get stability (None: as ``n_fidelity``); ``max_images``: per-method cap on the images scored
    (e.g. ``{"rise": 50}``; its rows then report fewer images); ``max_stability``: the same for stability
    alone (re-explaining 20 noisy copies is what makes it dear). ``n_subsets``, ``fidelity_grid``,
    ``fidelity_frac``: μ-fidelity's random subsets (whole cells of a grid×grid partition); ``n_noise``,
    ``noise_radius``: stability's U(0, r) noise samples; ``steps``: insertion/deletion steps (None: 16 for
    source, 10 for paper; source needs ≥ 16); ``tolerance``: pointing-game px (None: 15 px at 224, scaled
    by H/224); ``seed``: subsets, noise and stochastic methods. ``batch_size``: images per explanation call;
    ``stability_batch_size``: noisy copies per explanation call; ``n_examples``: maps kept for the figure.
    Invalid values raise :class:`BenchmarkConfigError` when the config is built."""

    metrics: tuple[str, ...] = METRICS
    definitions: str = "source"
    n_fidelity: int | None = 100
    n_stability: int | None = None
    max_images: dict[str, int] = field(default_factory=dict)
    max_stability: dict[str, int] = field(default_factory=dict)
    n_subsets: int = 200
    fidelity_grid: int = 9
    fidelity_frac: float = 0.2
    n_noise: int = 20
    noise_radius: float = 0.1
    steps: int | None = None
    tolerance: float | None = None
    seed: int = 0
    batch_size: int = 8
    stability_batch_size: int = 32
    n_examples: int = 6

    def __post_init__(self):
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        object.__setattr__(self, "metrics", metrics)
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise BenchmarkConfigError(f"BenchmarkConfig.metrics: unknown metric(s) {bad}; valid names: "
                                       f"{', '.join(METRICS)}")
        if self.definitions not in DEFINITIONS:
            raise BenchmarkConfigError(f"BenchmarkConfig.definitions: unknown definition set "
                                       f"{self.definitions!r}; valid: {', '.join(DEFINITIONS)}")
        d = get_definitions(self.definitions)
        if self.steps is not None and self.steps < d.min_steps:
            raise BenchmarkConfigError(f"BenchmarkConfig.steps={self.steps}: the {d.name!r} definitions need at "
                                       f"least {d.min_steps} insertion/deletion steps (None: {d.default_steps})")
        if self.tolerance is not None and not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise BenchmarkConfigError(f"BenchmarkConfig.tolerance={self.tolerance!r}: give pixels >= 0 or None")
        for name in ("n_subsets", "fidelity_grid", "n_noise", "batch_size", "stability_batch_size"):
            if getattr(self, name) < 1:
                raise BenchmarkConfigError(f"BenchmarkConfig.{name}={getattr(self, name)}: must be >= 1")
        for name in ("n_fidelity", "n_stability", "n_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise BenchmarkConfigError(f"BenchmarkConfig.{name}={getattr(self, name)}: must be >= 0")
        if not 0 < self.fidelity_frac <= 1 or self.noise_radius < 0:
            raise BenchmarkConfigError("BenchmarkConfig: fidelity_frac must be in (0, 1] and noise_radius >= 0, "
                                       f"got {self.fidelity_frac}, {self.noise_radius}")

    @property
    def n_steps(self) -> int:
        """Insertion/deletion steps of this config (``steps``, else the definition set's default)."""
        return get_definitions(self.definitions).default_steps if self.steps is None else self.steps


#: fields that choose which images/how they are batched, not what a per-image score is (not in the state key)
_NOT_IN_STATE_KEY = ("batch_size", "stability_batch_size", "n_examples", "n_fidelity", "n_stability",
                     "max_images", "max_stability")


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
    """Per-image scores under ``config.definitions``. ``scores[method][metric]``: (N,) float (NaN = not
    computed or undefined); ``curves[method][insertion_curve|deletion_curve]``: (N, steps+1);
    ``seconds[method]``: (N,) seconds to compute each image's map (the first time: a map from the cache keeps
    its time); ``not_applicable[method]``: reason; ``examples[method]``: (E,H,W)."""

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
    keep = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_STATE_KEY} | {"steps": cfg.n_steps}
    return hash_json({"cfg": keep, "model": adapter.name, "weights": adapter.weights_hash,
                      "shape": list(x.shape[1:])})[:16]


def _maps_key(adapter: ModelAdapter, cfg: BenchmarkConfig, x: torch.Tensor) -> str:
    """Key of the map cache: what the maps depend on (not the metric settings)."""
    return hash_json({"model": adapter.name, "weights": adapter.weights_hash, "shape": list(x.shape[1:]),
                      "seed": cfg.seed})[:16]


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _record_usable(rec: dict | None, need: set[str]) -> bool:
    """A stored per-image record answers this run when it has every expensive metric the run needs for that
    image (``computed``)."""
    return rec is not None and need <= set(rec.get("computed", []))


def _nan_list(v) -> list:
    return [None if not np.isfinite(a) else float(a) for a in np.atleast_1d(np.asarray(v, dtype=float))]


def run_saliency_benchmark(model: ModelAdapter | nn.Module, images, masks=None, targets=None,
                           methods: str | Sequence[str] | None = "cheap", config: BenchmarkConfig | None = None,
                           state_dir: str | Path | None = None, image_ids: Sequence[str] | None = None,
                           progress: bool = True, cache: MapCache | None = None) -> BenchmarkResult:
    """Score saliency ``methods`` on ``images`` ((N,3,H,W) preprocessed tensor, or images the adapter can
    preprocess) with object ``masks`` ((N,H,W) bool at input resolution, or None: no mask metrics) and
    ``targets`` ((N,) classes; None: predicted), under ``config.definitions``. ``state_dir`` makes the run
    resumable per image and keeps the map cache in ``<state_dir>/maps/``; ``cache`` (a :class:`MapCache` of
    this model, weights and seed) overrides it — pass the same one to a run under the other definitions to
    reuse its maps without a state folder."""
    from tqdm import tqdm

    cfg = config or BenchmarkConfig()
    adapter = get_adapter(model)
    x_all = _as_tensor_images(adapter, images)
    N, C, H, W = x_all.shape
    dev = x_all.device
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
    if cache is None:
        cache = MapCache(Path(state_dir) / "maps" / _maps_key(adapter, cfg, x_all) if state_dir is not None
                         else None)
    fkey = hash_json({"n": cfg.n_subsets, "grid": cfg.fidelity_grid, "frac": cfg.fidelity_frac,
                      "seed": cfg.seed})[:12]
    nkey = hash_json({"n": cfg.n_noise, "r": cfg.noise_radius, "seed": cfg.seed})[:12]
    common = {"definitions": cfg.definitions, "steps": cfg.n_steps, "tolerance": cfg.tolerance}
    cheap_metrics = tuple(k for k in cfg.metrics if k not in EXPENSIVE)

    def fidelity_inputs(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsets of image i (drawn from seed and i) and their logit drops. The drops are the same for every
        method and both definition sets, so the perturbed forwards run once per image (cached)."""
        sub = grid_subsets(1, H, W, cfg.n_subsets, cfg.fidelity_grid, cfg.fidelity_frac,
                           _per_image_generator(cfg.seed, i, 1)).to(dev)
        deltas = cache.get_deltas(ids[i], int(t_all[i]), fkey)
        if deltas is None:
            deltas = fidelity_deltas(adapter, x_all[i:i + 1], t_all[i:i + 1], sub)[0]
            cache.put_deltas(ids[i], int(t_all[i]), fkey, deltas)
        return sub[0], deltas.to(dev)

    def maps_of(method: str, idx: list[int]) -> tuple[torch.Tensor, list[float]]:
        """(n, H, W) maps of images ``idx`` from the cache, the missing ones explained (timed) and stored."""
        got = [cache.get_map(method, ids[i], int(t_all[i])) for i in idx]
        missing = [j for j, g in enumerate(got) if g is None]
        if missing:
            mi = [idx[j] for j in missing]
            # stochastic methods (SmoothGrad's noise) draw from a seed of the first image explained
            with _seeded_global_rng(_per_image_seed(cfg.seed, mi[0], 3), dev):
                t0 = time.perf_counter()
                maps = B.explain(method, adapter, x_all[mi], t_all[mi])
                dt = (time.perf_counter() - t0) / len(mi)
            for j, m in zip(missing, maps):
                cache.put_map(method, ids[idx[j]], int(t_all[idx[j]]), m, dt)
                got[j] = (m.detach().float().cpu(), dt)
        return torch.stack([g[0] for g in got]).to(dev), [g[1] for g in got]

    def noisy_maps_of(method: str, explain_fn, idx: list[int]) -> torch.Tensor:
        """(S, n, H, W) raw maps of the noisy copies of images ``idx`` (cached; float16 precision)."""
        got = [cache.get_noisy(method, ids[i], int(t_all[i]), nkey) for i in idx]
        missing = [j for j, g in enumerate(got) if g is None]
        if missing:
            mi = [idx[j] for j in missing]
            noise = torch.stack([torch.rand(cfg.n_noise, C, H, W, generator=_per_image_generator(cfg.seed, i, 2))
                                 * cfg.noise_radius for i in mi], 1)
            with _seeded_global_rng(_per_image_seed(cfg.seed, mi[0], 4), dev):
                raw = explain_noisy(explain_fn, x_all[mi], t_all[mi], noise.to(dev), cfg.stability_batch_size)
            for k, j in enumerate(missing):
                got[j] = cache.put_noisy(method, ids[idx[j]], int(t_all[idx[j]]), nkey, raw[:, k])
        return torch.stack(got, 1).to(dev)

    def score_batch(method: str, explain_fn, idx: list[int], n_st: int):
        """Maps of images ``idx`` and every metric of them → (maps, scores, seconds per image)."""
        xb, tb = x_all[idx], t_all[idx]
        maps, secs = maps_of(method, idx)
        mb = masks[idx] if masks is not None else None
        out = evaluate_maps(adapter, xb, tb, maps, mb, metrics=cheap_metrics, **common)
        fid_rows = [j for j, i in enumerate(idx) if i < n_fid]
        if fid_rows:
            inputs = [fidelity_inputs(idx[j]) for j in fid_rows]
            v = evaluate_maps(adapter, xb[fid_rows], tb[fid_rows], maps[fid_rows], metrics=("fidelity",),
                              fidelity_subsets=torch.stack([u[0] for u in inputs]),
                              fidelity_deltas=torch.stack([u[1] for u in inputs]), **common)["fidelity"]
            out["fidelity"] = torch.full((len(idx),), float("nan"))
            out["fidelity"][fid_rows] = v.cpu().float()
        stab_rows = [j for j, i in enumerate(idx) if i < n_st]
        if stab_rows:
            noisy = noisy_maps_of(method, explain_fn, [idx[j] for j in stab_rows])
            v = evaluate_maps(adapter, xb[stab_rows], tb[stab_rows], maps[stab_rows], metrics=("stability",),
                              stability_maps=noisy, **common)["stability"]
            out["stability"] = torch.full((len(idx),), float("nan"))
            out["stability"][stab_rows] = v.cpu().float()
        return maps, out, secs

    n_curve = cfg.n_steps + 1
    total = len(method_list) * N
    bar = tqdm(total=total, desc=f"saliency {adapter.name} ({cfg.definitions})", unit="map", disable=not progress)
    for method in method_list:
        reason = B.applicability(method, adapter)
        if reason:
            res.not_applicable[method] = reason
            bar.update(N)
            continue
        n_m = min(N, cfg.max_images.get(method, N))
        n_st = min(n_stab, cfg.max_stability.get(method, n_stab))
        sc = {k: np.full(N, np.nan) for k in cfg.metrics}
        cv = {k: np.full((N, n_curve), np.nan) for k in CURVES}
        secs = np.full(N, np.nan)
        ex = [None] * n_ex
        mdir = state / method if state else None
        if mdir:
            mdir.mkdir(exist_ok=True)
        todo = []
        for i in range(n_m):
            rec = _read_state(mdir / f"{ids[i]}.json") if mdir else None
            need = {k for k, n_k in (("fidelity", n_fid), ("stability", n_st)) if i < n_k}
            cached = cache.get_map(method, ids[i], int(t_all[i])) if i < n_ex else None
            if not _record_usable(rec, need) or (i < n_ex and cached is None):
                todo.append(i)
                continue
            for k in cfg.metrics:
                if rec["scores"].get(k) is not None and (k not in EXPENSIVE or k in need):
                    sc[k][i] = rec["scores"][k]
            for k in CURVES:
                if rec["curves"].get(k) is not None:
                    cv[k][i] = np.array(rec["curves"][k], dtype=float)
            secs[i] = rec["seconds"]
            if i < n_ex:
                ex[i] = cached[0].numpy()
        bar.update(N - len(todo))
        explain_fn = B.make_explainer(method, adapter)
        try:
            for s in range(0, len(todo), cfg.batch_size):
                idx = todo[s:s + cfg.batch_size]
                maps, out, dts = score_batch(method, explain_fn, idx, n_st)
                for j, i in enumerate(idx):
                    for k in cfg.metrics:
                        if k in out:
                            sc[k][i] = float(out[k][j])
                    for k in CURVES:
                        if k in out:
                            cv[k][i] = out[k][j].cpu().numpy()
                    secs[i] = dts[j]
                    if i < n_ex:
                        ex[i] = maps[j].cpu().numpy()
                    if mdir:
                        atomic_write_json(mdir / f"{ids[i]}.json", {
                            "definitions": cfg.definitions,
                            "scores": {k: _nan_list(sc[k][i])[0] for k in cfg.metrics},
                            "computed": [k for k, n_k in (("fidelity", n_fid), ("stability", n_st)) if i < n_k],
                            "curves": {k: _nan_list(cv[k][i]) if np.isfinite(cv[k][i]).all() else None
                                       for k in CURVES},
                            "seconds": dts[j], "target": int(t_all[i])})
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


def run_saliency_definitions(model: ModelAdapter | nn.Module, images, masks=None, targets=None,
                             methods: str | Sequence[str] | None = "cheap", config: BenchmarkConfig | None = None,
                             definitions: Sequence[str] = ("source", "paper"), state_dir: str | Path | None = None,
                             image_ids: Sequence[str] | None = None, progress: bool = True
                             ) -> dict[str, BenchmarkResult]:
    """:func:`run_saliency_benchmark` under each definition set, from one set of explanations (one
    :class:`MapCache`: the second set only recomputes the metrics). ``config.steps`` applies to every set;
    leave it None to get each set's default. → {definitions: result}."""
    from dataclasses import replace

    cfg = config or BenchmarkConfig()
    adapter = get_adapter(model)
    x = _as_tensor_images(adapter, images)
    cache = MapCache(Path(state_dir) / "maps" / _maps_key(adapter, cfg, x) if state_dir is not None else None)
    return {d: run_saliency_benchmark(adapter, x, masks, targets, methods, replace(cfg, definitions=d), state_dir,
                                      image_ids, progress, cache) for d in definitions}

