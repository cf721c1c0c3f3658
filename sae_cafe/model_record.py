"""The run's model: which registered constructor, which weights file, and the file's sha256.

Every stage that runs a model records a :class:`ModelRecord` in its manifest (key ``model_record``); every
consumer of a run (the viewer, ``sae-cafe query`` and the other subcommands that take ``--run``) loads exactly
that model with :func:`load_from_record` (or :func:`resolve_run_model`) and refuses a model whose weights do
not match (:func:`check_model`, a :class:`ModelMismatchError` naming both hashes). Nothing silently falls back
to random weights: a run built from random weights (no file) recorded the sha256 of its parameters, which a
freshly initialised model never reproduces, so loading it again is a clear error telling the user to save the
weights to a file.

Hash conventions: ``weights_sha256`` is the sha256 of the weights file's bytes (``sae_cafe.artifacts.hash_file``,
the same value as ``adapter.weights_hash``); ``state_sha256`` (only when there is no file) is the sha256 of the
parameters (names + float32 bytes, sorted by name).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, SaeCafeError

KEY = "model_record"


class ModelMismatchError(SaeCafeError):
    """A model (or weights file) that is not the one a run was built with."""


@dataclass(frozen=True)
class ModelRecord:
    """The model of a run.

    Attributes:
        name: registered model name (``sae_cafe.models.load_model``), i.e. the constructor.
        weights: absolute path of the weights file that was loaded (None: no file, or the model's shipped
            default weights when ``weights_sha256`` is set).
        weights_sha256: sha256 of that file's bytes (None when no file was loaded).
        random_weights: True when no weights file was loaded (random initialisation or an in-memory model).
        state_sha256: sha256 of the parameters, recorded only when there is no weights file.
    """

    name: str
    weights: str | None
    weights_sha256: str | None
    random_weights: bool
    state_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "manifest") -> ModelRecord:
        """Parse a recorded ``model_record`` (a clear :class:`ArtifactError` when it is malformed)."""
        try:
            rec = cls(name=str(d["name"]), weights=d.get("weights"), weights_sha256=d.get("weights_sha256"),
                      random_weights=bool(d["random_weights"]), state_sha256=d.get("state_sha256"))
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{source}: malformed model_record {d!r} ({e}); rebuild the stage") from e
        if rec.weights_sha256 is None and rec.state_sha256 is None:
            raise ArtifactError(f"{source}: model_record of {rec.name} has neither weights_sha256 nor "
                                "state_sha256; rebuild the stage")
        return rec

    @property
    def fingerprint(self) -> str:
        """The hash that identifies the model's weights (file hash, else parameter hash)."""
        return self.weights_sha256 or self.state_sha256 or ""

    def describe(self) -> str:
        if self.weights_sha256:
            where = self.weights or "its shipped weights"
            return f"{self.name} with weights {where} (sha256 {self.weights_sha256[:12]}…)"
        short = (self.state_sha256 or "")[:12]
        return f"{self.name} with random/in-memory weights (no file; parameter sha256 {short}…)"


def state_hash(model) -> str:
    """sha256 of a module's parameters and buffers (names + float32 bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record_for(model, weights: str | Path | None = None) -> ModelRecord:
    """The record of an adapter (or ``nn.Module``) as loaded; ``weights`` names the file when the adapter
    does not know it (``adapter.weights_path``).

    A registered model name alone (a ``str``) is loaded with :func:`sae_cafe.models.load_model` first.
    """
    from .models import get_adapter, load_model

    adapter = load_model(model, weights=weights) if isinstance(model, str) else get_adapter(model)
    path = weights if weights is not None else adapter.weights_path
    path = str(Path(path).resolve()) if path is not None else None
    if adapter.weights_hash:
        return ModelRecord(adapter.name, path, adapter.weights_hash, False)
    if path is not None:
        raise SaeCafeError(f"record_for: {adapter.name} has no weights hash although weights {path} were given; "
                           "load it with sae_cafe.models.load_model(name, weights=...)")
    return ModelRecord(adapter.name, None, None, True, state_hash(adapter.model))


def check_model(record: ModelRecord, model, what: str = "the run") -> None:
    """Raise :class:`ModelMismatchError` unless ``model`` (adapter) is the recorded model with the recorded
    weights (the error names both hashes)."""
    from .models import get_adapter

    adapter = get_adapter(model)
    if adapter.name != record.name:
        raise ModelMismatchError(f"{what} was built with model {record.name!r}, not {adapter.name!r}; load "
                                 f"{record.name!r}")
    if record.weights_sha256:
        have = adapter.weights_hash
        if have != record.weights_sha256:
            got = f"weights sha256 {have}" if have else "random weights (no weights file)"
            raise ModelMismatchError(
                f"{what} was built with {record.name} weights sha256 {record.weights_sha256} "
                f"({record.weights or 'shipped weights'}), but the model given has {got}; pass the recorded "
                "weights file (--weights), or build another run (--run NAME) with these weights")
        return
    have = adapter.weights_hash or state_hash(adapter.model)
    if have != record.state_sha256:
        raise ModelMismatchError(
            f"{what} was built with {record.name} from random/in-memory weights (parameter sha256 "
            f"{record.state_sha256}) that were never saved to a file; the model given has sha256 {have}. "
            "A freshly initialised model cannot reproduce them: save the weights with "
            "torch.save(model.state_dict(), 'w.pth') and rebuild the run with --weights w.pth")


def load_from_record(record: ModelRecord, weights: str | Path | None = None, device=None, what: str = "the run"):
    """Load the recorded model with its recorded weights (or ``weights``, which must have the recorded
    hash) and check it. A missing recorded file is a clear error naming it."""
    from .models import load_model

    if record.random_weights and weights is None:
        raise ModelMismatchError(
            f"{what} was built with {record.describe()}; those weights were never saved, so the model cannot be "
            "rebuilt. Save the weights to a file and rebuild the run with --weights")
    path = weights if weights is not None else record.weights
    if path is not None and not Path(path).exists():
        raise ArtifactError(f"{what} was built with {record.name} weights {path} (sha256 "
                            f"{record.weights_sha256}), which does not exist now; put the file back or pass "
                            "--weights with a copy of it")
    adapter = load_model(record.name, weights=path, device=device)
    check_model(record, adapter, what)
    return adapter


def read_record(manifest: dict, source: str = "manifest") -> ModelRecord | None:
    """The ``model_record`` of a manifest dict (None when the stage did not record one)."""
    d = manifest.get(KEY)
    return None if d is None else ModelRecord.from_json(d, source)


def run_record(run_dir: str | Path, model: str) -> ModelRecord | None:
    """The model record of ``model`` in a run: from its CAFE, activation, SAE, ICAT, saliency or SRD stage
    manifests (all of them must agree; disagreeing stages are a clear error). None when none records it."""
    from .artifacts import MANIFEST, is_finished, read_manifest

    base = Path(run_dir)
    found: dict[str, ModelRecord] = {}
    for kind in ("cafe", "acts", "saes", "icat", "saliency", "srd"):
        d = base / kind / model.replace("/", "_")
        if not d.is_dir():
            continue
        for m in sorted([d, *d.glob("*")]):
            if m.is_dir() and not m.name.startswith(".") and (m / MANIFEST).exists() and is_finished(m):
                rec = read_record(read_manifest(m), str(m / MANIFEST))
                if rec is not None:
                    found[str(m)] = rec
    if len({(r.name, r.fingerprint) for r in found.values()}) > 1:
        lines = "; ".join(f"{k}: {v.describe()}" for k, v in found.items())
        raise ModelMismatchError(f"the stages of {model} in {base} were built with different weights ({lines}); "
                                 "rebuild the stale stages")
    recs = list(found.values())  # the same weights (possibly recorded at different paths): prefer an existing file
    return next((r for r in recs if r.weights and Path(r.weights).exists()), recs[0] if recs else None)


def resolve_run_model(run_dir: str | Path, model: str, weights: str | Path | None = None, device=None):
    """Load ``model`` for a run: the recorded weights (or ``weights``, checked against the record). A run that
    records nothing: ``load_model(model, weights)`` (random initialisation only with its warning)."""
    from .models import load_model

    rec = run_record(run_dir, model)
    if rec is None:
        return load_model(model, weights=weights, device=device)
    return load_from_record(rec, weights, device, what=f"run {Path(run_dir).name!r}")


__all__ = ["KEY", "ModelMismatchError", "ModelRecord", "check_model", "load_from_record", "read_record",
           "record_for", "resolve_run_model", "run_record", "state_hash"]
