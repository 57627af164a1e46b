"""The judge: reads colour, shape, position and size back from an image, procedurally.

Shapes are found as connected regions of high-chroma pixels (backgrounds are low-chroma by
construction). Per region: colour = nearest palette colour to its mean RGB; position = nearest
position centre to its centroid; shape from its fill ratio (area / bounding-box area: 1 for a
square, pi/4 for a circle, 1/2 for a triangle); size from its bounding-box extent.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from .vocab import COLOURS, POSITIONS, SIZES, Combo

CHROMA_MIN = 0.3  # a pixel is part of a shape when max(RGB) - min(RGB) exceeds this (0..1 units)
MIN_AREA = 10  # regions smaller than this (pixels) are noise
_PALETTE = np.asarray(list(COLOURS.values()), np.float32) / 255.0
_CENTRES = np.asarray(list(POSITIONS.values()), np.float32)
_SIZE_SPLIT = sum(SIZES.values()) / 2  # half extent between "small" and "large"


@dataclass(frozen=True)
class Reading:
    """What the judge reads of one shape."""

    colour: str
    shape: str
    position: str
    size: str
    cx: float
    cy: float
    area: int

    @property
    def combo(self) -> Combo:
        return (self.colour, self.shape, self.position)


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """Connected regions (4-neighbourhood) of a boolean mask, each as an [N, 2] array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    regions = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.asarray(pixels))
    return regions


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _shape_of(image: np.ndarray, chroma: np.ndarray, pixels: np.ndarray) -> tuple[str, float]:
    """Shape and half extent of a region from its soft coverage.

    Each pixel near the region is read as a mix (1 - a) * background + a * colour; the region's
    area is the sum of a, its width and height the sums of the column / row maxima of a. The fill
    ratio area / (width * height) is then exact up to blur: 1 square, pi/4 circle, 1/2 triangle.
    """
    h, w = chroma.shape
    region = np.zeros((h, w), dtype=bool)
    region[pixels[:, 0], pixels[:, 1]] = True
    near = _dilate(_dilate(region))
    ring = _dilate(_dilate(near)) & ~near & (chroma < CHROMA_MIN / 2)
    colour = np.median(image[region], axis=0)
    background = np.median(image[ring], axis=0) if ring.any() else np.median(image[chroma < 0.15], axis=0)
    direction = colour - background
    cover = ((image - background) @ direction) / max(float(direction @ direction), 1e-6)
    cover = np.where(near, np.clip(cover, 0.0, 1.0), 0.0)
    area = cover.sum()
    width, height = cover.max(axis=0).sum(), cover.max(axis=1).sum()
    fill = area / max(width * height, 1e-6)
    shape = "triangle" if fill < 0.68 else "circle" if fill < 0.89 else "square"
    return shape, float(max(width, height)) / 2.0


def read_image(image: np.ndarray) -> list[Reading]:
    """All shapes the judge finds in an image [H, W, 3] (0..1), largest first."""
    image = np.asarray(image, np.float32)
    chroma = image.max(axis=-1) - image.min(axis=-1)
    readings = []
    for pixels in _regions(chroma > CHROMA_MIN):
        if len(pixels) < MIN_AREA:
            continue
        colours = image[pixels[:, 0], pixels[:, 1]]
        mean = colours.mean(axis=0)
        colour = list(COLOURS)[int(np.argmin(((_PALETTE - mean) ** 2).sum(axis=1)))]
        cy, cx = pixels.mean(axis=0) + 0.5
        position = list(POSITIONS)[int(np.argmin(((_CENTRES - (cx, cy)) ** 2).sum(axis=1)))]
        shape, half = _shape_of(image, chroma, pixels)
        size = "small" if half < _SIZE_SPLIT else "large"
        readings.append(Reading(colour, shape, position, size, float(cx), float(cy), len(pixels)))
    return sorted(readings, key=lambda r: -r.area)


ATTRIBUTES = ("colour", "shape", "position")


def score(image: np.ndarray, expected: list[Combo]) -> dict[str, float]:
    """Fraction of expected objects whose colour / shape / position the judge reads in the image.

    One expected object is compared with the largest region; several are matched to the largest
    regions by the assignment that agrees on the most attributes (a missing region scores 0).
    """
    readings = read_image(image)
    if len(expected) == 1:
        candidates = readings[:1]
    else:
        candidates = readings[: len(expected) + 1]
    best: list[tuple[int, int, int]] = [(0, 0, 0)] * len(expected)
    best_total = -1
    slots: list[Reading | None] = [*candidates, *([None] * len(expected))]
    for chosen in itertools.permutations(range(len(slots)), len(expected)):
        hits = []
        for want, k in zip(expected, chosen, strict=True):
            got = slots[k]
            hits.append((0, 0, 0) if got is None else tuple(int(a == b) for a, b in zip(want, got.combo, strict=True)))
        total = sum(map(sum, hits))
        if total > best_total:
            best, best_total = hits, total  # type: ignore[assignment]
    n = len(expected)
    return {name: sum(h[i] for h in best) / n for i, name in enumerate(ATTRIBUTES)}


def read_in_box(image: np.ndarray, box: tuple[int, int, int, int]) -> Reading | None:
    """The largest shape whose centroid lies inside box (x0, y0, x1, y1), or None."""
    x0, y0, x1, y1 = box
    inside = [r for r in read_image(image) if x0 <= r.cx < x1 and y0 <= r.cy < y1]
    return inside[0] if inside else None
