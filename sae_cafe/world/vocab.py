"""Vocabulary of the concept world: shapes, colours, patterns, backgrounds and the 12 classes.

A class is a conjunction *shape × colour* of the target object. Every shape and every colour occurs in
exactly two classes, so neither attribute alone decides the class; distractor objects carry the other 24
(shape, colour) pairs, often sharing the target's shape or its colour, so a model has to bind the two
attributes on one object. Pattern and background are nuisance concepts (uniform over classes).
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
#: Hue (degrees) of each colour; 60° apart, jittered by ±``hue_jitter`` per object.
COLOUR_HUES: tuple[float, ...] = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
#: Colour families (a coarser concept level): warm hues vs cool hues.
COLOUR_FAMILIES: dict[str, tuple[str, ...]] = {"warm": ("red", "yellow", "magenta"),
                                               "cool": ("green", "cyan", "blue")}
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
#: ``plain`` is a uniform grey; the others are crops of scikit-image's bundled texture photographs.
BACKGROUNDS: tuple[str, ...] = ("plain", "brick", "grass", "gravel")
TEXTURES: tuple[str, ...] = BACKGROUNDS[1:]

#: (shape index, colour index) of each class: shape i with colour i and colour i+1 (cyclic).
CLASS_PAIRS: tuple[tuple[int, int], ...] = tuple(
    pair for i in range(len(SHAPES)) for pair in ((i, i), (i, (i + 1) % len(COLOURS))))
CLASS_NAMES: tuple[str, ...] = tuple(f"{COLOURS[c]}_{SHAPES[s]}" for s, c in CLASS_PAIRS)
NUM_CLASSES = len(CLASS_NAMES)

# Attribute-map codes: -1 where the attribute does not apply (object attributes on background pixels and
# the background kind under objects).
NONE = -1


def class_of(shape: int, colour: int) -> int:
    """Class index of a (shape, colour) pair, or -1 when the pair is not a class (a distractor pair)."""
    try:
        return CLASS_PAIRS.index((shape, colour))
    except ValueError:
        return -1


def vocabulary() -> dict:
    """The whole vocabulary as JSON-able dict (written next to exported worlds)."""
    return {
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "colour_hues": list(COLOUR_HUES),
        "colour_families": {k: list(v) for k, v in COLOUR_FAMILIES.items()},
        "patterns": list(PATTERNS),
        "backgrounds": list(BACKGROUNDS),
        "classes": [{"index": i, "name": n, "shape": SHAPES[s], "colour": COLOURS[c]}
                    for i, (n, (s, c)) in enumerate(zip(CLASS_NAMES, CLASS_PAIRS))],
        "attribute_map_codes": "index into the lists above; -1 = not applicable at this pixel",
    }
