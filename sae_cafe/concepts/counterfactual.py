"""Counterfactual ground truth of what an SAE latent responds to, from the concept world's scene parameters.

The world generator draws every scene from explicit parameters (``world.generator._draw_params``) before
rendering it (``_render``). For each of a latent's top-activating exemplars (image, position) on *held-out*
scenes, this module changes one attribute of one object (shape, colour, pattern) or the background kind at a
time to each other value, re-renders the scene with everything else equal, and measures the drop of the
latent's activation at the exemplar's position. No evidence map is used.

Rules (fixed in advance, :class:`GroundTruthRule`, recorded with every result):

* relative drop of one counterfactual ``v``: ``d_v = clip((a0 − a_v) / a0, −1, 1)`` (``a0`` the activation on
  the re-rendered original, > 0 for an exemplar);
* drop of (object k, attribute): the mean of ``d_v`` over all other values of that attribute of object k;
  drop of an attribute at an exemplar: the max over objects (the background is one "object"); the attribute's
  value at the exemplar is the value on the object that gave the max;
* a latent's drop per attribute: the mean over its exemplars; its ground truth is the attribute with the
  largest drop, its value the drop-weighted majority value over the exemplars;
* **unlabeled** when the largest drop is below ``min_drop``;
* **pair** when the second attribute's drop is at least ``pair_within`` × the largest (then both
  (attribute, value)s are the ground truth and a label matching either counts as correct).

Colour changes keep each object's hue jitter, saturation and value (hue = new colour's hue + the same offset).
Hand-written: no library provides counterfactual re-rendering of procedural scenes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import MismatchError, SaeCafeError
from ..world import vocab as V
from ..world.generator import WorldConfig, _draw_params, _render

#: attributes changed by the counterfactuals, in this order (columns of the drop tables)
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern", "background")
VALUES: dict[str, tuple[str, ...]] = {"shape": V.SHAPES, "colour": V.COLOURS, "pattern": V.PATTERNS,
                                      "background": V.BACKGROUNDS}
_PARAM = {"shape": "shape", "colour": "colour", "pattern": "pattern", "background": "bg"}

#: images (N, H, W, 3) uint8 → SAE latents (N, P, S) float at every layer position (row-major grid)
EncodeFn = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class GroundTruthRule:
    """The rule turning counterfactual drops into a ground-truth concept (fixed before any evidence is seen).

    ``min_drop``: a latent whose largest mean relative drop is below this is *unlabeled*.
    ``pair_within``: the second attribute joins as a *pair* label when its drop ≥ ``pair_within`` × the first.
    ``max_values``: change each attribute to at most this many other values (None: all others), the first
    ones in a fixed per-scene random order (seeded by ``seed``).
    """

    min_drop: float = 0.3
    pair_within: float = 0.8
    max_values: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.min_drop < 1 or not 0 < self.pair_within <= 1:
            raise SaeCafeError(f"GroundTruthRule: need 0 < min_drop < 1 and 0 < pair_within ≤ 1, got "
                               f"min_drop={self.min_drop}, pair_within={self.pair_within}")
        if self.max_values is not None and self.max_values < 1:
            raise SaeCafeError(f"GroundTruthRule: max_values must be ≥ 1 or None, got {self.max_values}")

    def to_json(self) -> dict:
        return {**asdict(self), "drop": "clip((a0 - a_v) / a0, -1, 1) at the exemplar's position",
                "attribute_drop": "mean over other values of one object's attribute; max over objects",
                "latent_drop": "mean over the latent's exemplars",
                "value": "drop-weighted majority over exemplars of the value on the max-drop object",
                "unlabeled": f"largest latent drop < {self.min_drop}",
                "pair": f"second attribute's drop >= {self.pair_within} x the largest; a label matching either "
                        "member counts as correct"}


@dataclass(frozen=True)
class Scenes:
    """Held-out scenes with their parameters: ``images`` (N, H, W, 3) uint8, ``params`` (the generator's
    parameter arrays, first axis N), ``maps`` the per-pixel attribute maps {attribute: (N, H, W) int8, -1 where
    not applicable}, ``instance`` (N, H, W) uint8 (0 background, k+1 object k)."""

    images: np.ndarray
    params: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    instance: np.ndarray
    config: WorldConfig
    seed: int


def draw_scenes(n: int, seed: int, config: WorldConfig | None = None) -> Scenes:
    """``n`` scenes of world seed ``seed`` — the same images as ``world.generate(n, seed)`` — with their
    parameters kept for re-rendering."""
    cfg = config or WorldConfig()
    cfg.validate()
    p = _draw_params(n, np.random.default_rng(seed), cfg)
    r = _render(p, cfg)
    maps = {"shape": r["shape_map"], "colour": r["colour_map"], "pattern": r["pattern_map"],
            "background": r["background_map"]}
    return Scenes(r["images"], p, maps, r["instance"], cfg, seed)


def variants(p: dict[str, np.ndarray], i: int, rule: GroundTruthRule | None = None
             ) -> tuple[dict[str, np.ndarray], list[tuple[int, str, int]]]:
    """Counterfactual parameters of scene ``i``: row 0 is the original, each further row changes one attribute
    of one object (object −1 = the background) to another value.

    Returns the stacked parameters (1 + V rows) and, per changed row, (object, attribute, new value index).
    """
    rule = rule or GroundTruthRule()
    rng = np.random.default_rng([rule.seed, i])
    rows: list[dict[str, np.ndarray]] = []
    meta: list[tuple[int, str, int]] = []
    base = {k: v[i:i + 1].copy() for k, v in p.items()}

    def others(n_vals: int, cur: int) -> list[int]:
        o = [v for v in rng.permutation(n_vals).tolist() if v != cur]
        return o if rule.max_values is None else o[:rule.max_values]

    K = p["shape"].shape[1]
    for k in range(K):
        if not p["present"][i, k]:
            continue
        for attr in ("shape", "colour", "pattern"):
            cur = int(p[attr][i, k])
            for v in others(len(VALUES[attr]), cur):
                q = {a: b.copy() for a, b in base.items()}
                q[attr][0, k] = v
                if attr == "colour":  # keep the jitter offset of the hue
                    q["hue"][0, k] = p["hue"][i, k] - V.COLOUR_HUES[cur] + V.COLOUR_HUES[v]
                rows.append(q)
                meta.append((k, attr, v))
    cur = int(p["bg"][i])
    for v in others(len(V.BACKGROUNDS), cur):
        q = {a: b.copy() for a, b in base.items()}
        q["bg"][0] = v
        rows.append(q)
        meta.append((-1, "background", v))
    stacked = {a: np.concatenate([base[a]] + [r[a] for r in rows]) for a in base}
    return stacked, meta


@dataclass
class GroundTruth:
    """Counterfactual ground truth of L latents from E exemplars.

    Attributes:
        exemplar_drop: (E, 4) mean relative drop per attribute (columns :data:`ATTRIBUTES`) at each exemplar.
        exemplar_value: (E, 4) value index of each attribute on the object that gave the drop.
        activation: (E,) activation ``a0`` on the re-rendered original.
        latent_drop: (L, 4) mean over each latent's exemplars.
        labels: per latent a dict ``{"latent", "attribute", "value", "drop", "pair": [(attribute, value)…]
            or None, "unlabeled": bool}`` (attribute/value are None when unlabeled).
        rule: the rule used. n_renders: counterfactual scenes rendered. seconds: time spent.
    """

    exemplar_drop: np.ndarray
    exemplar_value: np.ndarray
    activation: np.ndarray
    latent_drop: np.ndarray
    labels: list[dict]
    rule: GroundTruthRule
    n_renders: int
    seconds: float


def exemplar_drops(encode: EncodeFn, scenes: Scenes, ex_latent: np.ndarray, ex_image: np.ndarray,
                   ex_pos: np.ndarray, rule: GroundTruthRule | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray, int]:
    """Per exemplar (E,) the drop per attribute (E, 4), its value (E, 4) and ``a0`` (E,); also the number of
    rendered scenes. All exemplars of one image share its counterfactual renders (one encode call per image).
    """
    rule = rule or GroundTruthRule()
    E = len(ex_latent)
    drop = np.zeros((E, len(ATTRIBUTES)))
    value = np.full((E, len(ATTRIBUTES)), -1, np.int64)
    act0 = np.zeros(E)
    n_renders = 0
    for i in np.unique(ex_image):
        sel = np.flatnonzero(ex_image == i)
        q, meta = variants(scenes.params, int(i), rule)
        imgs = _render(q, scenes.config)["images"]
        n_renders += len(imgs)
        lat = encode(imgs)  # (1 + V, P, S)
        if lat.ndim != 3 or lat.shape[0] != len(imgs):
            raise MismatchError(f"encode returned shape {tuple(lat.shape)} for {len(imgs)} images; it must "
                                "return latents (N, P, S)")
        a = lat[:, torch.as_tensor(ex_pos[sel]), torch.as_tensor(ex_latent[sel])].double().numpy()  # (1+V, e)
        a0 = a[0]
        act0[sel] = a0
        rel = np.clip((a0[None] - a[1:]) / np.maximum(a0[None], 1e-12), -1.0, 1.0)  # (V, e)
        rel[:, a0 <= 0] = 0.0
        objs = sorted({m[0] for m in meta})
        for j, attr in enumerate(ATTRIBUTES):
            best = np.full(len(sel), -np.inf)
            best_obj = np.full(len(sel), -2)
            for k in objs:
                rows = [r for r, m in enumerate(meta) if m[0] == k and m[1] == attr]
                if not rows:
                    continue
                d = rel[rows].mean(0)
                upd = d > best
                best[upd], best_obj[upd] = d[upd], k
            drop[sel, j] = np.where(np.isfinite(best), best, 0.0)
            key = _PARAM[attr]
            for e, k in zip(sel, best_obj):
                if k == -1:
                    value[e, j] = int(scenes.params["bg"][i])
                elif k >= 0:
                    value[e, j] = int(scenes.params[key][i, k])
    return drop, value, act0, n_renders


def ground_truth(encode: EncodeFn, scenes: Scenes, latents: np.ndarray, ex_latent: np.ndarray,
                 ex_image: np.ndarray, ex_pos: np.ndarray, rule: GroundTruthRule | None = None) -> GroundTruth:
    """Counterfactual ground truth for ``latents`` (L,) from their exemplars (``ex_latent``, ``ex_image``,
    ``ex_pos``: (E,) latent id, scene index into ``scenes``, flat layer position)."""
    import time

    rule = rule or GroundTruthRule()
    ex_latent, ex_image, ex_pos = (np.asarray(a, np.int64) for a in (ex_latent, ex_image, ex_pos))
    if not (len(ex_latent) == len(ex_image) == len(ex_pos)):
        raise MismatchError("ex_latent, ex_image and ex_pos must have the same length")
    if len(ex_image) and (ex_image.min() < 0 or ex_image.max() >= len(scenes.images)):
        raise MismatchError(f"exemplar image index out of range 0 … {len(scenes.images) - 1}")
    t0 = time.perf_counter()
    drop, value, act0, n_renders = exemplar_drops(encode, scenes, ex_latent, ex_image, ex_pos, rule)
    latents = np.asarray(latents, np.int64)
    ldrop = np.zeros((len(latents), len(ATTRIBUTES)))
    labels = []
    for li, s in enumerate(latents):
        sel = np.flatnonzero(ex_latent == s)
        if not len(sel):
            raise MismatchError(f"latent {int(s)} has no exemplar; give at least one per latent")
        ldrop[li] = drop[sel].mean(0)
        labels.append(decide(int(s), ldrop[li], drop[sel], value[sel], rule))
    return GroundTruth(drop, value, act0, ldrop, labels, rule, n_renders, time.perf_counter() - t0)


def decide(latent: int, latent_drop: np.ndarray, drop: np.ndarray, value: np.ndarray,
           rule: GroundTruthRule) -> dict:
    """Apply ``rule`` to one latent: ``latent_drop`` (4,), its exemplars' ``drop``/``value`` (e, 4)."""
    order = np.argsort(-latent_drop, kind="stable")
    first, second = int(order[0]), int(order[1])
    out = {"latent": latent, "drops": {a: round(float(d), 4) for a, d in zip(ATTRIBUTES, latent_drop)}}
    if latent_drop[first] < rule.min_drop:
        return {**out, "attribute": None, "value": None, "drop": float(latent_drop[first]), "pair": None,
                "unlabeled": True}

    def majority(j: int) -> tuple[str, float]:
        w = np.zeros(len(VALUES[ATTRIBUTES[j]]))
        ok = value[:, j] >= 0
        np.add.at(w, value[ok, j], np.clip(drop[ok, j], 0, None) + 1e-9)
        v = int(w.argmax())
        return VALUES[ATTRIBUTES[j]][v], float(w[v] / max(w.sum(), 1e-12))

    v1, purity = majority(first)
    pair = None
    if latent_drop[second] >= rule.pair_within * latent_drop[first]:
        pair = [(ATTRIBUTES[first], v1), (ATTRIBUTES[second], majority(second)[0])]
    return {**out, "attribute": ATTRIBUTES[first], "value": v1, "value_purity": round(purity, 4),
            "drop": float(latent_drop[first]), "pair": pair, "unlabeled": False}


def label_correct(gt: dict, attribute: str | None, value: str | None, match: str = "value") -> bool | None:
    """Whether a label (attribute, value) matches a ground-truth entry of :func:`decide`; None when the ground
    truth is unlabeled. ``match="value"``: attribute and value must match (either member of a pair);
    ``"attribute"``: the attribute alone."""
    if gt["unlabeled"]:
        return None
    members = gt["pair"] or [(gt["attribute"], gt["value"])]
    if match == "attribute":
        return any(attribute == a for a, _ in members)
    if match != "value":
        raise SaeCafeError(f"match must be 'value' or 'attribute', got {match!r}")
    return any(attribute == a and value == v for a, v in members)
