"""Artifact access for the viewer: path confinement, upload checks and cached loaders.

Everything the viewer reads goes through :func:`confine` (a pure function): paths are relative to the artifact
root, never absolute, never contain ``..`` and never resolve (symlinks included) outside the root. The one
allow-list beside the root: the image folders the run's stages recorded (``images_source`` of the CAFE
manifests: a user's own images normally live outside the root), from which only image files are read, confined
to the folder in the same way (:func:`image_folder`, :func:`image_file`). Loaders
are cached with ``st.cache_resource`` (shared, read-only objects, never pickled) keyed by the path and the
manifest's modification time, so a rebuilt stage is picked up.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from sae_cafe.artifacts import MANIFEST, STAGE_KINDS, is_finished, list_runs, read_manifest
from sae_cafe.errors import ArtifactError, ImageReadError, SaeCafeError

MAX_UPLOAD_MB = 10
UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "bmp")


class PathEscapeError(SaeCafeError, ValueError):
    """A path that would leave the artifact root."""


class UploadError(SaeCafeError, ValueError):
    """An upload that is too large or of a type the viewer does not read."""


# ----- confinement (pure) ----------------------------------------------------------------------------------
def confine(root: str | Path, rel: str | Path) -> Path:
    """``root / rel`` resolved, guaranteed to lie inside ``root`` (which must exist).

    Rejects absolute paths (POSIX or Windows style), any ``..`` component, NUL bytes and paths whose
    resolution (following symlinks) leaves the resolved root. Returns the resolved path (it may not exist).
    """
    rel_s = str(rel)
    if "\x00" in rel_s:
        raise PathEscapeError(f"path {rel_s!r} contains a NUL byte; use a plain relative path inside the root")
    if rel_s.startswith(("/", "\\")) or PurePosixPath(rel_s).is_absolute() or PureWindowsPath(rel_s).is_absolute() \
            or PureWindowsPath(rel_s).drive:
        raise PathEscapeError(f"path {rel_s!r} is absolute; give a path relative to the artifact root {root}")
    parts = PurePosixPath(rel_s.replace("\\", "/")).parts
    if ".." in parts:
        raise PathEscapeError(f"path {rel_s!r} contains '..'; it must stay inside the artifact root {root}")
    base = Path(root).resolve()
    target = (base / Path(*parts)).resolve() if parts else base
    if target != base and base not in target.parents:
        raise PathEscapeError(f"path {rel_s!r} leaves the artifact root {base} (through a symlink?); "
                              "keep artifacts inside the root")
    return target


def inside(root: str | Path, path: str | Path) -> Path:
    """Confine an absolute or relative ``path`` that an artifact recorded (e.g. an image folder): allowed
    only when it resolves inside ``root``. Returns the resolved path."""
    p = Path(path)
    base = Path(root).resolve()
    if p.is_absolute():
        rp = p.resolve()
        if rp != base and base not in rp.parents:
            raise PathEscapeError(f"{p} lies outside the artifact root {base}; the viewer only reads files "
                                  "inside the root (move or link the data inside it)")
        return confine(base, rp.relative_to(base))
    cwd_relative = p.resolve()  # stages record paths relative to where they were built (e.g. indexes/run/world)
    if not (base / p).exists() and cwd_relative.exists() and base in cwd_relative.parents:
        return confine(base, cwd_relative.relative_to(base))
    return confine(base, p)


def recorded_image_folders(manifests: list[dict], base: str | Path = ".") -> list[Path]:
    """The image folders recorded by stage manifests (``images_source``), resolved (relative paths against
    ``base``, the directory the stages were built from). Pure."""
    out: list[Path] = []
    for m in manifests:
        src = m.get("images_source")
        if src:
            p = Path(src)
            p = (p if p.is_absolute() else Path(base) / p).resolve()
            if p not in out:
                out.append(p)
    return out


def image_folder(root: str | Path, folder: str | Path, allowed: list[Path]) -> Path:
    """A recorded image folder the viewer may read: inside the artifact root (:func:`inside`), or exactly one
    of the ``allowed`` folders (the image folders the run's stages recorded, beside the root)."""
    try:
        return inside(root, folder)
    except PathEscapeError:
        p = Path(folder).resolve()
        if p in allowed:
            return p
        raise PathEscapeError(f"{folder} lies outside the artifact root {Path(root).resolve()} and is not an image "
                              "folder this run recorded; the viewer reads only those") from None


def image_file(folder: Path, name: str | Path) -> Path:
    """``folder / name`` for an image file: confined to ``folder`` (no ``..``, no symlink leaving it; an
    absolute ``name`` only when it resolves inside ``folder``) and with an image extension."""
    from sae_cafe.images import IMAGE_EXTENSIONS

    if Path(name).is_absolute():  # a stage built from a list of image files records their full paths
        try:
            name = Path(name).resolve().relative_to(Path(folder).resolve())
        except ValueError:
            raise PathEscapeError(f"{name} lies outside the image folder {folder}") from None
    p = confine(folder, name)
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        raise PathEscapeError(f"{name!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)}); the viewer reads "
                              "only images from image folders")
    return p


def check_upload(name: str, size: int, max_mb: float = MAX_UPLOAD_MB) -> None:
    """Raise :class:`UploadError` unless ``name`` has an accepted image extension and ``size`` ≤ ``max_mb`` MB."""
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in UPLOAD_TYPES:
        raise UploadError(f"{name!r}: type {ext or '(none)'!r} is not accepted; upload one of "
                          f"{', '.join(UPLOAD_TYPES)}")
    if size > max_mb * 1024 * 1024:
        raise UploadError(f"{name!r} is {size / 2**20:.1f} MB; the limit is {max_mb:g} MB — downscale it")
    if size == 0:
        raise UploadError(f"{name!r} is empty (0 bytes); upload an image file")


def read_upload(name: str, data: bytes, max_mb: float = MAX_UPLOAD_MB):
    """Check and decode an uploaded image to RGB PIL (decompression-bomb guard of ``sae_cafe.images``)."""
    import tempfile

    from sae_cafe.images import load_image

    check_upload(name, len(data), max_mb)
    suffix = "." + Path(name).suffix.lower().lstrip(".")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"upload{suffix}"
        p.write_bytes(data)
        try:
            img = load_image(p)
        except ImageReadError as e:
            raise UploadError(str(e).replace(str(p), repr(name))) from e
        img.load()
        return img.copy()


# ----- roots and runs --------------------------------------------------------------------------------------
@dataclass
class RootInfo:
    """``root``: the artifact root (resolved); ``runs``: runs to offer; ``fixed``: True when PATH was a run."""

    root: Path
    runs: list[str]
    fixed: bool


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / k).is_dir() for k in STAGE_KINDS)


def resolve_root(path: str | Path) -> RootInfo:
    """``PATH`` of ``sae-cafe view``: an artifact root (its runs are listed) or one run directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(f"{p} does not exist; pass an artifact root (default indexes/) or a run directory "
                            "built with the sae-cafe commands")
    if not p.is_dir():
        raise ArtifactError(f"{p} is not a directory; pass an artifact root or a run directory")
    p = p.resolve()
    if is_run_dir(p) and not list_runs(p):
        return RootInfo(p.parent, [p.name], True)
    return RootInfo(p, list_runs(p), False)


def root_from_argv(argv: list[str], default: str = "indexes") -> str:
    """``--root PATH`` from the script arguments, else ``$SAE_CAFE_VIEW_ROOT``, else ``default``."""
    for i, a in enumerate(argv):
        if a == "--root" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--root="):
            return a.split("=", 1)[1]
    return os.environ.get("SAE_CAFE_VIEW_ROOT", default)


def tree_confined(root: str | Path, directory: str | Path) -> bool:
    """True when ``directory`` and every symlink below it resolve inside ``root`` (links are not followed
    while walking, so a link out of the root is caught, not entered)."""
    base = Path(root).resolve()

    def ok(p: Path) -> bool:
        rp = p.resolve()
        return rp == base or base in rp.parents

    if not ok(Path(directory)):
        return False
    for d, dirs, files in os.walk(directory, followlinks=False):
        for name in (*dirs, *files):
            q = Path(d) / name
            if q.is_symlink() and not ok(q):
                return False
    return True


def _entries_confined(root: str | Path, directory: Path) -> bool:
    """``directory`` and its direct file entries resolve inside ``root`` (sub-directories are checked on their
    own, so the report names the deepest offending directory)."""
    base = Path(root).resolve()
    files = [q for q in directory.iterdir() if not q.is_dir()] if not directory.is_symlink() else []
    for q in (directory, *files):
        rq = q.resolve()
        if rq != base and base not in rq.parents:
            return False
    return True


def stages(root: Path, run: str, kind: str) -> list[Path]:
    """Finished stage directories of ``kind`` in a run (``<kind>/<model>[/<layer>]``), sorted."""
    base = confine(root, f"{run}/{kind}")
    if not base.is_dir():
        return []
    if kind == "world":
        return [base] if tree_confined(root, base) and is_finished(base) else []
    depth = 1 if kind in ("icat", "saliency") else 2
    found = []
    for p in sorted(base.glob("/".join(["*"] * depth))):
        if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(base).parts) \
                and tree_confined(root, p) and is_finished(p):
            found.append(confine(root, p.relative_to(root.resolve())))
    return found


def partial_stages(root: Path, run: str, kind: str) -> list[str]:
    """Stage directories of ``kind`` that are not shown, with the reason: interrupted (``.<name>.tmp``),
    unreadable manifest, or links leaving the artifact root."""
    base = confine(root, f"{run}/{kind}")
    if not base.is_dir():
        return []
    out = []
    for d, dirs, _ in os.walk(base, followlinks=False):
        for name in sorted(dirs):
            p = Path(d) / name
            rel = p.relative_to(base)
            if not _entries_confined(root, p):
                out.append(f"{rel} (links outside the artifact root; ignored)")
            elif name.startswith(".") and ".tmp" in name:
                out.append(f"{rel} (interrupted)")
            elif (p / MANIFEST).exists() and not is_finished(p) and not any(q.startswith(".") for q in rel.parts):
                out.append(f"{rel} (unreadable manifest)")
            else:
                continue
            dirs.remove(name)
    return out


def run_image_folders(root: Path, run: str) -> list[Path]:
    """The image folders the run's CAFE stages read (their manifests' ``images_source``)."""
    found = []
    for s in stages(root, run, "cafe"):
        try:
            found.append(manifest(s))
        except SaeCafeError:
            continue
    return recorded_image_folders(found)


def label(stage: Path, root: Path, run: str, kind: str) -> str:
    """``model/layer`` of a stage directory."""
    return str(stage.relative_to(confine(root, f"{run}/{kind}")))


def mtime(path: Path) -> float:
    m = path / MANIFEST
    return m.stat().st_mtime if m.exists() else 0.0


# ----- cached loaders --------------------------------------------------------------------------------------
def _st():
    import streamlit as st

    return st


def cached_data(fn):
    """``st.cache_resource`` for plain data too: cached objects are shared, never serialised (no pickle);
    callers treat them as read-only."""
    return _st().cache_resource(show_spinner=False, max_entries=64)(fn)


def cached_resource(fn):
    return _st().cache_resource(show_spinner=False, max_entries=16)(fn)


@cached_data
def load_json(path: str, stamp: float) -> Any:
    """A JSON file (``stamp``: its mtime, part of the cache key)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p} is missing; rebuild the stage that writes it")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p} is corrupt ({e}); rebuild the stage that writes it") from e


def json_file(path: Path) -> Any:
    return load_json(str(path), path.stat().st_mtime if path.exists() else 0.0)


@cached_data
def load_manifest(path: str, stamp: float, kind: str | None = None) -> dict:
    return read_manifest(path, kind)


def manifest(stage: Path, kind: str | None = None) -> dict:
    return load_manifest(str(stage), mtime(stage), kind)


@cached_resource
def load_cafe_stage(path: str, stamp: float):
    from sae_cafe.cafe import load_cafe

    return load_cafe(path)


def cafe(stage: Path):
    """The :class:`sae_cafe.cafe.Cafe` of a stage directory (cached)."""
    return load_cafe_stage(str(stage), mtime(stage))


@cached_resource
def load_model_cached(name: str, weights: str | None, weights_sha256: str | None, state_sha256: str | None,
                      stamp: tuple):
    """The recorded model of a run (:func:`sae_cafe.model_record.load_from_record`, which checks the hash;
    ``stamp``: the weights file's (mtime, size), part of the cache key so a changed file is checked again)."""
    from sae_cafe.model_record import ModelRecord, load_from_record

    rec = ModelRecord(name, weights, weights_sha256, weights_sha256 is None, state_sha256)
    return load_from_record(rec, what=f"the run's {name}")


def run_model(root: Path, run: str, name: str):
    """The model ``name`` exactly as the run built it (recorded constructor and weights, hash checked).

    A run built from random (never saved) weights, a missing or changed weights file, or a run whose stages
    record no model are clear errors (:class:`sae_cafe.model_record.ModelMismatchError` /
    :class:`ArtifactError`): the viewer never substitutes a freshly initialised network.
    """
    from sae_cafe.model_record import ModelMismatchError, run_record

    rec = run_record(confine(root, run), name)
    if rec is None:
        raise ModelMismatchError(f"run {run!r} does not record which weights {name} was built with (stages from "
                                 "an older sae-cafe); rebuild its stages to run the model in the viewer")
    st_ = Path(rec.weights).stat() if rec.weights and Path(rec.weights).exists() else None
    stamp = (st_.st_mtime_ns, st_.st_size) if st_ else ()
    return load_model_cached(rec.name, rec.weights, rec.weights_sha256, rec.state_sha256, stamp)


@cached_resource
def load_sae_cached(path: str, stamp: float, _adapter, model_key: str, layer: str):
    """An SAE checked against the run's model (``model_key``: its weights fingerprint, the cache key)."""
    from sae_cafe.saes import load_sae

    return load_sae(path, _adapter, layer)


def sae_dir_for(root: Path, run: str, cafe_stage: Path, model: str, layer: str) -> Path | None:
    """The SAE of a CAFE stage: ``saes/<model>/<layer>`` of the run, else the manifest's ``sae_path`` (only
    inside the root)."""
    cand = confine(root, f"{run}/saes/{model}/{layer.replace('/', '_')}")
    if (cand / "cfg.json").exists():
        return cand
    sp = manifest(cafe_stage).get("sae_path")
    if sp:
        try:
            p = inside(root, sp)
        except PathEscapeError:
            return None
        if (p / "cfg.json").exists():
            return p
    return None


@cached_data
def load_graph(path: str, stamp: float):
    """An ICAT graph (node-link JSON or GraphML) as a networkx DiGraph."""
    from sae_cafe.icat import read_graph

    return read_graph(path)


@cached_data
def load_concepts(dirs: tuple[tuple[str, str], ...], stamp: float):
    """({layer: {latent: ConceptLabel}}, {layer: SupernodeSet}) of CAFE stages ``((layer, dir), ...)``
    (``stamp``: their newest manifest mtime)."""
    from sae_cafe.concepts.supernodes import cafe_concepts

    return cafe_concepts(dict(dirs))


def concepts(dirs: dict[str, Path]):
    """Concept labels and supernodes of the CAFE stages ``{layer: dir}`` (cached)."""
    return load_concepts(tuple(sorted((k, str(v)) for k, v in dirs.items())),
                         max([mtime(Path(v)) for v in dirs.values()] or [0.0]))


@cached_data
def load_dissection(path: str, stamp: float):
    """A ``sae-cafe dissect`` output folder (:func:`app.dissection.read_dissection`; ``stamp``: the mtime of its
    ``dissection.json``, part of the cache key so a rerun is picked up)."""
    from .dissection import read_dissection

    return read_dissection(path)


def dissection_dir(root: Path, run: str, cafe_stage: Path) -> Path:
    """Where ``sae-cafe dissect`` writes by default for the CAFE stage ``<run>/cafe/<model>/<layer>``:
    ``<run>/dissection/<model>/<layer>`` (confined to the root)."""
    return confine(root, f"{run}/dissection/{cafe_stage.parent.name}/{cafe_stage.name}")


def dissection(root: Path, run: str, cafe_stage: Path):
    """The dissection labels of a CAFE stage's latents (:class:`app.dissection.DissectionLabels`, cached), or
    None when there are none (``sae-cafe dissect`` not run for it); :class:`ArtifactError` /
    :class:`PathEscapeError` for an unreadable folder or one whose files link outside the root."""
    d = dissection_dir(root, run, cafe_stage)
    meta = d / "dissection.json"
    if not meta.exists():
        return None
    if not tree_confined(root, d):
        raise PathEscapeError(f"the dissection folder {d} links outside the artifact root; the viewer ignores it")
    return load_dissection(str(d), meta.stat().st_mtime)


@cached_data
def load_image_bytes(path: str, stamp: float) -> bytes:
    """An image file inside the root, re-encoded as PNG bytes (decoded by ``sae_cafe.images.load_image``)."""
    from sae_cafe.images import load_image

    buf = io.BytesIO()
    load_image(path).save(buf, format="PNG")
    return buf.getvalue()


def image_rgb(path: Path):
    """(H, W, 3) uint8 of an image file (cached decode)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(load_image_bytes(str(path), path.stat().st_mtime))).convert("RGB"))
