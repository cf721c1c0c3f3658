"""Artifact layout and manifests (see CONVENTIONS.md).

Every stage directory ``indexes/<run>/<stage>/...`` holds a ``manifest.json`` written by
:func:`write_manifest` (typed form: :class:`Manifest`). A stage is written into a temporary sibling
directory and renamed into place by :func:`stage_dir`, so a half-written stage is never mistaken for a
finished one. A manifest records the sha256 of each upstream stage's manifest; reading it
(:func:`read_manifest` / :func:`load_manifest`) checks them, so a stage built from a since-rebuilt upstream
is a clear error (:func:`check_upstream`), never silently mixed with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import warnings
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


@dataclasses.dataclass(frozen=True)
class UpstreamRef:
    """A stage this stage was built from: its directory, the sha256 of its ``manifest.json`` when this stage
    was written (None: it had no manifest), and its path relative to this stage (found again when the run
    folder moves)."""

    path: str
    hash: str | None
    relative: str | None = None


_CORE = ("kind", "schema_version", "config", "upstream", "package_version", "created_at")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The typed record of a stage's ``manifest.json``.

    ``kind``: one of :data:`STAGE_KINDS` (or ``"srd"``); ``config``: the stage's settings (JSON values);
    ``upstream``: name → :class:`UpstreamRef`; ``extra``: the stage's own fields (model, counts, keys...),
    stored at the top level of the JSON next to the core fields. A finished stage's manifest is written
    once and never rewritten (pipeline bookkeeping lives in ``<run>/pipeline_state.json``).
    """

    kind: str
    config: Any
    upstream: dict[str, UpstreamRef]
    package_version: str
    created_at: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (core fields plus ``extra`` at the top level; the form ``read_manifest`` returns)."""
        ups = {n: {k: v for k, v in dataclasses.asdict(r).items() if k != "relative" or v is not None}
               for n, r in self.upstream.items()}
        return {"kind": self.kind, "schema_version": self.schema_version, "config": to_jsonable(self.config),
                "upstream": ups, "package_version": self.package_version, "created_at": self.created_at,
                **to_jsonable(self.extra)}

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = "manifest") -> Manifest:
        """Validate the JSON form; anything malformed or of another schema is an :class:`ArtifactError`."""
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise ArtifactError(f"{where} is not a sae-cafe manifest (no 'kind'); delete its stage and rebuild")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{where} has schema_version {version!r}, this sae-cafe reads {SCHEMA_VERSION}; "
                                "rebuild the stage (delete its directory) with this version")
        ups_raw = data.get("upstream") or {}
        if not isinstance(ups_raw, dict):
            raise ArtifactError(f"{where}: 'upstream' must be a table of stages, got {type(ups_raw).__name__}")
        ups = {}
        for name, ref in ups_raw.items():
            if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(
                    ref.get("hash"), (str, type(None))):
                raise ArtifactError(f"{where}: upstream {name!r} must be {{path, hash}}, got {ref!r}")
            ups[name] = UpstreamRef(ref["path"], ref.get("hash"), ref.get("relative"))
        for key in ("package_version", "created_at"):
            if not isinstance(data.get(key, ""), str):
                raise ArtifactError(f"{where}: {key!r} must be a string, got {data[key]!r}")
        return cls(kind=data["kind"], config=data.get("config"), upstream=ups,
                   package_version=data.get("package_version", ""), created_at=data.get("created_at", ""),
                   extra={k: v for k, v in data.items() if k not in _CORE}, schema_version=version)


def make_manifest(kind: str, config: Any, upstream: dict[str, str | Path] | None = None,
                  directory: str | Path | None = None, **extra: Any) -> dict[str, Any]:
    """The manifest dict: kind, schema_version, config, upstream {name: {path, hash[, relative]}}, version,
    created_at and the ``extra`` fields (``relative`` when ``directory``, the stage being written, is given)."""
    clash = sorted(set(extra) & set(_CORE))
    if clash:
        raise ArtifactError(f"manifest extra fields {clash} clash with the core fields {_CORE}")
    ups = {}
    for name, p in (upstream or {}).items():
        p = Path(p)
        m = p / MANIFEST
        rel = os.path.relpath(p, directory) if directory is not None else None
        ups[name] = UpstreamRef(str(p), hash_file(m) if m.exists() else None, rel)
    return Manifest(kind=kind, config=to_jsonable(config), upstream=ups, package_version=package_version(),
                    created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    extra=to_jsonable(extra)).to_dict()


def write_manifest(directory: str | Path, kind: str, config: Any,
                   upstream: dict[str, str | Path] | None = None, **extra: Any) -> dict[str, Any]:
    """Write ``directory/manifest.json`` atomically and return it. The one writer of manifests.

    A stage's manifest is written once, when the stage is finished (normally inside :func:`stage_dir`
    before the stage is published); writing over a *published* stage's manifest breaks the lineage of the
    stages built from it (their recorded upstream hash no longer matches, see :func:`check_upstream`)."""
    manifest = make_manifest(kind, config, upstream, directory=directory, **extra)
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def _locate_upstream(directory: Path, ref: UpstreamRef) -> Path | None:
    """The upstream directory: relative to the stage first (right whatever the working directory and
    wherever the run folder moved), else the recorded path."""
    for cand in (directory / ref.relative if ref.relative else None, Path(ref.path)):
        if cand is not None and cand.is_dir():
            return cand
    return None


def check_upstream(directory: str | Path, manifest: Manifest | dict[str, Any]) -> list[str]:
    """Check that every upstream stage recorded in ``manifest`` (of the stage at ``directory``) still has
    the manifest it had when this stage was built.

    A changed upstream manifest (the upstream stage was rebuilt) is an :class:`ArtifactError` naming both
    hashes. An upstream that is gone (deleted, or a moved run written before relative paths were
    recorded) cannot be checked: that is returned as a note (and warned about by :func:`read_manifest`).
    """
    directory = Path(directory)
    if isinstance(manifest, dict):
        manifest = Manifest.from_dict(manifest, directory / MANIFEST)
    notes = []
    for name, ref in manifest.upstream.items():
        if ref.hash is None:
            continue
        loc = _locate_upstream(directory, ref)
        if loc is None:
            notes.append(f"{directory}: upstream {name!r} ({ref.path}) is gone; its lineage is not checked")
            continue
        now = hash_file(loc / MANIFEST) if (loc / MANIFEST).exists() else None
        if now != ref.hash:
            raise ArtifactError(
                f"{directory} is stale: its upstream {name!r} at {loc} changed since it was built "
                f"(recorded manifest sha256 {ref.hash}, now {now}). Rebuild {directory} from the current "
                f"{name} (`sae-cafe demo` rebuilds stale stages), or restore the upstream it was built from.")
    return notes


def load_manifest(directory: str | Path, kind: str | None = None, check_lineage: bool = True) -> Manifest:
    """Read, validate and (``check_lineage``) lineage-check a stage manifest as a :class:`Manifest`.

    A missing/partial/old/corrupt manifest, a wrong ``kind`` or a stale upstream is an
    :class:`ArtifactError`; an upstream that is gone gives a ``UserWarning``."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        hint = " (a temporary .tmp directory exists: the stage was interrupted; rerun it)" if any(
            directory.parent.glob(f".{directory.name}.tmp*")) else ""
        raise ArtifactError(f"no finished stage at {directory}: {MANIFEST} is missing{hint}. "
                            "Build this stage first (see `sae-cafe --help`).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt ({e}); delete {directory} and rebuild the stage") from e
    manifest = Manifest.from_dict(data, path)
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{path} holds a {manifest.kind!r} stage, expected {kind!r}")
    if check_lineage:
        for note in check_upstream(directory, manifest):
            warnings.warn(note, stacklevel=3)
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None, check_lineage: bool = True) -> dict[str, Any]:
    """:func:`load_manifest` as the JSON dict (the form every stage reader uses)."""
    return load_manifest(directory, kind, check_lineage).to_dict()


def is_finished(directory: str | Path) -> bool:
    """True when ``directory`` holds a readable manifest of the current schema (finished; whether it is
    stale is :func:`check_upstream`'s question)."""
    try:
        load_manifest(directory, check_lineage=False)
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
        return load_manifest(tmp, check_lineage=False).extra.get(key_field) == key
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
