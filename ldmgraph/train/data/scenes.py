"""Procedural captioned scenes: one or two shapes on a low-chroma background, from a seed.

A scene is sampled by :func:`sample_scene` from a numpy generator and drawn by :func:`render`.
Everything is a pure function of (seed, split, index), so a data set needs no files and every
image can be rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vocab import (
    COLOURS,
    IMAGE_SIZE,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    Combo,
    all_combos,
    held_out_combos,
    train_combos,
)

SUPERSAMPLE = 4  # render at 4x and average down: anti-aliased edges
JITTER = 3.0  # pixels of random offset of a shape's centre
SIZE_JITTER = 1.0  # pixels of random change of a shape's half extent
GAP = 2.0  # minimum free pixels between the boxes of two shapes


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: its words and where it is drawn."""

    colour: str
    shape: str
    position: str
    size: str
    cx: float
    cy: float
    half: float

    @property
    def combo(self) -> Combo:
        return (self.colour, self.shape, self.position)

    def phrase(self, with_size: bool) -> str:
        """E.g. "a small red circle on the left"."""
        words = f"{self.size} {self.colour}" if with_size else self.colour
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Background:
    """A low-chroma solid tone or linear gradient between two tones (RGB 0..1)."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    angle: float  # direction of the gradient, radians


@dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[ShapeSpec, ...]
    caption: str


def caption_of(shapes: tuple[ShapeSpec, ...] | list[ShapeSpec], with_size: list[bool]) -> str:
    """Join the shapes' phrases: "a red circle on the left and a small blue square at the bottom"."""
    return " and ".join(s.phrase(w) for s, w in zip(shapes, with_size, strict=True))


def _boxes_apart(a: ShapeSpec, b: ShapeSpec) -> bool:
    reach = a.half + b.half + GAP
    return abs(a.cx - b.cx) > reach or abs(a.cy - b.cy) > reach


def _place(rng: np.random.Generator, combo: Combo, size: str) -> ShapeSpec:
    colour, shape, position = combo
    x, y = POSITIONS[position]
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    half = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return ShapeSpec(colour, shape, position, size, float(x + dx), float(y + dy), float(half))


def sample_background(rng: np.random.Generator) -> Background:
    """Dark or light, tinted at most slightly (chroma <= 0.08), solid or a gradient."""

    def tone(value: float) -> tuple[float, float, float]:
        tint = rng.uniform(-0.04, 0.04, size=3)
        rgb = np.clip(value + tint, 0.0, 1.0)
        return (float(rgb[0]), float(rgb[1]), float(rgb[2]))

    dark = rng.random() < 0.5
    lo, hi = (0.04, 0.35) if dark else (0.62, 0.95)
    start = tone(rng.uniform(lo, hi))
    end = start if rng.random() < 0.3 else tone(rng.uniform(lo, hi))
    return Background(start, end, float(rng.uniform(0, 2 * np.pi)))


def sample_scene(
    rng: np.random.Generator,
    combos: list[Combo],
    two_object_prob: float = 0.5,
    size_word_prob: float = 0.5,
) -> Scene:
    """Draw a scene whose shapes are all from ``combos`` (one, or two that do not overlap)."""
    n = 2 if rng.random() < two_object_prob else 1
    while True:
        shapes: list[ShapeSpec] = []
        for _ in range(n):
            combo = combos[int(rng.integers(len(combos)))]
            size = "small" if rng.random() < 0.5 else "large"
            shapes.append(_place(rng, combo, size))
        if n == 1 or (shapes[0].position != shapes[1].position and _boxes_apart(shapes[0], shapes[1])):
            break
    with_size = [bool(rng.random() < size_word_prob) for _ in shapes]
    return Scene(sample_background(rng), tuple(shapes), caption_of(shapes, with_size))


def _shape_mask(spec: ShapeSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Coverage of one shape on a grid of pixel-centre coordinates (bool)."""
    u, v = xs - spec.cx, ys - spec.cy
    h = spec.half
    if spec.shape == "circle":
        return u * u + v * v <= h * h
    if spec.shape == "square":
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if spec.shape == "triangle":  # apex up, base down, inside the 2h x 2h box
        return (v <= h) & (v >= -h) & (np.abs(u) <= (v + h) / 2)
    raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene: float32 [H, W, 3] in 0..1 (size must be 64; shapes anti-aliased).

    The background is linear, so it is drawn at pixel resolution; each shape is drawn at
    SUPERSAMPLE x resolution over its own box only and averaged down (its coverage blends it in).
    """
    if size != IMAGE_SIZE:
        raise ValueError(f"render draws {IMAGE_SIZE}x{IMAGE_SIZE} images, not {size}")
    coords = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = np.meshgrid(coords, coords)
    bg = scene.background
    direction = (xs - size / 2) * np.cos(bg.angle) + (ys - size / 2) * np.sin(bg.angle)
    t = np.clip(direction / size + 0.5, 0.0, 1.0)[..., None]
    image = (1 - t) * np.asarray(bg.start, np.float32) + t * np.asarray(bg.end, np.float32)
    for spec in scene.shapes:
        x0 = max(int(np.floor(spec.cx - spec.half)) - 1, 0)
        x1 = min(int(np.ceil(spec.cx + spec.half)) + 1, size)
        y0 = max(int(np.floor(spec.cy - spec.half)) - 1, 0)
        y1 = min(int(np.ceil(spec.cy + spec.half)) + 1, size)
        sub_x = x0 + (np.arange((x1 - x0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
        sub_y = y0 + (np.arange((y1 - y0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
        gx, gy = np.meshgrid(sub_x, sub_y)
        cover = _shape_mask(spec, gx, gy).astype(np.float32)
        cover = cover.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        colour = np.asarray(COLOURS[spec.colour], np.float32) / 255.0
        image[y0:y1, x0:x1] = (1 - cover) * image[y0:y1, x0:x1] + cover * colour
    return np.clip(image, 0.0, 1.0).astype(np.float32)


SPLITS = {"train": 0, "test": 1, "heldout": 2}


def scene_at(seed: int, split: str, index: int, **kwargs: float) -> Scene:
    """The scene number ``index`` of a split, a pure function of its arguments.

    ``train``: only training combinations. ``test``: any combination (unseen images for the
    autoencoder and super-resolution figures). ``heldout``: only held-out combinations.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    combos = {"train": train_combos, "test": all_combos, "heldout": held_out_combos}[split]()
    return sample_scene(rng, combos, **kwargs)  # type: ignore[arg-type]


def batch(seed: int, split: str, start: int, count: int, **kwargs: float) -> tuple[np.ndarray, list[Scene]]:
    """Images [count, 64, 64, 3] (0..1) and scenes number start .. start + count - 1."""
    scenes = [scene_at(seed, split, i, **kwargs) for i in range(start, start + count)]
    return np.stack([render(s) for s in scenes]), scenes
