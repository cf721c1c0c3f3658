"""Artifact layout and manifests (see CONVENTIONS.md).

Every stage directory ``indexes/<run>/<stage>/...`` holds a ``manifest.json`` written by
:func:`write_manifest`. A stage is written into a temporary sibling directory and renamed into place by
:func:`stage_dir`, so a half-written stage is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_ROOT = Path(os.environ.get("SAE_CAFE_ROOT", "indexes"))
STAGE_KINDS = ("world", "acts", "saes", "cafe", "icat", "saliency")


def package_version() -> str:
    from . import __version__

    return __version__


def run_dir(run: str, root: str | Path | None = None) -> Path:
    """``<root>/<run>`` (root defaults to ``indexes/`` or ``$SAE_CAFE_ROOT``)."""
    return Path(root if root is not None else DEFAULT_ROOT) / run


def stage_path(run: str, kind: str, *parts: str, root: str | Path | None = None) -> Path:
    """Path of a stage directory, e.g. ``stage_path("demo", "acts", "mini_resnet", "layer2")``."""
    if kind not in STAGE_KINDS:
        raise ArtifactError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")
    return run_dir(run, root).joinpath(kind, *[p.replace("/", "_") for p in parts])


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples to plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fd:
        while block := fd.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temporary sibling and ``os.replace`` (never leaves a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fd:
        fd.write(data)
        fd.flush()
        os.fsync(fd.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def make_manifest(kind: str, config: Any, upstream: dict[str, str | Path] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The manifest dict: kind, schema_version, config, upstream {path: hash}, version, created_at."""
    ups = {}
    for name, p in (upstream or {}).items():
        p = Path(p)
        m = p / MANIFEST
        ups[name] = {"path": str(p), "hash": hash_file(m) if m.exists() else None}
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "config": to_jsonable(config),
        "upstream": ups,
        "package_version": package_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **to_jsonable(extra),
    }


def write_manifest(directory: str | Path, kind: str, config: Any,
                   upstream: dict[str, str | Path] | None = None, **extra: Any) -> dict[str, Any]:
    """Write ``directory/manifest.json`` atomically and return it. The one writer of manifests."""
    manifest = make_manifest(kind, config, upstream, **extra)
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and validate a stage manifest; a missing/partial/old one is an :class:`ArtifactError`."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        hint = " (a temporary .tmp directory exists: the stage was interrupted; rerun it)" if any(
            directory.parent.glob(f".{directory.name}.tmp*")) else ""
        raise ArtifactError(f"no finished stage at {directory}: {MANIFEST} is missing{hint}. "
                            "Build this stage first (see `sae-cafe --help`).")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt ({e}); delete {directory} and rebuild the stage") from e
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise ArtifactError(f"{path} is not a sae-cafe manifest; delete {directory} and rebuild")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {version!r}, this sae-cafe reads {SCHEMA_VERSION}; "
                            f"rebuild the stage (delete {directory}) with this version")
    if kind is not None and manifest["kind"] != kind:
        raise ArtifactError(f"{path} holds a {manifest['kind']!r} stage, expected {kind!r}")
    return manifest


def is_finished(directory: str | Path) -> bool:
    """True when ``directory`` holds a readable manifest of the current schema."""
    try:
        read_manifest(directory)
    except ArtifactError:
        return False
    return True


def temp_stage_path(final: str | Path) -> Path:
    """The temporary sibling ``.<name>.tmp`` a stage is written into before it is published."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def is_partial_file(name: str) -> bool:
    """True for the temporary names of interrupted atomic writes: ``.<name>.tmp*`` and ``.<name>.part``."""
    return name.startswith(".") and (".tmp" in name or name.endswith(".part"))


def clean_partial_files(directory: str | Path) -> list[Path]:
    """Remove what interrupted atomic writes left in a temporary stage directory (recursively).

    Every writer in sae-cafe writes ``.<name>.tmp<pid>`` / ``.<name>.part`` (a file, or a directory for
    checkpoints) and renames it into place; a process killed before the rename leaves that temporary
    behind. Resuming a stage removes them first, so they can neither be mistaken for state nor end up in
    the published stage. Returns the removed paths.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in sorted(directory.rglob(".*"), key=lambda q: len(q.parts)):
        if not is_partial_file(p.name) or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


def publish_stage(tmp: str | Path, final: str | Path, overwrite: bool = True) -> None:
    """Rename a finished temporary stage directory into place (the finished one is replaced atomically).

    Replacing a finished stage takes two renames (``final`` → ``.<name>.old``, ``tmp`` → ``final``); a
    process killed between them leaves ``tmp`` finished and ``final`` absent, and the next call publishes
    it. A stale ``.<name>.old`` from such an interruption is removed.
    """
    tmp, final = Path(tmp), Path(final)
    if not (tmp / MANIFEST).exists():
        raise ArtifactError(f"stage written to {tmp} has no {MANIFEST}; not publishing it")
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if not overwrite:
            raise ArtifactError(f"{final} exists; pass overwrite=True or delete it")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
    else:
        os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def finished_temp_stage(final: str | Path, key_field: str, key: str) -> bool:
    """True when the temporary stage of ``final`` is finished (valid manifest) with ``manifest[key_field] ==
    key``: the producing process was killed between writing the manifest and publishing, and publishing it
    is all that is left to do."""
    tmp = temp_stage_path(final)
    try:
        return read_manifest(tmp).get(key_field) == key
    except ArtifactError:
        return False


@contextlib.contextmanager
def stage_dir(final: str | Path, overwrite: bool = True, resume: bool = False) -> Iterator[Path]:
    """Write a stage into ``.<name>.tmp`` next to ``final`` and rename it into place on success.

    On error the temporary directory is left (for inspection, or to continue from with ``resume=True``)
    and ``final`` is untouched. With ``resume=True`` an existing temporary directory is kept, minus the
    leftovers of interrupted atomic writes (:func:`clean_partial_files`); the caller decides whether its
    partial state is for the same inputs.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_stage_path(final)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    if resume:
        clean_partial_files(tmp)
    yield tmp
    publish_stage(tmp, final, overwrite)


def list_runs(root: str | Path | None = None) -> list[str]:
    """Run names under an artifact root (directories holding at least one stage kind)."""
    root = Path(root if root is not None else DEFAULT_ROOT)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any((p / k).is_dir() for k in STAGE_KINDS))
