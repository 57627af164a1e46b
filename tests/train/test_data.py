"""The procedural data set, its held-out split, and the judge that scores generated images."""

from __future__ import annotations

import numpy as np
import pytest

from ldmgraph.train.data import (
    COLOURS,
    POSITIONS,
    SHAPES,
    all_combos,
    batch,
    held_out_combos,
    read_image,
    render,
    scene_at,
    score,
    train_combos,
)
from ldmgraph.train.data.scenes import Background, Scene, ShapeSpec


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_judge_reads_every_real_image_exactly(split: str) -> None:
    images, scenes = batch(3, split, 0, 300)
    for image, scene in zip(images, scenes, strict=True):
        expected = [s.combo for s in scene.shapes]
        assert score(image, expected) == {"colour": 1.0, "shape": 1.0, "position": 1.0}, scene.caption
        readings = read_image(image)
        assert len(readings) == len(scene.shapes), scene.caption
        assert sorted((r.position, r.size) for r in readings) == sorted((s.position, s.size) for s in scene.shapes)


def test_judge_rejects_a_wrong_caption() -> None:
    bg = Background((0.1, 0.1, 0.12), (0.3, 0.3, 0.3), 0.5)
    image = render(Scene(bg, (ShapeSpec("red", "circle", "left", "large", 16, 32, 12),), "a red circle on the left"))
    assert score(image, [("blue", "square", "right")]) == {"colour": 0.0, "shape": 0.0, "position": 0.0}
    assert score(np.full((64, 64, 3), 0.2, np.float32), [("red", "circle", "left")])["colour"] == 0.0


def test_data_set_is_a_pure_function_of_seed_split_index() -> None:
    a, sa = batch(5, "train", 10, 20)
    b, sb = batch(5, "train", 0, 30)
    np.testing.assert_array_equal(a, b[10:])
    assert [s.caption for s in sa] == [s.caption for s in sb[10:]]
    c, _ = batch(6, "train", 10, 20)
    assert not np.array_equal(a, c)
    assert a.shape == (20, 64, 64, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1


def test_captions_read_like_the_issue() -> None:
    captions = {scene_at(0, "train", i).caption for i in range(400)}
    assert any(" and " in c for c in captions)
    assert any(c.startswith("a small ") or c.startswith("a large ") for c in captions)
    assert all(c.startswith(("a ", "an ")) for c in captions)


def test_held_out_split_is_a_fifth_of_new_combinations_of_seen_words() -> None:
    held, train = set(held_out_combos()), set(train_combos())
    assert held.isdisjoint(train) and held | train == set(all_combos())
    assert len(held) >= len(all_combos()) / 5
    for i, words in enumerate((COLOURS, SHAPES, POSITIONS)):
        assert {c[i] for c in train} == set(words)  # every word is still seen in training


def test_training_images_never_show_a_held_out_combination() -> None:
    held = set(held_out_combos())
    for i in range(3000):
        scene = scene_at(0, "train", i, two_object_prob=0.5)
        assert not any(s.combo in held for s in scene.shapes), scene.caption
    assert all(s.combo in held for i in range(200) for s in scene_at(0, "heldout", i).shapes)
