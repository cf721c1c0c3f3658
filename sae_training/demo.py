"""``sae-cafe demo``: one command from nothing to a browsable concept atlas (what ``make demo`` runs).

The demo orchestrates the public APIs of the other packages, stage by stage, into ``<root>/<run>/``::

    world/                     the concept world (sae_cafe.world.write_world), or a user's image folder
    srd/<model>/               SRD saliency maps of a few images (maps.png, maps.safetensors)
    acts/<model>/<layer>/      PFV shards of every layer in one pass (sae_cafe.activations)
    saes/<model>/<layer>/      small sae-lens SAEs + held-out metrics (sae_training.train_sae)
    cafe/<model>/<layer>/      top-k exemplars, iERFs, FAISS, concept cards (sae_cafe.cafe)
    icat/<model>/              concept graphs, routes, correct/misclassified/adversarial cases (sae_cafe.icat)
    saliency/<model>/          saliency benchmark with the cheap baselines (sae_cafe.evaluation)
    demo_report.json           per-stage status, seconds, key metrics and errors of the last run

Incremental: every finished stage's manifest carries ``demo_key``, a hash of the stage's settings and of
the keys and creation times of the stages it reads; a stage whose outputs all carry the current key is
skipped (``--fresh`` rebuilds everything). A stage that fails (missing module, error) is reported with its
error, the stages depending on it are marked blocked, the others still run, and the command exits 1.

Settings come from ``configs/demo.toml`` (or ``--config FILE``, e.g. ``configs/own_model_resnet50.toml``);
the TOML keys are the fields of :class:`DemoConfig` and its sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
REPORT = "demo_report.json"


# ----- configuration --------------------------------------------------------------------------------------
@dataclass
class WorldSettings:
    """The generated concept world (used when ``images`` is not set)."""

    n: int = 400
    seed: int = 0
    size: int = 64


@dataclass
class ExtractSettings:
    """Activation extraction (``sae_cafe.activations.extract_activations``)."""

    batch_size: int = 64
    dtype: str = "float32"
    shard_size: int = 65536
    positions_per_image: int | None = None


@dataclass
class SAESettings:
    """Small SAEs (``sae_training.SAETrainConfig`` fields; ``steps``/``seconds``: first reached stops)."""

    architecture: str = "batchtopk"
    expansion: int = 8
    d_sae: int | None = None  # overrides expansion
    k: float | None = None
    steps: int | None = 400
    seconds: float | None = 25.0
    batch_size: int = 512
    holdout: float = 0.1
    n_checkpoints: int = 0
    seed: int = 0


@dataclass
class CafeSettings:
    """CAFE (``sae_cafe.cafe.CafeConfig`` subset) and the number of concept-card PNGs per layer."""

    k: int = 16
    n_anchor: int | None = 2
    n_sample: int = 16
    index: str = "Flat"
    batch_size: int = 64
    cards: int = 3


@dataclass
class ICATSettings:
    """ICAT graphs on a few dozen images with reduced IG steps, plus the three case studies."""

    n_images: int = 160  # class graphs use per_class × max_classes of them; the cases search all
    steps: int = 8
    per_class: int = 4
    max_classes: int | None = 6  # class graphs of the first N classes present (None: all)
    top_k: int = 5
    max_nodes: int = 8
    attack: str = "pgd"
    eps: float = 8.0  # grey levels / 255
    cases: bool = True


@dataclass
class SaliencySettings:
    """Saliency benchmark (``sae_cafe.evaluation``) on a few dozen images with the cheap baselines."""

    n: int = 12
    n_fidelity: int = 4
    subsets: int = 32
    noise_samples: int = 4
    methods: str = "cheap"
    metrics: list[str] | None = None
    batch_size: int = 8


@dataclass
class ModelSettings:
    """One model: registered name, local weights (None: the shipped/random ones), PFV layers and which
    stages to run for it. ``sae`` overrides :class:`SAESettings` fields for this model."""

    name: str = "mini_resnet"
    weights: str | None = None
    layers: list[str] = field(default_factory=list)
    srd: bool = True
    cafe: bool = True
    icat: bool = True
    saliency: bool = True
    sae: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoConfig:
    """Everything the demo builds. ``images``: a user's folder (flat or ImageFolder) instead of the world;
    ``labels``: ``"folder"`` (sorted class-folder index, the torchvision ImageFolder/ImageNet convention),
    ``"class_names"`` (folder names matched to the model's class names) or ``"predicted"``;
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``."""

    run: str = "demo"
    root: str = "indexes"
    device: str = "auto"
    threads: int | None = None
    images: str | None = None
    max_images: int | None = None
    labels: str = "class_names"
    srd_images: int = 6
    world: WorldSettings = field(default_factory=WorldSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    sae: SAESettings = field(default_factory=SAESettings)
    cafe: CafeSettings = field(default_factory=CafeSettings)
    icat: ICATSettings = field(default_factory=ICATSettings)
    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    models: list[ModelSettings] = field(default_factory=list)


def _from_dict(cls, data: dict[str, Any], where: str):
    from sae_cafe.errors import SaeCafeError

    if not isinstance(data, dict):
        raise SaeCafeError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SaeCafeError(f"{where}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    kw = {}
    for name, value in data.items():
        sub = {"world": WorldSettings, "extract": ExtractSettings, "sae": SAESettings, "cafe": CafeSettings,
               "icat": ICATSettings, "saliency": SaliencySettings}.get(name) if cls is DemoConfig else None
        if sub is not None:
            value = _from_dict(sub, value, f"{where} [{name}]")
        elif cls is DemoConfig and name == "models":
            value = [_from_dict(ModelSettings, m, f"{where} [[models]] #{i + 1}")
                     for i, m in enumerate(value)]
        kw[name] = value
    return cls(**kw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DemoConfig:
    """Read a demo TOML (default ``configs/demo.toml``; built-in defaults if it is missing)."""
    from sae_cafe.errors import SaeCafeError

    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    data: dict[str, Any] = {}
    p = Path(path) if path is not None else DEFAULT_CONFIG
    if p.exists():
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SaeCafeError(f"{p}: not valid TOML ({e}); fix the file") from e
    elif path is not None:
        raise SaeCafeError(f"config file {p} does not exist; see configs/demo.toml for the format")
    cfg = _from_dict(DemoConfig, data, str(p))
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    if not cfg.models:
        cfg.models = [ModelSettings("mini_resnet", layers=["layer2", "layer3", "layer4"]),
                      ModelSettings("mini_vit", layers=["3"], icat=False, saliency=False)]
    for m in cfg.models:
        if not m.layers:
            raise SaeCafeError(f"{p}: model {m.name!r} has no layers; give layers = [...] (PFV layer ids)")
        if m.weights:
            m.weights = str(_resolve(m.weights, p))
        bad = sorted(set(m.sae) - {f.name for f in dataclasses.fields(SAESettings)})
        if bad:
            raise SaeCafeError(f"{p}: model {m.name!r}: unknown sae keys {bad}")
    if cfg.images:
        cfg.images = str(_resolve(cfg.images, p))
    if cfg.labels not in ("folder", "class_names", "predicted"):
        raise SaeCafeError(f"{p}: labels must be 'folder', 'class_names' or 'predicted', got {cfg.labels!r}")
    return cfg


def _resolve(value: str, config_path: Path) -> Path:
    """``~`` expanded; a relative path is taken relative to the working directory if it exists there, else
    relative to the config file."""
    q = Path(os.path.expanduser(value))
    if q.is_absolute() or q.exists():
        return q
    alt = config_path.parent / q
    return alt if alt.exists() else q


# ----- stages ---------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One step of the pipeline: ``outputs()`` (stage directories), ``build()`` → key metrics."""

    name: str
    deps: list[str]
    config: dict[str, Any]
    outputs: Callable[[], list[Path]]
    build: Callable[[], dict[str, Any]]
    reuse: Callable[[list[Path]], bool] | None = None  # accept finished outputs without our key


@dataclass
class StageResult:
    name: str
    status: str  # built | skipped | failed | blocked
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    key: str | None = None
    stamps: list[str] = field(default_factory=list)


def _stamp(directory: Path, key: str, metrics: dict[str, Any]) -> None:
    """Record ``demo_key`` and the stage's key metrics in a finished stage's manifest (re-written by the one
    manifest writer, every other field and the creation time kept)."""
    from sae_cafe.artifacts import read_manifest, write_manifest

    m = read_manifest(directory)
    core = ("kind", "schema_version", "config", "upstream", "package_version")
    extra = {k: v for k, v in m.items() if k not in core}
    extra.update(demo_key=key, demo_metrics=metrics)
    upstream = {k: v["path"] for k, v in (m.get("upstream") or {}).items()
                if isinstance(v, dict) and "path" in v}
    write_manifest(directory, m["kind"], m["config"], upstream, **extra)


def _stamp_of(directory: Path) -> dict[str, Any] | None:
    from sae_cafe.artifacts import read_manifest
    from sae_cafe.errors import ArtifactError

    try:
        return read_manifest(directory)
    except ArtifactError:
        return None


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


class Pipeline:
    """Runs stages in order with skip/fail/block bookkeeping and timing."""

    def __init__(self, fresh: bool, console):
        self.fresh, self.console = fresh, console
        self.results: dict[str, StageResult] = {}

    def run(self, stage: Stage) -> StageResult:
        from sae_cafe.artifacts import hash_json

        bad = [d for d in stage.deps if d in self.results and self.results[d].status in ("failed", "blocked")]
        if bad:
            r = StageResult(stage.name, "blocked", error=f"needs {', '.join(bad)}")
            self.results[stage.name] = r
            self.console.print(f"[yellow]- {stage.name}: blocked (needs {', '.join(bad)})")
            return r
        t0 = time.perf_counter()
        r = StageResult(stage.name, "built")
        try:
            outs = stage.outputs()
            dep_info = {d: {"key": self.results[d].key, "stamps": self.results[d].stamps}
                        for d in stage.deps if d in self.results}
            key = hash_json({"stage": stage.name, "config": stage.config, "deps": dep_info})
            r.key, r.outputs = key, [str(o) for o in outs]
            manifests = [_stamp_of(o) for o in outs]
            if not self.fresh and manifests and all(m is not None for m in manifests) and (
                    all(m.get("demo_key") == key for m in manifests)
                    or (stage.reuse is not None and stage.reuse(outs))):
                r.status = "skipped"
                r.metrics = dict(manifests[0].get("demo_metrics") or {})
                if any(m.get("demo_key") != key for m in manifests):
                    for o in outs:
                        _stamp(o, key, r.metrics)
                self.console.print(f"[dim]- {stage.name}: up to date, skipped")
            else:
                self.console.rule(f"[bold]{stage.name}")
                r.metrics = stage.build() or {}
                for o in outs:
                    _stamp(o, key, r.metrics)
            r.stamps = [(_stamp_of(o) or {}).get("created_at", "") for o in outs]
        except Exception as e:  # noqa: BLE001 - a failing stage is reported, the others go on
            r.status, r.error = "failed", _short_error(e)
            r.metrics = {"traceback": traceback.format_exc()}
            self.console.print(f"[red]- {stage.name}: failed: {r.error}")
        r.seconds = time.perf_counter() - t0
        self.results[stage.name] = r
        return r


# ----- the demo -------------------------------------------------------------------------------------------
class Demo:
    """Builds the stage list of a :class:`DemoConfig` and runs it."""

    def __init__(self, cfg: DemoConfig, fresh: bool = False, console=None):
        from rich.console import Console

        self.cfg, self.fresh = cfg, fresh
        self.console = console or Console(stderr=False)
        self.root = Path(cfg.root)
        self.run_dir = self.root / cfg.run
        self.device = self._device(cfg.device)
        self._adapters: dict[str, Any] = {}
        self._world = None
        self._folder_files: list[tuple[Path, str | None]] | None = None

    @staticmethod
    def _device(spec: str) -> str:
        import torch

        if spec == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return spec

    # --- shared inputs ---
    def adapter(self, m: ModelSettings):
        if m.name not in self._adapters:
            from sae_cafe.models import load_model

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*no weights file given.*")
                self._adapters[m.name] = load_model(m.name, weights=m.weights, device=self.device)
        return self._adapters[m.name]

    def layers(self, m: ModelSettings) -> list[str]:
        ad = self.adapter(m)
        return list(dict.fromkeys(ad.resolve_layer(n) for n in m.layers))

    def stage_dir(self, kind: str, *parts: str) -> Path:
        from sae_cafe.artifacts import stage_path

        if kind == "srd":  # not an artifact kind of its own: a PNG + tensors next to the stages
            return self.run_dir / "srd" / parts[0]
        return stage_path(self.cfg.run, kind, *parts, root=self.root)

    def world(self):
        if self._world is None:
            from sae_cafe.world import load_world

            self._world = load_world(self.stage_dir("world"))
        return self._world

    def image_folder(self) -> Path:
        return Path(self.cfg.images) if self.cfg.images else self.stage_dir("world") / "images"

    def folder_files(self) -> list[tuple[Path, str | None]]:
        """(path, class folder) of the images used, in the sorted folder order every stage sees."""
        if self._folder_files is None:
            from sae_cafe.images import iter_image_files

            files = iter_image_files(self.image_folder())
            if self.cfg.max_images:
                files = files[: self.cfg.max_images]
            self._folder_files = files
        return self._folder_files

    def image_source(self):
        """What extraction and CAFE read: the folder itself (so viewers find the images) unless limited."""
        if self.cfg.images and self.cfg.max_images:
            return [p for p, _ in self.folder_files()]
        return self.image_folder()

    def images_fingerprint(self) -> Any:
        if not self.cfg.images:
            return {"world": dataclasses.asdict(self.cfg.world)}
        from sae_cafe.artifacts import hash_json

        files = self.folder_files()
        return {"folder": self.cfg.images, "n": len(files),
                "hash": hash_json([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p, _ in files])}

    def weights_id(self, m: ModelSettings) -> Any:
        p = Path(m.weights) if m.weights else None
        if p is None:
            from sae_cafe.models import mini

            p = mini.weights_path(m.name) if m.name in mini.MINI_ARCHS else None
        if p is None or not p.exists():
            return {"weights": str(p) if p else None}
        st = p.stat()
        return {"weights": str(p), "size": st.st_size, "mtime": st.st_mtime_ns}

    def labelled_images(self, n: int, adapter) -> tuple[Any, Any, Any, list[str]]:
        """First ``n`` images: (preprocessed x (n,3,H,W), labels (n,) long, masks (n,H,W) bool or None,
        ids)."""
        import numpy as np
        import torch

        if not self.cfg.images:
            w = self.world().world
            k = min(n, len(w))
            x = adapter.preprocess([w.images[i] for i in range(k)])
            ids = [f"{i:06d}" for i in range(k)]
            return x, torch.as_tensor(w.labels[:k]).long(), w.instance[:k] == 1, ids
        from sae_cafe.evaluation.cli import load_folder_data, mask_through_preprocess

        files = self.folder_files()[:n]
        images, masks, _, ids, _ = load_folder_data(self.cfg.images, n, adapter.class_names)
        x = adapter.preprocess(list(images))
        if masks is not None:
            masks = np.stack([m if m.shape == tuple(x.shape[-2:]) and adapter.resize is None
                              else mask_through_preprocess(adapter, m) for m in masks])
        labels = self._labels(files, adapter, x)
        return x, labels, masks, ids

    def _labels(self, files, adapter, x):
        """Labels of user images by ``cfg.labels``: class-folder index, model class name, or prediction."""
        import torch

        from sae_cafe.errors import SaeCafeError

        classes = [c for _, c in files]
        if self.cfg.labels == "folder":
            if any(c is None for c in classes):
                raise SaeCafeError(f"{self.image_folder()}: labels = 'folder' needs an ImageFolder layout "
                                   "(one sub-folder per class); use labels = 'predicted' for a flat folder")
            names = sorted(d.name for d in self.image_folder().iterdir() if d.is_dir())  # torchvision order
            return torch.tensor([names.index(c) for c in classes])
        if self.cfg.labels == "class_names":
            names = adapter.class_names or []
            if not all(c in names for c in classes):
                shown = sorted(set(map(str, classes)))[:4]
                raise SaeCafeError(f"{self.image_folder()}: class folders {shown} are not class names of "
                                   f"{adapter.name}; set labels = 'folder' or 'predicted'")
            return torch.tensor([names.index(c) for c in classes])
        with torch.no_grad():
            return torch.cat([adapter.model(x[i:i + 64].to(self.device)).argmax(1).cpu()
                              for i in range(0, len(x), 64)])

    # --- stage builders ---
    def stages(self) -> list[Stage]:
        cfg = self.cfg
        out: list[Stage] = []
        img_dep: list[str] = []
        if not cfg.images:
            out.append(Stage("world", [], {"world": cfg.world}, lambda: [self.stage_dir("world")],
                             self.build_world, reuse=self._world_matches))
            img_dep = ["world"]
        imgs = self.images_fingerprint() if cfg.images else None
        for m in cfg.models:
            base = {"model": m.name, "weights": self.weights_id(m), "images": imgs, "device": self.device}
            if m.srd:
                out.append(Stage(f"srd/{m.name}", img_dep, {**base, "n": cfg.srd_images},
                                 lambda m=m: [self.stage_dir("srd", m.name)], lambda m=m: self.build_srd(m)))
            out.append(Stage(f"acts/{m.name}", img_dep, {**base, "layers": m.layers, "extract": cfg.extract,
                                                         "max_images": cfg.max_images},
                             lambda m=m: [self.stage_dir("acts", m.name, n) for n in self.layers(m)],
                             lambda m=m: self.build_acts(m)))
        for m in cfg.models:
            for layer in m.layers:
                sae_cfg = dataclasses.replace(cfg.sae, **m.sae)
                out.append(Stage(f"saes/{m.name}/{layer}", [f"acts/{m.name}"], {"sae": sae_cfg},
                                 lambda m=m, layer=layer: [self.stage_dir("saes", m.name, self.adapter(m)
                                                                          .resolve_layer(layer))],
                                 lambda m=m, layer=layer, c=sae_cfg: self.build_sae(m, layer, c)))
        for m in cfg.models:
            if not m.cafe:
                continue
            for layer in m.layers:
                out.append(Stage(f"cafe/{m.name}/{layer}", [f"saes/{m.name}/{layer}", *img_dep],
                                 {"cafe": cfg.cafe, "images": imgs, "max_images": cfg.max_images},
                                 lambda m=m, layer=layer: [self.stage_dir("cafe", m.name, self.adapter(m)
                                                                          .resolve_layer(layer))],
                                 lambda m=m, layer=layer: self.build_cafe(m, layer)))
        for m in cfg.models:
            if m.icat:
                deps = [f"saes/{m.name}/{n}" for n in m.layers] + [f"cafe/{m.name}/{n}" for n in m.layers
                                                                   if m.cafe] + img_dep
                out.append(Stage(f"icat/{m.name}", deps, {"icat": cfg.icat, "labels": cfg.labels},
                                 lambda m=m: [self.stage_dir("icat", m.name)],
                                 lambda m=m: self.build_icat(m)))
        for m in cfg.models:
            if m.saliency:
                out.append(Stage(f"saliency/{m.name}", img_dep,
                                 {"model": m.name, "weights": self.weights_id(m), "images": imgs,
                                  "saliency": cfg.saliency, "labels": cfg.labels},
                                 lambda m=m: [self.stage_dir("saliency", m.name)],
                                 lambda m=m: self.build_saliency(m)))
        return out

    def _world_matches(self, outs: list[Path]) -> bool:
        """Reuse a world exported by ``sae-cafe make-world`` with the same n, seed and size."""
        from sae_cafe.artifacts import read_manifest

        c = read_manifest(outs[0], "world")["config"]
        w = self.cfg.world
        return c.get("n") == w.n and c.get("seed") == w.seed and (c.get("world") or {}).get("size") == w.size

    def build_world(self) -> dict[str, Any]:
        from sae_cafe.world import WorldConfig, write_world

        w = self.cfg.world
        self._world = None
        path = write_world(self.cfg.run, n=w.n, seed=w.seed, config=WorldConfig(size=w.size), root=self.root)
        return {"images": w.n, "examples_png": str(path / "examples.png")}

    def build_srd(self, m: ModelSettings) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        from sae_cafe.artifacts import stage_dir, write_manifest
        from sae_cafe.srd import srd_saliency
        from sae_cafe.viz import save_map_grid

        ad = self.adapter(m)
        x, labels, _, ids = self.labelled_images(self.cfg.srd_images, ad)
        x = x.to(self.device)
        with torch.no_grad():
            pred = ad.model(x).argmax(1)
        t0 = time.perf_counter()
        maps = srd_saliency(ad, x, pred).detach().float().cpu()
        sec = (time.perf_counter() - t0) / len(x)
        names = ad.class_names or [str(i) for i in range(int(pred.max()) + 1)]
        titles = [f"{i}: {names[int(p)]}"[:22] for i, p in zip(ids, pred.tolist())]
        with stage_dir(self.stage_dir("srd", m.name)) as d:
            save_file({"saliency": maps.contiguous(), "target": pred.cpu().contiguous()},
                      str(d / "maps.safetensors"), metadata={"model": m.name, "images": ",".join(ids)})
            save_map_grid(d / "maps.png", ad.denormalize(x).cpu(), [maps], ["SRD saliency"], titles)
            write_manifest(d, "srd", {"n": len(x), "contrast": "mean", "target": "predicted"}, None,
                           model=m.name, image_ids=ids, labels=labels.tolist(), predicted=pred.tolist())
        return {"maps": len(x), "sec_per_map": round(sec, 3),
                "png": str(self.stage_dir("srd", m.name) / "maps.png")}

    def build_acts(self, m: ModelSettings) -> dict[str, Any]:
        from sae_cafe.activations import ShardReader, extract_activations

        ad = self.adapter(m)
        e = self.cfg.extract
        dirs = extract_activations(ad, self.image_source(), self.layers(m), run=self.cfg.run, root=self.root,
                                   dtype=e.dtype, shard_size=e.shard_size, batch_size=e.batch_size,
                                   positions_per_image=e.positions_per_image, overwrite=True,
                                   dataset="concept world" if not self.cfg.images else self.cfg.images)
        out = {}
        for layer, d in dirs.items():
            r = ShardReader(d)
            out[layer] = f"{r.n:,} PFVs × {r.d_in} ({r.n_images} images)"
        return out

    def build_sae(self, m: ModelSettings, layer: str, s: SAESettings) -> dict[str, Any]:
        from sae_training.train import SAETrainConfig, train_sae

        ad = self.adapter(m)
        name = ad.resolve_layer(layer)
        cfg = SAETrainConfig(**dataclasses.asdict(s), device=self.device)  # same field names
        res = train_sae(self.stage_dir("acts", m.name, name), self.stage_dir("saes", m.name, name),
                        config=cfg, overwrite=True, resume=not self.fresh)
        ev, tr = res.get("eval", {}), res["training"]
        return {"d_sae": tr.get("d_sae"), "steps": tr.get("steps"),
                "train_s": round(float(tr.get("train_seconds") or 0), 1),
                "explained_variance": _round(ev.get("explained_variance")), "l0": _round(ev.get("l0")),
                "dead_fraction": _round(ev.get("dead_fraction"))}

    def build_cafe(self, m: ModelSettings, layer: str) -> dict[str, Any]:
        from sae_cafe.cafe import build_cafe, concept_card
        from sae_cafe.saes import load_sae

        ad = self.adapter(m)
        name = ad.resolve_layer(layer)
        sae_dir = self.stage_dir("saes", m.name, name)
        sae = load_sae(sae_dir, ad, name, device=self.device)
        c = self.cfg.cafe
        attributes = None
        if not self.cfg.images:  # per-latent attribute purity, aligned with the folder order
            import numpy as np

            order = np.array([int(p.stem) for p, _ in self.folder_files()])
            attributes = {k: v[order] for k, v in self.world().world.attribute_maps().items()}
        out = self.stage_dir("cafe", m.name, name)
        cafe = build_cafe(ad, sae, name, self.image_source(), out_dir=out, k=c.k, n_anchor=c.n_anchor,
                          n_sample=c.n_sample, index=c.index, batch_size=c.batch_size, attributes=attributes,
                          upstream={"sae": sae_dir}, extra_manifest={"sae_path": str(sae_dir)})
        cards = []
        freq = cafe.latents["firing_frequency"].float()
        # cards of the most frequent latents that are not dense (dense ones show nothing specific)
        order = freq.argsort(descending=True).tolist()
        picked = [s for s in order if 0 < freq[s] <= 0.2][: c.cards] or order[: c.cards]
        for s in picked:
            card = concept_card(cafe, s, model=ad, png=out / "cards" / f"latent_{s:05d}.png")
            cards.append(str(card.get("png", "")))
        man = cafe.manifest
        return {"latents": man.get("n_latents"), "exemplars": man.get("n_exemplars"),
                "ierf_per_s": _round(man.get("timings", {}).get("ierf_per_s"), 1), "cards": len(cards),
                "card_png": cards[0] if cards else None}

    def build_icat(self, m: ModelSettings) -> dict[str, Any]:
        from sae_cafe.icat import GraphConfig, ICATConfig, build_icat
        from sae_cafe.saes import load_sae

        ad = self.adapter(m)
        layers = self.layers(m)
        saes = {n: load_sae(self.stage_dir("saes", m.name, n), ad, n, device=self.device) for n in layers}
        s = self.cfg.icat
        x, labels, _, _ = self.labelled_images(s.n_images, ad)
        cfg = ICATConfig(layers=layers, graph=GraphConfig(steps=s.steps, top_k=s.top_k,
                                                          max_nodes_per_layer=s.max_nodes),
                         max_images_per_class=s.per_class, attack=s.attack, eps=s.eps / 255, cases=s.cases)
        classes = sorted(set(labels.tolist()))[: s.max_classes] if s.max_classes else None
        out = build_icat(ad, saes, x.to(self.device), labels, self.cfg.run, root=self.root, steps=s.steps,
                         config=cfg, model_name=m.name, classes=classes)
        man = json.loads((out / "manifest.json").read_text())
        cases = json.loads((out / "cases.json").read_text()) if (out / "cases.json").exists() else {}
        return {"images": man.get("n_images"), "accuracy": _round(man.get("accuracy")),
                "class_graphs": len(man.get("classes", [])), "cases": sorted(cases),
                "adversarial_flipped": cases.get("adversarial", {}).get("flipped")}

    def build_saliency(self, m: ModelSettings) -> dict[str, Any]:
        from sae_cafe.artifacts import publish_stage
        from sae_cafe.evaluation import BenchmarkConfig, run_saliency_benchmark, write_saliency_benchmark
        from sae_cafe.evaluation.metrics import METRICS

        ad = self.adapter(m)
        s = self.cfg.saliency
        x, labels, masks, ids = self.labelled_images(s.n, ad)
        bcfg = BenchmarkConfig(metrics=tuple(s.metrics) if s.metrics else METRICS, n_fidelity=s.n_fidelity,
                               n_subsets=s.subsets, n_noise=s.noise_samples, batch_size=s.batch_size)
        final = self.stage_dir("saliency", m.name)
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        res = run_saliency_benchmark(ad, x.to(self.device), masks, labels, s.methods, bcfg,
                                     state_dir=tmp / "per_image", image_ids=ids)
        upstream = {"world": self.stage_dir("world")} if not self.cfg.images else None
        write_saliency_benchmark(res, tmp, {"model": m.name, "weights": m.weights, "n": len(ids),
                                            "methods": s.methods, "demo": True}, upstream)
        publish_stage(tmp, final)
        self.console.print(res.format_table())
        rows = {r["method"]: r for r in res.table()}
        srd = rows.get("srd", {})
        loc = {k: _finite(r.get("localisation_mean")) for k, r in rows.items() if r["status"] == "ok"}
        return {"methods": len(rows), "ok": sum(r["status"] == "ok" for r in rows.values()),
                "srd_pointing": _round(srd.get("pointing_mean")),
                "srd_localisation": _round(srd.get("localisation_mean")),
                "srd_insertion": _round(srd.get("insertion_mean")),
                "best_localisation": max(((v, k) for k, v in loc.items() if v >= 0), default=(None, None))[1],
                "table": str(final / "table.csv")}

    # --- run ---
    def run(self) -> int:
        import torch

        if self.cfg.threads:
            torch.set_num_threads(int(self.cfg.threads))
        self.console.print(f"[bold]sae-cafe demo[/bold] → {self.run_dir}  (device {self.device}, "
                           f"{torch.get_num_threads()} CPU threads{', fresh' if self.fresh else ''})")
        pipe = Pipeline(self.fresh, self.console)
        t0 = time.perf_counter()
        try:
            stages = self.stages()
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable image folder
            self.console.print(f"[red]cannot plan the demo: {_short_error(e)}")
            raise
        for st in stages:
            pipe.run(st)
        total = time.perf_counter() - t0
        self.report(pipe, total)
        return 0 if all(r.status in ("built", "skipped") for r in pipe.results.values()) else 1

    def report(self, pipe: Pipeline, total: float) -> None:
        from rich.table import Table

        from sae_cafe.artifacts import atomic_write_json

        colour = {"built": "green", "skipped": "dim", "failed": "red", "blocked": "yellow"}
        t = Table(title=f"sae-cafe demo: stages ({total:.1f} s in all)")
        for col in ("stage", "status", "seconds", "key metrics / error"):
            t.add_column(col, justify="right" if col == "seconds" else "left", overflow="fold")
        for r in pipe.results.values():
            info = r.error if r.error else _fmt_metrics(r.metrics)
            t.add_row(r.name, f"[{colour[r.status]}]{r.status}", f"{r.seconds:.1f}", info)
        self.console.print(t)
        failed = [r for r in pipe.results.values() if r.status == "failed"]
        blocked = [r for r in pipe.results.values() if r.status == "blocked"]
        built = [r for r in pipe.results.values() if r.status in ("built", "skipped")]
        self.console.print(f"[bold]Summary[/bold]: {len(built)} stages ready, {len(failed)} failed, "
                           f"{len(blocked)} blocked; artifacts under {self.run_dir}/")
        kinds: dict[str, list[str]] = {}
        for r in built:
            kinds.setdefault(r.name.split("/")[0], []).append("/".join(r.name.split("/")[1:]) or ".")
        for k, names in kinds.items():
            self.console.print(f"  {k + '/':<10} {', '.join(names)}")
        for r in failed:
            self.console.print(f"[red]  failed {r.name}: {r.error}")
        atomic_write_json(self.run_dir / REPORT, {
            "run": self.cfg.run, "root": str(self.root), "device": self.device, "total_seconds": total,
            "config": self.cfg, "stages": [dataclasses.asdict(r) for r in pipe.results.values()]})
        if built:
            self.console.print(f"Open the viewer:  [bold]sae-cafe view {self.run_dir}[/bold]")
        if failed or blocked:
            self.console.print(f"[red]demo incomplete: see the table above and {self.run_dir / REPORT}")


def _finite(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v == v and abs(v) != float("inf") else -1.0


def _round(v: Any, nd: int = 3) -> Any:
    return round(float(v), nd) if isinstance(v, (int, float)) and v is not None else v


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if k == "traceback" or v is None or (isinstance(v, str) and k.endswith(("png", "table"))):
            continue
        if isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


# ----- CLI ------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="build a complete concept atlas in one command (world, SRD, SAEs, CAFE, ICAT, "
                     "benchmark)",
        description="Generate the concept world (or reuse it), extract activations of the shipped mini "
                    "models, train small SAEs, build CAFE, ICAT graphs and the saliency benchmark into "
                    "<root>/<run>/, then print a per-stage timing table. Finished stages are skipped "
                    "unless their inputs or settings changed. With --config FILE the same pipeline runs on "
                    "your model and images.")
    p.add_argument("--config", default=None, help="demo TOML: model, weights, images, layers, SAE sizes… "
                   "(default configs/demo.toml)")
    p.add_argument("--root", default=None, help="artifact root (default from the config: indexes)")
    p.add_argument("--run", default=None, help="run name (default from the config: demo)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default from the config: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fresh", action="store_true", help="rebuild every stage")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, {"root": args.root, "run": args.run, "device": args.device,
                                    "threads": args.threads})
    return Demo(cfg, fresh=args.fresh).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m sae_training.demo`` (same as ``sae-cafe demo``)."""
    parser = argparse.ArgumentParser(prog="sae-cafe")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
