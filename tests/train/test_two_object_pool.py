"""A pool's share of two-shape scenes is a flag, and fine-tuning from a bundled file keeps its scale."""

from __future__ import annotations

import json

from ldmgraph.train.data.vocab import is_held_out
from ldmgraph.train.export import BUNDLED_NAMES, assets_dir
from ldmgraph.train.pipeline import read_scale_factor
from ldmgraph.train.pool import TWO_OBJECT_PROB, pool_scenes


def test_two_object_prob_sets_the_share_of_two_shape_scenes():
    default = pool_scenes(0, 400)
    mostly_two = pool_scenes(0, 400, two_object_prob=0.9)
    share = lambda scenes: sum(len(s.shapes) == 2 for s in scenes) / len(scenes)  # noqa: E731
    assert abs(share(default) - TWO_OBJECT_PROB) < 0.08
    assert abs(share(mostly_two) - 0.9) < 0.05
    assert not any(is_held_out(shape.combo) for s in mostly_two for shape in s.shapes)


def test_a_run_from_a_bundled_file_keeps_its_scale_factor(tmp_path):
    (tmp_path / "scale_factor.json").write_text(json.dumps({"scale_factor": 0.5}))
    assert read_scale_factor(tmp_path) == 0.5
    bundled = assets_dir() / BUNDLED_NAMES["ldm"]
    if bundled.is_file():
        from safetensors import safe_open

        with safe_open(str(bundled), "pt") as f:
            expected = json.loads(f.metadata()["ldmgraph"])["scale_factor"]
        assert read_scale_factor(tmp_path, bundled) == expected != 0.5
    assert read_scale_factor(tmp_path, tmp_path) == 0.5  # a run folder: the pool's own figure
