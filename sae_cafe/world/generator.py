"""Deterministic, vectorised generator of concept-world scenes with full ground truth.

Each image holds one *target* object (object 0, instance id 1) whose (shape, colour) pair is one of the 12
classes, and 1–3 *distractors* whose pairs are never a class but often share the target's shape or its
colour. Objects sit in distinct cells of a ``grid × grid`` layout (no overlap), are drawn without
anti-aliasing (masks are exact) with a two-tone pattern (light tone = the object colour, dark tone = the
same hue darker), on a plain grey or a texture crop from scikit-image's bundled photographs.

Hand-written (no library renders labelled procedural scenes with per-pixel attribute maps); all drawing is
numpy on (M, H, W) coordinate grids, thousands of images per second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from ..errors import SaeCafeError
from . import vocab as V


@dataclass
class WorldConfig:
    """Generator settings (sizes in pixels are for ``size``; patterns scale with ``size / 64``)."""

    size: int = 64
    grid: int = 2
    min_distractors: int = 1
    max_distractors: int = 3
    radius: tuple[float, float] = (0.14, 0.22)  # object radius as a fraction of ``size``
    p_share_shape: float = 0.4  # a distractor has the target's shape (and a non-class colour)
    p_share_colour: float = 0.4  # ... or the target's colour (and a non-class shape); else random pair
    hue_jitter: float = 6.0  # degrees
    saturation: tuple[float, float] = (0.75, 1.0)
    value: tuple[float, float] = (0.7, 1.0)
    dark: float = 0.45  # dark pattern tone = light tone × dark
    pattern_period: float = 6.0  # pixels at size 64
    texture_scale: tuple[float, float] = (1.0, 2.5)  # texture crop side = size × scale (subsampled)
    background_level: tuple[float, float] = (0.3, 0.7)
    texture_contrast: tuple[float, float] = (0.5, 0.9)
    tint: float = 0.06  # ± per-channel tint of backgrounds (keeps them grey-ish)

    def validate(self) -> None:
        cells = self.grid * self.grid
        if not 0 <= self.min_distractors <= self.max_distractors <= cells - 1:
            raise SaeCafeError(f"WorldConfig: need 0 <= min_distractors <= max_distractors <= grid²-1 = "
                               f"{cells - 1}, got {self.min_distractors}..{self.max_distractors}; lower them "
                               "or raise grid")
        if 2 * self.radius[1] * self.size > self.size / self.grid or self.radius[0] > self.radius[1]:
            raise SaeCafeError(f"WorldConfig: radius {self.radius} does not fit a {self.grid}×{self.grid} "
                               f"grid (max radius is {0.5 / self.grid:.3f} of the size)")
        if self.size < 16:
            raise SaeCafeError(f"WorldConfig: size {self.size} is too small; use >= 16 pixels")


@dataclass
class World:
    """A batch of generated scenes and their ground truth (numpy arrays).

    Attributes:
        images: (N, H, W, 3) uint8 RGB.
        labels: (N,) int64 class index (see ``vocab.CLASS_NAMES``).
        instance: (N, H, W) uint8; 0 = background, k+1 = object k; the target is object 0 (id 1).
        shape_map, colour_map, pattern_map: (N, H, W) int8 object attribute per pixel, -1 on background.
        background_map: (N, H, W) int8 background kind per visible background pixel, -1 under objects.
        objects: per object slot (N, K) arrays ``shape``, ``colour``, ``pattern`` (int8, -1 if absent),
            ``present`` (bool), ``cx``, ``cy``, ``radius``, ``angle`` (float32, pixels / radians).
        boxes: (N, K, 4) int16 (x0, y0, x1, y1) pixel box of each object's mask (x1, y1 exclusive), -1 absent.
        background: (N,) int8 background kind of each image.
    """

    images: np.ndarray
    labels: np.ndarray
    instance: np.ndarray
    shape_map: np.ndarray
    colour_map: np.ndarray
    pattern_map: np.ndarray
    background_map: np.ndarray
    objects: dict[str, np.ndarray]
    boxes: np.ndarray
    background: np.ndarray
    config: WorldConfig = field(default_factory=WorldConfig)
    seed: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def target_mask(self) -> np.ndarray:
        """(N, H, W) bool mask of the target object."""
        return self.instance == 1

    def attribute_maps(self) -> dict[str, np.ndarray]:
        return {"shape": self.shape_map, "colour": self.colour_map, "pattern": self.pattern_map,
                "background": self.background_map}

    def class_names(self) -> list[str]:
        return list(V.CLASS_NAMES)


# ----- tables -----------------------------------------------------------------------------------------
_CLASS_SET = set(V.CLASS_PAIRS)
_NS, _NC = len(V.SHAPES), len(V.COLOURS)
#: for each shape the colours that make a non-class pair (and vice versa); each row has 4 entries
_FREE_COLOURS = np.array([[c for c in range(_NC) if (s, c) not in _CLASS_SET] for s in range(_NS)])
_FREE_SHAPES = np.array([[s for s in range(_NS) if (s, c) not in _CLASS_SET] for c in range(_NC)])
_FREE_PAIRS = np.array([(s, c) for s in range(_NS) for c in range(_NC) if (s, c) not in _CLASS_SET])
_CLASS_ARR = np.array(V.CLASS_PAIRS)


@functools.lru_cache(maxsize=1)
def load_textures() -> np.ndarray:
    """(T, 512, 512) float32 grey textures in [0, 1] (2–98 % percentile stretch), order ``vocab.TEXTURES``.

    They ship with scikit-image (``skimage.data.brick`` …): nothing is downloaded.
    """
    import skimage.data

    out = []
    for name in V.TEXTURES:
        try:
            t = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - any loader failure is the same installation problem
            raise SaeCafeError(f"cannot load texture skimage.data.{name}() ({type(e).__name__}: {e}); "
                               "reinstall scikit-image (the textures ship with it)") from e
        if t.ndim == 3:
            t = t[..., :3].mean(-1)
        t = t[:512, :512]
        lo, hi = np.percentile(t, [2, 98])
        out.append(np.clip((t - lo) / max(hi - lo, 1e-6), 0, 1))
    return np.stack(out).astype(np.float32)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hue in degrees, s and v in [0, 1] (any equal shapes) → (..., 3) RGB in [0, 1]."""
    h6 = (np.asarray(h) % 360.0) / 60.0
    k = (np.array([5.0, 3.0, 1.0]) + h6[..., None]) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# ----- shapes and patterns on local coordinates (u, v in radius units, rotated) --------------------------
def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho2 = u * u + v * v
    name = V.SHAPES[shape]
    if name == "circle":
        return rho2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if name == "triangle":  # equilateral, circumradius 1.1, apex up in the local frame
        inr = 0.55
        m = v <= inr
        for a in (np.deg2rad(30.0), np.deg2rad(150.0)):
            m &= (u * np.cos(a) - v * np.sin(a)) <= inr
        return m
    if name == "star":  # five points, outer radius 1.05, inner 0.45
        outer, inner, wedge = 1.05, 0.45, 2 * np.pi / 5
        phi = (np.arctan2(v, u) + np.pi / 2) % wedge
        phi = np.minimum(phi, wedge - phi)
        rho = np.sqrt(rho2)
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        ax, ay = outer, 0.0
        bx, by = inner * np.cos(wedge / 2), inner * np.sin(wedge / 2)
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        cross_o = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
        return cross * np.sign(cross_o) >= 0
    if name == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.55 ** 2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    raise AssertionError(name)


def _pattern_dark(pattern: int, pu: np.ndarray, pv: np.ndarray, period: float) -> np.ndarray:
    """Dark-tone pixels of a pattern; ``pu, pv`` are rotated pixel offsets from the object centre."""
    name = V.PATTERNS[pattern]
    half = period / 2
    if name == "solid":
        return np.zeros(pu.shape, bool)
    if name == "stripes":
        return np.floor(pu / half).astype(np.int64) % 2 == 1
    if name == "dots":
        du = pu - period * np.round(pu / period)
        dv = pv - period * np.round(pv / period)
        return du * du + dv * dv <= (0.3 * period) ** 2
    if name == "checker":
        return (np.floor(pu / half).astype(np.int64) + np.floor(pv / half).astype(np.int64)) % 2 == 1
    raise AssertionError(name)


# ----- parameters --------------------------------------------------------------------------------------
def _draw_params(n: int, rng: np.random.Generator, cfg: WorldConfig) -> dict[str, np.ndarray]:
    """All random choices of ``n`` scenes (small arrays), drawn in a fixed order from ``rng``."""
    K = 1 + cfg.max_distractors
    S = cfg.size
    labels = rng.permutation(np.arange(n) % V.NUM_CLASSES)
    n_distr = rng.integers(cfg.min_distractors, cfg.max_distractors + 1, n)
    cells = np.argsort(rng.random((n, cfg.grid * cfg.grid)), axis=1)[:, :K]
    present = np.arange(K)[None] < (1 + n_distr)[:, None]

    shape = np.empty((n, K), np.int64)
    colour = np.empty((n, K), np.int64)
    shape[:, 0], colour[:, 0] = _CLASS_ARR[labels, 0], _CLASS_ARR[labels, 1]
    mode = rng.choice(3, size=(n, K - 1), p=[cfg.p_share_shape, cfg.p_share_colour,
                                            1 - cfg.p_share_shape - cfg.p_share_colour])
    pick4 = rng.integers(0, 4, (n, K - 1))
    pick_free = rng.integers(0, len(_FREE_PAIRS), (n, K - 1))
    ts, tc = shape[:, :1].repeat(K - 1, 1), colour[:, :1].repeat(K - 1, 1)
    ds = np.where(mode == 0, ts, np.where(mode == 1, _FREE_SHAPES[tc, pick4], _FREE_PAIRS[pick_free, 0]))
    dc = np.where(mode == 0, _FREE_COLOURS[ts, pick4], np.where(mode == 1, tc, _FREE_PAIRS[pick_free, 1]))
    shape[:, 1:], colour[:, 1:] = ds, dc

    pattern = rng.integers(0, len(V.PATTERNS), (n, K))
    radius = rng.uniform(cfg.radius[0], cfg.radius[1], (n, K)) * S
    cell = S / cfg.grid
    jit = rng.uniform(0, 1, (n, K, 2))
    cy = (cells // cfg.grid) * cell + radius + jit[..., 0] * (cell - 2 * radius)
    cx = (cells % cfg.grid) * cell + radius + jit[..., 1] * (cell - 2 * radius)
    angle = rng.uniform(0, 2 * np.pi, (n, K))
    hue = np.asarray(V.COLOUR_HUES)[colour] + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter, (n, K))
    sat = rng.uniform(*cfg.saturation, (n, K))
    val = rng.uniform(*cfg.value, (n, K))

    bg = rng.integers(0, len(V.BACKGROUNDS), n)
    tex_scale = rng.uniform(*cfg.texture_scale, n)
    tex_pos = rng.uniform(0, 1, (n, 2))
    level = rng.uniform(*cfg.background_level, n)
    contrast = rng.uniform(*cfg.texture_contrast, n)
    tint = 1.0 + rng.uniform(-cfg.tint, cfg.tint, (n, 3))
    for a in (shape, colour, pattern):
        a[~present] = -1
    return dict(labels=labels, present=present, shape=shape, colour=colour, pattern=pattern, radius=radius,
                cx=cx, cy=cy, angle=angle, hue=hue, sat=sat, val=val, bg=bg, tex_scale=tex_scale,
                tex_pos=tex_pos, level=level, contrast=contrast, tint=tint)


# ----- rendering ---------------------------------------------------------------------------------------
def _render(p: dict[str, np.ndarray], cfg: WorldConfig) -> dict[str, np.ndarray]:
    n, K = p["shape"].shape
    S = cfg.size
    textures = load_textures()
    T = textures.shape[1]
    # background: texture crop (subsampled by ``tex_scale``) or a constant grey, then level/contrast/tint
    side = np.minimum(S * p["tex_scale"], T - 1)
    y0 = (p["tex_pos"][:, 0] * (T - side)).astype(np.int64)
    x0 = (p["tex_pos"][:, 1] * (T - side)).astype(np.int64)
    steps = np.arange(S)[None] * (side / S)[:, None]
    iy = np.minimum(y0[:, None] + steps.astype(np.int64), T - 1)
    ix = np.minimum(x0[:, None] + steps.astype(np.int64), T - 1)
    tid = np.maximum(p["bg"] - 1, 0)
    tex = textures[tid[:, None, None], iy[:, :, None], ix[:, None, :]]
    tex = np.where((p["bg"] == 0)[:, None, None], 0.5, tex)
    grey = p["level"][:, None, None] + p["contrast"][:, None, None] * (tex - 0.5)
    img = np.clip(grey[..., None] * p["tint"][:, None, None, :], 0, 1).astype(np.float32)

    instance = np.zeros((n, S, S), np.uint8)
    shape_map = np.full((n, S, S), V.NONE, np.int8)
    colour_map, pattern_map = shape_map.copy(), shape_map.copy()
    boxes = np.full((n, K, 4), -1, np.int16)
    light = hsv_to_rgb(p["hue"], p["sat"], p["val"]).astype(np.float32)  # (n, K, 3)
    dark = light * cfg.dark
    yy, xx = np.meshgrid(np.arange(S, dtype=np.float32) + 0.5, np.arange(S, dtype=np.float32) + 0.5,
                         indexing="ij")
    period = cfg.pattern_period * S / 64.0
    for k in range(K):
        idx = np.flatnonzero(p["present"][:, k])
        if not len(idx):
            continue
        f32 = {a: p[a][idx, k].astype(np.float32)[:, None, None] for a in ("radius", "angle", "cx", "cy")}
        ca, sa = np.cos(f32["angle"]), np.sin(f32["angle"])
        dx, dy = xx[None] - f32["cx"], yy[None] - f32["cy"]
        pu, pv = dx * ca + dy * sa, dy * ca - dx * sa
        u, v = pu / f32["radius"], pv / f32["radius"]
        mask = np.zeros((len(idx), S, S), bool)
        darkpix = np.zeros((len(idx), S, S), bool)
        shapes, pats = p["shape"][idx, k], p["pattern"][idx, k]
        for s in np.unique(shapes):
            sel = shapes == s
            mask[sel] = _shape_mask(int(s), u[sel], v[sel])
        for q in np.unique(pats):
            sel = pats == q
            darkpix[sel] = _pattern_dark(int(q), pu[sel], pv[sel], period)
        obj, py, px = np.nonzero(mask)  # every masked pixel: object (row of idx), y, x
        flat = (idx[obj] * S + py) * S + px
        tone = darkpix[obj, py, px][:, None]
        img.reshape(-1, 3)[flat] = np.where(tone, dark[idx[obj], k], light[idx[obj], k])
        for m, a in ((instance, np.full(len(idx), k + 1)), (shape_map, shapes),
                     (colour_map, p["colour"][idx, k]), (pattern_map, pats)):
            m.reshape(-1)[flat] = a[obj]
        rows, cols = mask.any(2), mask.any(1)
        boxes[idx, k] = np.stack([cols.argmax(1), rows.argmax(1), S - cols[:, ::-1].argmax(1),
                                  S - rows[:, ::-1].argmax(1)], 1)
    background_map = np.where(instance == 0, p["bg"][:, None, None], V.NONE).astype(np.int8)
    images = np.round(img * 255).astype(np.uint8)
    return dict(images=images, instance=instance, shape_map=shape_map, colour_map=colour_map,
                pattern_map=pattern_map, background_map=background_map, boxes=boxes)


def generate(n: int, seed: int = 0, size: int | None = None, config: WorldConfig | None = None,
             chunk: int = 512) -> World:
    """Generate ``n`` scenes; the same (n, seed, config) gives identical arrays.

    All random choices are drawn first from ``numpy.random.default_rng(seed)``; rendering is
    deterministic and done in chunks of ``chunk`` images to bound memory.
    """
    cfg = WorldConfig() if config is None else config
    if size is not None:
        cfg = WorldConfig(**{**cfg.__dict__, "size": int(size)})
    cfg.validate()
    if n < 0:
        raise SaeCafeError(f"generate: n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    p = _draw_params(n, rng, cfg)
    parts = []
    for i in range(0, max(n, 1), chunk):
        sub = {k: v[i:i + chunk] for k, v in p.items()}
        parts.append(_render(sub, cfg))
    out = {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}
    objects = {"shape": p["shape"].astype(np.int8), "colour": p["colour"].astype(np.int8),
               "pattern": p["pattern"].astype(np.int8), "present": p["present"],
               "cx": p["cx"].astype(np.float32), "cy": p["cy"].astype(np.float32),
               "radius": p["radius"].astype(np.float32), "angle": p["angle"].astype(np.float32)}
    return World(labels=p["labels"].astype(np.int64), objects=objects, background=p["bg"].astype(np.int8),
                 config=cfg, seed=seed, **out)
