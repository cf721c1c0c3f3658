"""What the stages of one run share: the config, the device, the loaded models, the images and labels.

The stage modules (``world``, ``srd``, ``extract``, ``sae``, ``cafe``, ``icat``, ``saliency``) take a
:class:`RunContext` and read everything through it, so each model is loaded once per run and every stage
sees the same images in the same order.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from sae_cafe.errors import SaeCafeError

from .sources import is_generated, materialize

RANDOM_WEIGHTS = "no weights file given"
#: images whose mean output gives the ``mean_direction`` target (spread over the classes)
DIRECTION_IMAGES = 64


def round_robin(labels: list[Any], n: int) -> list[int]:
    """``n`` indices into ``labels`` taken round-robin over the classes (sorted by name), the first ones of
    each class first; evenly spaced when there are no classes (all None). Returned in ascending order."""
    if all(c is None for c in labels):
        step = max(len(labels) / max(n, 1), 1.0)
        return sorted({min(int(i * step), len(labels) - 1) for i in range(min(n, len(labels)))})
    by_class: dict[Any, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    queues = [by_class[c] for c in sorted(by_class, key=str)]
    out: list[int] = []
    depth = 0
    while len(out) < min(n, len(labels)):
        out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
        depth += 1
    return sorted(out)


class RunContext:
    """Shared inputs of a run. ``cfg``: the :class:`~.config.RunConfig`; ``fresh``: rebuild everything;
    ``console``: a rich console the stages print to; ``results``: the pipeline's stage results (read by
    stages that size themselves from an upstream stage's metrics)."""

    def __init__(self, cfg, fresh: bool = False, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=False)
        self.root = Path(cfg.root)
        self.run_dir = self.root / cfg.run
        if is_generated(cfg.images):  # e.g. skimage_crops:200 → <root>/<run>/images/ (written once)
            cfg = dataclasses.replace(cfg, images=str(materialize(cfg.images, self.run_dir / "images")))
        self.cfg, self.fresh = cfg, fresh
        self.device = self._device(cfg.device)
        self.results: dict[str, Any] = {}
        self.model_warnings: dict[str, list[str]] = {}
        self.label_decisions: dict[str, dict[str, Any]] = {}
        self._adapters: dict[str, Any] = {}
        self._directions: dict[str, Any] = {}
        self._world = None
        self._folder_files: list[tuple[Path, str | None]] | None = None

    @staticmethod
    def _device(spec: str) -> str:
        import torch

        if spec == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise SaeCafeError(f"device {spec!r} asked for, but CUDA is not available; use device = 'cpu' or 'auto'")
        return spec

    # --- models ---
    def adapter(self, m):
        """The loaded model of ``m`` (once per run). A model without a weights file that has no shipped
        weights runs with random weights: that warning is kept in :attr:`model_warnings` (printed, and
        recorded in the report and the manifests the pipeline writes), never hidden."""
        if m.name not in self._adapters:
            from sae_cafe.models import load_model

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._adapters[m.name] = load_model(m.name, weights=m.weights, device=self.device)
            for w in caught:
                text = str(w.message)
                self.model_warnings.setdefault(m.name, []).append(text)
                self.console.print(f"[red]warning[/red] ({m.name}): {text}")
                if RANDOM_WEIGHTS not in text:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return self._adapters[m.name]

    def random_weights(self, m) -> bool:
        """True when ``m`` runs with random weights (no weights file, none shipped)."""
        self.adapter(m)
        return any(RANDOM_WEIGHTS in t for t in self.model_warnings.get(m.name, []))

    def weights_record(self, m) -> dict[str, Any]:
        """Manifest fields of the model's weights: ``weights`` path, ``weights_hash``, ``random_weights`` and
        the run's model record (``sae_cafe.model_record``)."""
        from sae_cafe.model_record import KEY, record_for

        ad = self.adapter(m)
        return {"weights": m.weights, "weights_hash": getattr(ad, "weights_hash", None),
                "random_weights": self.random_weights(m), KEY: record_for(ad, m.weights).to_json()}

    def direction(self, m) -> dict[str, Any]:
        """The ``mean_direction`` target of model ``m`` (once per run): ``d`` (K,) float32, the unit mean of the
        model's outputs over :data:`DIRECTION_IMAGES` images spread over the classes, with what describes it
        (``name``, ``norm`` of the mean before normalising, ``images``). Stages explain ⟨output, d⟩."""
        if m.name not in self._directions:
            import torch

            ad = self.adapter(m)
            idx = self.spread(DIRECTION_IMAGES)
            x, _, _, _ = self.labelled_images(len(idx), ad, spread=True, notes=[], label=False)
            with torch.no_grad():
                out = torch.cat([ad.model(x[i:i + 16].to(self.device)).float().cpu() for i in range(0, len(x), 16)])
            mean = out.mean(0)
            norm = float(mean.norm())
            if not norm > 0:
                raise SaeCafeError(f"{m.name}: the mean output over {len(x)} images is zero; the mean_direction "
                                   "target is undefined (use target = 'class' on a model with classes)")
            self._directions[m.name] = {"d": mean / norm, "name": "mean output direction", "norm": norm,
                                        "images": len(x)}
        return self._directions[m.name]

    def resolve(self, m, layer: str) -> str:
        return self.adapter(m).resolve_layer(layer)

    def layers(self, m) -> list[str]:
        return list(dict.fromkeys(self.resolve(m, n) for n in m.layers))

    def class_names(self, ad) -> list[str]:
        """The model's class names (their indices as strings when it has none)."""
        return list(ad.class_names or [str(i) for i in range(getattr(ad, "num_classes", 0) or 1000)])

    # --- artifacts ---
    def stage_dir(self, kind: str, *parts: str) -> Path:
        from sae_cafe.artifacts import stage_path

        if kind == "srd":  # not an artifact kind of its own: a PNG + tensors next to the stages
            return self.run_dir / "srd" / parts[0]
        return stage_path(self.cfg.run, kind, *parts, root=self.root)

    def metric(self, stage: str, name: str) -> Any:
        """A key metric of an earlier stage of this run (None when it did not run)."""
        r = self.results.get(stage)
        return None if r is None else r.metrics.get(name)

    # --- images ---
    def image_deps(self) -> list[str]:
        return [] if self.cfg.images else ["world"]

    def world(self):
        if self._world is None:
            from sae_cafe.world import load_world

            self._world = load_world(self.stage_dir("world"))
        return self._world

    def reset_world(self) -> None:
        self._world = None

    def image_folder(self) -> Path:
        return Path(self.cfg.images) if self.cfg.images else self.stage_dir("world") / "images"

    def folder_files(self) -> list[tuple[Path, str | None]]:
        """(path, class folder) of the images used, in the sorted folder order every stage sees."""
        if self._folder_files is None:
            from sae_cafe.images import iter_image_files

            files = iter_image_files(self.image_folder())
            if self.cfg.max_images and self.cfg.max_images < len(files):
                files = [files[i] for i in round_robin([c for _, c in files], self.cfg.max_images)]
            self._folder_files = files
        return self._folder_files

    def image_source(self):
        """What extraction and CAFE read: the folder itself (so viewers find the images) unless limited."""
        if self.cfg.images and self.cfg.max_images:
            return [p for p, _ in self.folder_files()]
        return self.image_folder()

    def images_key(self) -> Any:
        """What the images stages' keys hash: the world settings, or the folder's files, sizes and times."""
        if not self.cfg.images:
            return {"world": dataclasses.asdict(self.cfg.world)}
        from sae_cafe.artifacts import hash_json

        files = self.folder_files()
        return {"folder": self.cfg.images, "n": len(files),
                "hash": hash_json([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p, _ in files])}

    def model_key(self, m) -> dict[str, Any]:
        """What a model stage's key hashes: name, weights file identity, images, device."""
        return {"model": m.name, "weights": self.weights_id(m),
                "images": self.images_key() if self.cfg.images else None, "device": self.device}

    def weights_id(self, m) -> Any:
        p = Path(m.weights) if m.weights else None
        if p is None:
            from sae_cafe.models import mini

            p = mini.weights_path(m.name) if m.name in mini.MINI_ARCHS else None
        if p is None or not p.exists():
            return {"weights": str(p) if p else None}
        st = p.stat()
        return {"weights": str(p), "size": st.st_size, "mtime": st.st_mtime_ns}

    def image_labels(self) -> list[Any]:
        """The class of every image in folder order (world label, or class folder; None in a flat folder)."""
        if not self.cfg.images:
            return [int(v) for v in self.world().world.labels]
        return [c for _, c in self.folder_files()]

    def spread(self, n: int) -> list[int]:
        """``n`` image indices taken round-robin over the classes (sorted), in folder order within a class;
        evenly spaced over a flat folder."""
        return round_robin(self.image_labels(), n)

    def labelled_images(self, n: int, adapter, spread: bool = False, notes: list[str] | None = None,
                        label: bool = True):
        """The first ``n`` images (``spread``: ``n`` spread across the classes): (preprocessed x (n,3,H,W),
        labels (n,) long, masks (n,H,W) bool or None, ids). ``notes`` collects notes about them (e.g. no
        masks, what the labels are); without it those notes are dropped (stages that use neither).
        ``label=False``: no labels (None; a stage that explains a direction needs no class)."""
        import numpy as np
        import torch

        idx = self.spread(n) if spread else None
        if not self.cfg.images:
            w = self.world().world
            idx = idx if idx is not None else list(range(min(n, len(w))))
            x = adapter.preprocess([w.images[i] for i in idx])
            return x, torch.as_tensor(w.labels[idx]).long(), w.instance[idx] == 1, [f"{i:06d}" for i in idx]
        from sae_cafe.evaluation.runs import load_folder_data, mask_through_preprocess

        files = self.folder_files()
        files = [files[i] for i in idx] if idx is not None else files[:n]
        images, masks, _, ids, _ = load_folder_data(self.cfg.images, len(files), adapter.class_names,
                                                    notes=notes if notes is not None else [], files=files)
        x = adapter.preprocess(list(images))
        if masks is not None:
            masks = np.stack([m if m.shape == tuple(x.shape[-2:]) and adapter.resize is None
                              else mask_through_preprocess(adapter, m) for m in masks])
        return x, self._labels(files, adapter, x, notes) if label else None, masks, ids

    def _labels(self, files, adapter, x, notes: list[str] | None):
        """Labels of user images under the one label policy (``sae_cafe.labels``, ``cfg.labels`` and
        ``cfg.class_names``). The decision is kept in :attr:`label_decisions` (the report records it) and its
        note goes to ``notes``. Labels that index the folder names rather than the model's classes cannot
        be compared with the model's outputs: the stages then use the model's predicted classes, and say so."""
        import torch

        from sae_cafe.labels import class_names_for, resolve_labels

        def predict() -> list[int]:
            with torch.no_grad():
                return torch.cat([adapter.model(x[i:i + 64].to(self.device)).argmax(1).cpu()
                                  for i in range(0, len(x), 64)]).tolist()

        lab = resolve_labels(self.cfg.labels, [c for _, c in files], class_names_for(adapter, self.cfg.class_names),
                             predict=predict, model=adapter.name, where=str(self.image_folder()))
        self.label_decisions[adapter.name] = lab.decision.to_json()
        if notes is not None:
            notes.append(lab.decision.note)
        if not lab.decision.model_classes:
            if notes is not None:
                notes.append("these labels are not the model's class ids: this stage uses the model's predicted "
                             "classes instead (give class_names = '<file>' to map the folders to the model's classes)")
            return torch.tensor(predict())
        return torch.tensor(lab.ids)
