"""The one label policy: which class ids the images of a folder carry, and what those ids mean.

Three modes (``labels = ...`` in run configs):

- ``"class_names"``: the class folders (ImageFolder layout) are class names of the model (or of a class-names
  file the user gives, e.g. ImageNet's). Labels are the model's class ids. A folder name that is not a
  class name is an error naming both sides.
- ``"folder"``: the folder names are the class vocabulary. When every folder name is a class name of the
  model, the labels are the model's class ids (as with ``"class_names"``); otherwise the labels index the
  sorted folder names, are *not* the model's outputs, and the decision says so (accuracy against the model
  is then not measured).
- ``"predicted"``: the model's predictions are the labels.

Never a silent index mapping: the decision (:class:`LabelDecision`) is returned with the labels, so stages
can record it in their manifests, and its ``note`` is the sentence to show the user.

Class names come from the model adapter (``adapter.class_names``) or from a local file given by the user
(:func:`read_class_names`): one name per line, or JSON — a list of names, or an object ``{index: name}`` /
``{index: [alias, …]}`` (e.g. ``imagenet_class_index.json``: ``{"0": ["n01440764", "tench"], …}``, where a
folder named either ``n01440764`` or ``tench`` is class 0).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import MismatchError, SaeCafeError
from .image_source import ImageSource

LABEL_MODES = ("class_names", "folder", "predicted")


@dataclass(frozen=True)
class ClassNames:
    """A class vocabulary: display ``names`` (index = class id), extra ``aliases`` per class, where from."""

    names: tuple[str, ...]
    aliases: tuple[tuple[str, ...], ...] = ()
    source: str = "model"

    def lookup(self) -> dict[str, int]:
        """Every name and alias → class id."""
        out: dict[str, int] = {}
        for i, n in enumerate(self.names):
            out.setdefault(n, i)
            for a in (self.aliases[i] if i < len(self.aliases) else ()):
                out.setdefault(a, i)
        return out


@dataclass(frozen=True)
class LabelDecision:
    """What the labels are, recorded in manifests (:meth:`to_json`).

    Attributes:
        mode: the requested mode. kind: ``"model_classes"`` (ids are the model's class ids, from folder names),
            ``"folder_vocabulary"`` (ids index ``vocabulary``, not the model's outputs) or ``"predicted"``.
        vocabulary: the names the ids index. model_classes: True when the ids are the model's class ids.
        class_names_source: ``"model"``, the class-names file, or None (no class names known).
        note: one sentence saying what was done.
    """

    mode: str
    kind: str
    vocabulary: tuple[str, ...]
    model_classes: bool
    class_names_source: str | None
    note: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        return d


@dataclass(frozen=True)
class Labels:
    """Per-image class ids ``ids`` (N,) and the :class:`LabelDecision` that says what they mean."""

    ids: tuple[int, ...]
    decision: LabelDecision


def read_class_names(path: str | Path) -> ClassNames:
    """Class names from a local file: one name per line, or JSON (list, ``{index: name}``,
    ``{index: [alias, …]}``; the last alias is the display name)."""
    p = Path(path)
    if not p.is_file():
        raise SaeCafeError(f"class-names file {p} does not exist; give a text file with one class name per line "
                           "(line i = class id i) or a JSON list/object")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SaeCafeError(f"class-names file {p} is not valid JSON ({e})") from e
        entries = _json_entries(data, p)
    else:
        entries = [(line.strip(),) for line in text.splitlines() if line.strip()]
    if not entries:
        raise SaeCafeError(f"class-names file {p} holds no class names")
    return ClassNames(tuple(e[-1] for e in entries), tuple(e[:-1] for e in entries), str(p))


def _json_entries(data: Any, p: Path) -> list[tuple[str, ...]]:
    if isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, dict):
        try:
            items = sorted((int(k), v) for k, v in data.items())
        except ValueError as e:
            raise SaeCafeError(f"class-names file {p}: JSON object keys must be class ids 0..C-1 ({e})") from e
    else:
        raise SaeCafeError(f"class-names file {p}: expected a JSON list or object, got {type(data).__name__}")
    if [i for i, _ in items] != list(range(len(items))):
        raise SaeCafeError(f"class-names file {p}: class ids must be 0..{len(items) - 1} without gaps")
    out = []
    for i, v in items:
        names = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else ()
        if not names or not all(isinstance(n, str) for n in names):
            raise SaeCafeError(f"class-names file {p}: class {i} has no name (got {v!r})")
        out.append(names)
    return out


def class_names_for(adapter: Any = None, class_names: str | Path | Sequence[str] | ClassNames | None = None
                    ) -> ClassNames | None:
    """The class vocabulary: ``class_names`` (a file, a list or :class:`ClassNames`) if given, else the
    adapter's ``class_names``, else None."""
    if isinstance(class_names, ClassNames):
        return class_names
    if isinstance(class_names, (str, Path)):
        return read_class_names(class_names)
    if class_names is not None:
        return ClassNames(tuple(str(n) for n in class_names), source="given list")
    names = getattr(adapter, "class_names", None) if adapter is not None else None
    return ClassNames(tuple(names), source="model") if names else None


def _shown(names: Sequence[str], k: int = 6) -> str:
    s = ", ".join(repr(n) for n in list(names)[:k])
    return f"[{s}{', …' if len(names) > k else ''}] ({len(names)})"


def resolve_labels(mode: str, folder_classes: Sequence[str | None] | None, class_names: ClassNames | None = None,
                   predict: Callable[[], Sequence[int]] | None = None, model: str = "the model",
                   where: str = "the images", num_classes: int | None = None) -> Labels:
    """Labels of N images under the policy ``mode`` (see the module docstring).

    Args:
        folder_classes: per image, its class folder name (ImageFolder layout) or None (flat folder).
        class_names: the class vocabulary (:func:`class_names_for`); None when the model has none.
        predict: returns the model's (N,) predicted class ids (``"predicted"`` mode only).
        model, where: the model's and the images' names, for messages.
        num_classes: the model's number of outputs, when known: a class vocabulary of another length is an
            error (e.g. a class-names file of another model).
    """
    if mode not in LABEL_MODES:
        raise SaeCafeError(f"labels must be one of {', '.join(map(repr, LABEL_MODES))}, got {mode!r}")
    if class_names is not None and num_classes and len(class_names.names) != int(num_classes):
        raise MismatchError(f"{class_names.source} lists {len(class_names.names)} class names but {model} has "
                            f"{num_classes} outputs; give the class names of this model (one per output, in order)")
    src = class_names.source if class_names is not None else None
    if mode == "predicted":
        if predict is None:
            raise SaeCafeError("labels = 'predicted' needs the model's predictions")
        ids = tuple(int(i) for i in predict())
        vocab = class_names.names if class_names is not None else ()
        return Labels(ids, LabelDecision(mode, "predicted", vocab, True, src,
                                         f"labels of {where} are {model}'s predictions"))
    if folder_classes is None or not len(folder_classes) or any(c is None for c in folder_classes):
        raise SaeCafeError(f"{where}: labels = {mode!r} needs an ImageFolder layout (one sub-folder per class); "
                           "use labels = 'predicted' for a flat folder")
    folders = sorted(set(folder_classes))
    lookup = class_names.lookup() if class_names is not None else {}
    missing = [c for c in folders if c not in lookup]
    if not missing:
        ids = tuple(lookup[c] for c in folder_classes)
        return Labels(ids, LabelDecision(mode, "model_classes", class_names.names, True, src,
                                         f"class folders of {where} are class names of {model} (from {src}): "
                                         "labels are its class ids"))
    if mode == "class_names":
        known = (f"its class names {_shown(class_names.names)} from {src}" if class_names is not None
                 else "no class names (none in the model, no class-names file given)")
        raise MismatchError(
            f"class folders {_shown(missing)} of {where} are not class names of {model}, which has {known}; "
            "set labels = 'folder' to use the folder names as the class vocabulary, labels = 'predicted', or give "
            "a class-names file (one name per line, or JSON) that lists the model's classes")
    ids = tuple(folders.index(c) for c in folder_classes)
    why = ("has no class names" if class_names is None
           else f"has class names {_shown(class_names.names, 4)} from {src} that do not include {_shown(missing, 4)}")
    return Labels(ids, LabelDecision(
        mode, "folder_vocabulary", tuple(folders), False, src,
        f"class folders {_shown(folders, 4)} of {where} are the label vocabulary: {model} {why}, so the labels "
        "index these folders, not the model's outputs (accuracy against the model is not measured)"))


def labels_for_source(source: Any, mode: str, adapter: Any = None,
                      class_names: str | Path | Sequence[str] | ClassNames | None = None,
                      predict: Callable[[], Sequence[int]] | None = None, batch_size: int = 64) -> Labels:
    """:func:`resolve_labels` for an :class:`~sae_cafe.image_source.ImageSource` (or anything it accepts) and
    a model adapter (its class names, its name and, for ``"predicted"``, its predictions).

    A dataset of ``(image, int label)`` pairs carries class ids already: they are used as given (except in
    ``"predicted"`` mode) and the decision says so.
    """
    src = ImageSource(source)
    names = class_names_for(adapter, class_names)
    model = getattr(adapter, "name", "the model")
    if mode == "predicted" and predict is None and adapter is not None:
        predict = lambda: _predictions(adapter, src, batch_size)  # noqa: E731
    given = [src.label(i) for i in range(len(src))]
    if mode != "predicted" and given and all(isinstance(c, int) for c in given):
        if mode not in LABEL_MODES:
            raise SaeCafeError(f"labels must be one of {', '.join(map(repr, LABEL_MODES))}, got {mode!r}")
        return Labels(tuple(given), LabelDecision(
            mode, "model_classes", names.names if names else (), True, names.source if names else None,
            f"labels of {src.description} are the class ids it carries, taken as {model}'s class ids"))
    folder_classes = [None if c is None else str(c) for c in given]
    return resolve_labels(mode, folder_classes, names, predict, model=model, where=src.description,
                          num_classes=getattr(adapter, "num_classes", None))


def _predictions(adapter: Any, source: ImageSource, batch_size: int) -> list[int]:
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ids, x, _next in source.batches(adapter, batch_size):
            out += adapter.model(x).argmax(-1).tolist()
    return out


__all__ = ["LABEL_MODES", "ClassNames", "LabelDecision", "Labels", "class_names_for", "labels_for_source",
           "read_class_names", "resolve_labels"]
