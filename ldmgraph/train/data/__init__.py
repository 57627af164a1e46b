"""The procedural captioned data set (:mod:`.scenes`), its words and held-out split (:mod:`.vocab`)
and the judge that reads shapes back from images (:mod:`.judge`)."""

from .judge import Reading, read_image, read_in_box, score
from .scenes import Scene, ShapeSpec, batch, render, scene_at
from .vocab import COLOURS, POSITIONS, SHAPES, SIZES, all_combos, held_out_combos, is_held_out, train_combos

__all__ = [
    "COLOURS", "POSITIONS", "SHAPES", "SIZES", "Reading", "Scene", "ShapeSpec", "all_combos", "batch",
    "held_out_combos", "is_held_out", "read_image", "read_in_box", "render", "scene_at", "score",
    "train_combos",
]
