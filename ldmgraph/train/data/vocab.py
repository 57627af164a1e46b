"""The words of the procedural data set and the held-out split of one-object combinations.

Colours are saturated and far apart in RGB; backgrounds are low-chroma tones, so a pixel's chroma
(max - min of its RGB) separates shapes from background and the judge can read them back.
"""

from __future__ import annotations

import itertools

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (235, 220, 25),
    "green": (35, 175, 55),
    "cyan": (25, 200, 215),
    "blue": (35, 65, 225),
    "purple": (140, 45, 205),
    "pink": (235, 55, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# position word -> centre (x, y) in pixels of the 64x64 canvas
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "centre": (32.0, 32.0),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# size word -> half extent in pixels (circle radius, half side of a square / triangle box)
SIZES: dict[str, float] = {"small": 7.0, "large": 12.0}
IMAGE_SIZE = 64

Combo = tuple[str, str, str]  # (colour, shape, position)


def all_combos() -> list[Combo]:
    """Every one-object colour-shape-position combination, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, POSITIONS))


def is_held_out(combo: Combo) -> bool:
    """True for the one-object combinations that never appear in training.

    A fixed modular rule holds out exactly a quarter (30 of 120), balanced so that every colour,
    shape and position keeps appearing in training: the held-out captions are new combinations of
    seen words, as the issue asks.
    """
    colour, shape, position = combo
    c = list(COLOURS).index(colour)
    s = SHAPES.index(shape)
    p = list(POSITIONS).index(position)
    return (c + 2 * s + 3 * p) % 4 == 0


def held_out_combos() -> list[Combo]:
    """The held-out one-object combinations (a quarter of all)."""
    return [c for c in all_combos() if is_held_out(c)]


def train_combos() -> list[Combo]:
    """The one-object combinations that training images may contain."""
    return [c for c in all_combos() if not is_held_out(c)]
