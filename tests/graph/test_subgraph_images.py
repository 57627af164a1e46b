"""Components on the real diffusion nodes: the shipped text-to-image core (workflows/components/)
used twice in one graph gives each instance, bit for bit, the image it gives when run alone, and
changing one instance's seed re-runs only that instance's sampler and decoder.

Runs the bundled 64x64 text-to-image model at two or three steps (a second or two each).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "workflows" / "components" / "txt2img_core.json"
BUNDLED = ROOT / "ldmgraph" / "assets" / "models"
pytestmark = pytest.mark.skipif(not (BUNDLED / "ldmgraph-shapes-txt2img.safetensors").is_file(),
                                reason="needs the bundled text-to-image model")

A = {"prompt": "a red circle on the left", "seed": 3, "steps": 2}
B = {"prompt": "a blue square at the top", "seed": 11, "steps": 3}


@pytest.fixture(scope="module")
def registry():
    from ldmgraph.plugins import load_registry

    return load_registry()


@pytest.fixture(scope="module")
def model_cache():
    from ldmgraph.models.cache import ModelCache

    return ModelCache()


def executor(registry, model_cache, tmp_path):
    """A fresh executor (an empty output cache: nothing is served from an earlier run)."""
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    ex = Executor(registry, Environment(input_dir=tmp_path, output_dir=tmp_path / "out", model_dirs=(BUNDLED,)))
    ex.resources[MODEL_CACHE_KEY] = model_cache
    return ex


def two_instances() -> dict:
    return {"format": "ldmgraph/1",
            "nodes": {"a": {"type": "workflow/txt2img_core", "inputs": dict(A)},
                      "b": {"type": "workflow/txt2img_core", "inputs": dict(B)}},
            "parameters": {"b_seed": {"targets": [{"node": "b", "input": "seed"}]}},
            "outputs": {"a": {"node": "a", "output": "image"}, "b": {"node": "b", "output": "image"}}}


def test_subgraph_used_twice_gives_each_instance_its_image_alone_bit_for_bit(registry, model_cache, tmp_path):
    core = json.loads(CORE.read_text())
    alone = {name: executor(registry, model_cache, tmp_path).run(core, overrides=values).outputs["decode"]["image"]
             for name, values in (("a", A), ("b", B))}
    both = executor(registry, model_cache, tmp_path).run(two_instances())
    assert set(both.executed) >= {"a.sampler", "b.sampler", "a.decode", "b.decode"}
    for name in ("a", "b"):
        image = both.outputs[f"{name}.decode"]["image"]
        assert image.shape == (1, 64, 64, 3) and image.std() > 0.01
        assert np.array_equal(image, alone[name]), f"instance {name} differs from the component run alone"
    assert not np.array_equal(alone["a"], alone["b"])  # the instances share no result they should not


def test_subgraph_seed_of_one_instance_reruns_only_its_sampler_and_decoder(registry, model_cache, tmp_path):
    ex = executor(registry, model_cache, tmp_path)
    first = ex.run(two_instances())
    assert len(first.executed) == 12  # two of each: checkpoint, two prompts, latent, sampler, decoder
    again = ex.run(two_instances(), overrides={"b_seed": 12})
    assert sorted(again.executed) == ["b.decode", "b.sampler"]
    assert np.array_equal(again.outputs["a.decode"]["image"], first.outputs["a.decode"]["image"])
    assert not np.array_equal(again.outputs["b.decode"]["image"], first.outputs["b.decode"]["image"])
