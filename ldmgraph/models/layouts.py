"""Layouts as the layout-to-image model's tokens (layout2img-openimages256). Torch-free, so that
validating a workflow can check a layout without loading a model.

A layout is a list of objects, each a class and a box: `[class, x, y, width, height]` with the box
in 0..1 of the image. The class is a name or a number. Names are those of the model's object
classes (`LAYOUT_CLASSES_FILE`: the Open Images classes the original training data kept, numbered
as its dataset numbered them: by sorted Open Images MID, `/m/01s55n` last), matched without regard
to case; the twelve classes that the original data merged into others for COCO compatibility
("Man", "Woman", "Boy", "Girl" -> "Person", ...: `MERGED_CLASSES`) give their target's number, as
the original dataset labels them. A number is used as it is: the class number, plus
`n_classes` times the original's flags (1 group of, 2 occluded, 4 depiction, 8 inside).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ldmgraph.graph.limits import json_nesting

LAYOUT_CLASSES_FILE = Path(__file__).resolve().parent.parent / "assets" / "data" / "openimages_layout_classes.tsv"

MERGED_CLASSES = {
    "Woman": "Person", "Man": "Person", "Girl": "Person", "Boy": "Person", "Bull": "Cattle", "Football": "Ball",
    "Tennis ball": "Ball", "Kitchen knife": "Knife", "Submarine sandwich": "Sandwich", "Sofa bed": "Couch",
    "Alarm clock": "Clock", "Wall clock": "Clock",
}
"""Open Images classes the original layout data relabels as another (its COCO unification table)."""


@lru_cache(maxsize=1)
def layout_class_names() -> list[str]:
    """The layout model's object classes in class-number order (340 names)."""
    rows = [line.split("\t") for line in LAYOUT_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")]
    return [name.strip() for _, _, name in rows]


@lru_cache(maxsize=1)
def _numbers_by_name() -> dict[str, int]:
    names = layout_class_names()
    numbers = {name.lower(): i for i, name in enumerate(names)}
    numbers.update({merged.lower(): numbers[target.lower()] for merged, target in MERGED_CLASSES.items()})
    return numbers


class LayoutError(ValueError):
    """A layout that cannot be tokenised; the message says which object and why."""


@dataclass(frozen=True)
class LayoutObject:
    """One object of a layout: its class number and its box (x, y, width, height in 0..1)."""

    number: int
    x: float
    y: float
    width: float
    height: float

    def as_tuple(self) -> tuple[int, float, float, float, float]:
        return (self.number, self.x, self.y, self.width, self.height)


def class_number(value: Any, *, n_numbers: int | None = None) -> int:
    """The class number of a name (case-insensitive; merged classes give their target's) or of a
    number; a name that is not a class raises `LayoutError` listing the closest names."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise LayoutError(f"class {value!r} is neither a class name nor a class number")
    if isinstance(value, int):
        if value < 0 or (n_numbers is not None and value >= n_numbers):
            top = f"0..{n_numbers - 1}" if n_numbers is not None else "0 or more"
            raise LayoutError(f"class number {value} is outside {top}")
        return value
    number = _numbers_by_name().get(value.strip().lower())
    if number is None:
        raise LayoutError(f"{value!r} is not a class of the layout model{_close_matches(value)}")
    return number


def _close_matches(name: str) -> str:
    names = [*layout_class_names(), *MERGED_CLASSES]
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=5, cutoff=0.6)
    if not close:
        return " (the 340 names are listed in ldmgraph/assets/data/openimages_layout_classes.tsv)"
    return "; close matches: " + ", ".join(repr(by_lower[c]) for c in close)


MAX_OBJECTS = 30
"""Objects the released layout-to-image model takes (its 92 tokens: 30 objects and a crop)."""
MAX_LAYOUT_CHARS = 64 * 1024


def parse_layout(text: str, *, n_numbers: int | None = None) -> list[LayoutObject]:
    """The objects of a layout given as JSON text (see the module docstring); raises `LayoutError`
    naming the object (counted from 1) and what is wrong with it."""
    if len(text) > MAX_LAYOUT_CHARS:
        raise LayoutError(f"{len(text)} characters; a layout of at most {MAX_OBJECTS} objects is a few KB")
    if json_nesting(text) > 3:
        raise LayoutError("nested deeper than a list of [class, x, y, width, height] lists")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LayoutError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits, ...
        raise LayoutError(f"not a usable JSON layout ({str(exc)[:120]})") from None
    if not isinstance(data, list):
        raise LayoutError("must be a JSON list of [class, x, y, width, height]")
    objects = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, list) or len(item) != 5:
            raise LayoutError(f"object {i} must be [class, x, y, width, height], got {json.dumps(item)}")
        box = item[1:]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise LayoutError(f"object {i}: x, y, width and height must be numbers, got {json.dumps(box)}")
        x, y, w, h = (float(v) for v in box)
        if not (0 <= x <= 1 and 0 <= y <= 1 and w >= 0 and h >= 0 and x + w <= 1 and y + h <= 1):
            raise LayoutError(f"object {i}: box {json.dumps(box)} is not inside the image (x, y, width, height in 0..1)")
        try:
            number = class_number(item[0], n_numbers=n_numbers)
        except LayoutError as exc:
            raise LayoutError(f"object {i}: {exc}") from None
        objects.append(LayoutObject(number, x, y, w, h))
    return objects



def layout_tokens(objects: list[tuple[int, float, float, float, float]], *, vocab: int = 8192,
                  max_objects: int = 30, encode_crop: bool = True) -> list[int]:
    """The layout model's token sequence for objects (class number, x, y, w, h in 0..1 of the image).

    As the bounding-box conditional builder of the paper's layout-to-image data (taming-transformers'
    `ObjectsBoundingBoxConditionalBuilder`): a coordinate is one token on a grid of
    sqrt(vocab) x sqrt(vocab) sections (row * sections + column, each rounded from 0..1 to
    0..sections-1); each object is (class, top-left, bottom-right); missing objects are padded with
    the "none" token vocab - 1; the crop (the whole image) is appended as a top-left / bottom-right pair.
    8192 tokens, 30 objects and a crop give the released model's 92 tokens.
    """
    sections = int(vocab**0.5)

    def token(x: float, y: float) -> int:
        return int(round(y * (sections - 1))) * sections + int(round(x * (sections - 1)))

    if len(objects) > max_objects:
        raise ValueError(f"a layout holds at most {max_objects} objects, got {len(objects)}")
    out: list[int] = []
    for number, x, y, w, h in objects:
        if not (0 <= x <= 1 and 0 <= y <= 1 and 0 <= x + w <= 1 and 0 <= y + h <= 1 and w >= 0 and h >= 0):
            raise ValueError(f"box {(x, y, w, h)} is not inside the image (x, y, w, h in 0..1)")
        if not 0 <= number < vocab - 1:
            raise ValueError(f"class number {number} is outside 0..{vocab - 2}")
        out += [int(number), token(x, y), token(x + w, y + h)]
    out += [vocab - 1] * (3 * (max_objects - len(objects)))
    if encode_crop:
        out += [token(0.0, 0.0), token(1.0, 1.0)]
    return out
