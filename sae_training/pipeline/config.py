"""The run config of the pipeline (``sae-cafe demo``) and its TOML loader.

:class:`RunConfig` (alias ``DemoConfig``) is built from the stages' own frozen settings
(:class:`~.world.WorldSettings`, :class:`~.extract.ExtractSettings`, :class:`~.sae.SAESettings`,
:class:`~.cafe.CafeSettings`, :class:`~.icat.ICATSettings`, :class:`~.saliency.SaliencySettings`) plus one
:class:`ModelSettings` per model. The TOML keys are the field names; every section is optional. The shipped
configs are package data (``sae_training/pipeline/configs/*.toml``), found with ``importlib.resources``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sae_cafe.errors import SaeCafeError
from sae_cafe.labels import LABEL_MODES

from .cafe import CafeSettings
from .extract import ExtractSettings
from .icat import ICATSettings
from .sae import SAESettings
from .saliency import SaliencySettings
from .sources import is_generated
from .world import WorldSettings

DEFAULT_CONFIG_NAME = "demo.toml"
LABEL_POLICIES = LABEL_MODES  # the one label policy of sae_cafe.labels
TARGETS = ("class", "mean_direction")  # ModelSettings.target


@dataclass(frozen=True)
class ModelSettings:
    """One model of the run."""

    name: str = "mini_resnet"
    """registered model name (``sae_cafe.models.load_model``)"""
    weights: str | None = None
    """local weights file (None: the shipped weights of a mini model; random for others, with a warning)"""
    layers: tuple[str, ...] = ()
    """PFV layer ids (module paths, or ViT block indices)"""
    srd: bool = True
    """build the SRD maps stage"""
    cafe: bool = True
    """build a CAFE atlas per layer"""
    icat: bool = True
    """build the ICAT graphs and cases"""
    saliency: bool = True
    """run the saliency benchmark"""
    sae: dict[str, Any] = field(default_factory=dict)
    """:class:`SAESettings` fields overridden for this model"""
    target: str = "class"
    """what the SRD maps and ICAT's last edge explain: class (the predicted class logit; a model with
    classes) | mean_direction (⟨output, d⟩ with d the unit mean output over the run's first images: the
    target of a headless backbone, whose output is a pooled feature vector)"""


@dataclass(frozen=True)
class RunConfig:
    """Everything one pipeline run builds into ``<root>/<run>/``."""

    run: str = "demo"
    """run name: artifacts under <root>/<run>/"""
    root: str = "indexes"
    """artifact root"""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda"""
    threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    images: str | None = None
    """a user's image folder (flat or ImageFolder) instead of the generated world, or a generated source
    written into <root>/<run>/images/: skimage_crops:N[:SIZE] (``sae_training.pipeline.sources``)"""
    max_images: int | None = None
    """use N images of the folder, spread over the class folders (round-robin; evenly over a flat folder)"""
    labels: str = "class_names"
    """labels of a user's images (``sae_cafe.labels``): class_names (class folders are the model's class names;
    any other folder is an error) | folder (the folder names are the class vocabulary: the model's class ids
    when they are its class names, else the stages that need model classes use the predictions, and say so) |
    predicted (the model's predictions)"""
    class_names: str | None = None
    """a local class-names file (one name per line, or JSON list / {index: name} / {index: [aliases]}, e.g.
    imagenet_class_index.json for ImageNet synset folders) that replaces the model's class names"""
    srd_images: int = 6
    """images in the SRD grid, spread across the classes"""
    world: WorldSettings = field(default_factory=WorldSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    sae: SAESettings = field(default_factory=SAESettings)
    cafe: CafeSettings = field(default_factory=CafeSettings)
    icat: ICATSettings = field(default_factory=ICATSettings)
    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    models: tuple[ModelSettings, ...] = ()
    """the models (default: mini_resnet layers 2-4 and mini_vit block 3)"""


DemoConfig = RunConfig  # the name used before the pipeline became a package
SECTIONS = {"world": WorldSettings, "extract": ExtractSettings, "sae": SAESettings, "cafe": CafeSettings,
            "icat": ICATSettings, "saliency": SaliencySettings}
DEFAULT_MODELS = (ModelSettings("mini_resnet", layers=("layer2", "layer3", "layer4")),
                  ModelSettings("mini_vit", layers=("3",), icat=False, saliency=False))


def config_files() -> dict[str, Any]:
    """The shipped run configs: file name → ``importlib.resources`` traversable (works from a wheel)."""
    root = resources.files("sae_training.pipeline").joinpath("configs")
    return {p.name: p for p in root.iterdir() if p.name.endswith(".toml")}


def default_config_path():
    """The packaged ``demo.toml`` (an ``importlib.resources`` traversable)."""
    return resources.files("sae_training.pipeline").joinpath("configs", DEFAULT_CONFIG_NAME)


def _from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise SaeCafeError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SaeCafeError(f"{where}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    kw = {}
    for name, value in data.items():
        sub = SECTIONS.get(name) if cls is RunConfig else None
        if sub is not None:
            value = _from_dict(sub, value, f"{where} [{name}]")
        elif cls is RunConfig and name == "models":
            if not isinstance(value, list):
                raise SaeCafeError(f"{where}: models must be an array of tables ([[models]])")
            value = tuple(_from_dict(ModelSettings, m, f"{where} [[models]] #{i + 1}") for i, m in enumerate(value))
        elif isinstance(value, list):
            value = tuple(value)
        kw[name] = value
    return cls(**kw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run TOML (default: the packaged ``demo.toml``); ``overrides``: top-level fields (None values
    are ignored). Relative paths in the file are taken relative to the working directory if they exist
    there, else relative to the file."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    if path is None:
        src, where, base = default_config_path(), f"(packaged) {DEFAULT_CONFIG_NAME}", None
        if not src.is_file():
            raise SaeCafeError(f"the packaged default config {DEFAULT_CONFIG_NAME} is missing from "
                               "sae_training/pipeline/configs/; reinstall sae-cafe or pass --config FILE")
        text = src.read_text()
    else:
        p = Path(path)
        if not p.is_file():
            raise SaeCafeError(f"config file {p} does not exist; see configs/demo.toml for the format")
        text, where, base = p.read_text(), str(p), p.parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SaeCafeError(f"{where}: not valid TOML ({e}); fix the file") from e
    cfg = _from_dict(RunConfig, data, where)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})
    models = []
    for m in cfg.models or DEFAULT_MODELS:
        if not m.layers:
            raise SaeCafeError(f"{where}: model {m.name!r} has no layers; give layers = [...] (PFV layer ids)")
        bad = sorted(set(m.sae) - {f.name for f in dataclasses.fields(SAESettings)})
        if bad:
            raise SaeCafeError(f"{where}: model {m.name!r}: unknown sae keys {bad}")
        models.append(dataclasses.replace(m, weights=str(_resolve(m.weights, base))) if m.weights else m)
    if len({m.name for m in models}) != len(models):
        raise SaeCafeError(f"{where}: a model is listed twice in [[models]]; give each model once")
    for m in models:
        if m.target not in TARGETS:
            raise SaeCafeError(f"{where}: model {m.name!r}: target must be one of {TARGETS}, got {m.target!r}")
    if cfg.labels not in LABEL_POLICIES:
        raise SaeCafeError(f"{where}: labels must be one of {LABEL_POLICIES}, got {cfg.labels!r}")
    return dataclasses.replace(cfg, models=tuple(models),
                               images=(cfg.images if is_generated(cfg.images) else str(_resolve(cfg.images, base))
                                       if cfg.images else None),
                               class_names=str(_resolve(cfg.class_names, base)) if cfg.class_names else None)


def _resolve(value: str, base: Path | None) -> Path:
    """``~`` expanded; a relative path is taken relative to the working directory if it exists there, else
    relative to ``base`` (the config file's folder); an existing path is made absolute (recorded image names
    and folders must not depend on the directory a later reader, e.g. the viewer, runs in)."""
    q = Path(os.path.expanduser(value))
    if q.is_absolute() or q.exists() or base is None:
        return q.resolve() if q.exists() else q
    alt = base / q
    return alt.resolve() if alt.exists() else q
