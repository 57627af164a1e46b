"""The saved workflows rebuilt from components draw what their flat versions drew, pixel for pixel.

`tests/graph/workflows/*_flat.json` are `workflows/hires_fix.json` and `workflows/sdxl_refiner.json`
as they were before they were rebuilt from `workflows/components/` (golden files). Each pair runs
with the same parameter values, in fresh executors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "workflows"
BUNDLED = ROOT / "ldmgraph" / "assets" / "models"


def images(pairs: list[Path], overrides: dict, model_dirs: tuple[Path, ...], tmp_path: Path) -> list[np.ndarray]:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    registry = load_registry()
    found = []
    for index, path in enumerate(pairs):
        out = tmp_path / f"out{index}"
        executor = Executor(registry, Environment(input_dir=tmp_path, output_dir=out, model_dirs=model_dirs))
        (saved,) = executor.run(json.loads(path.read_text()), overrides=overrides).files
        with Image.open(saved) as image:
            found.append(np.asarray(image.convert("RGB")))
    return found


def test_subgraph_saved_workflows_are_built_from_components():
    for name in ("hires_fix", "sdxl_refiner"):
        doc = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        assert sum(node["type"].startswith("workflow/") for node in doc["nodes"].values()) == 2, name
        flat = json.loads((GOLDEN / f"{name}_flat.json").read_text())
        assert list(doc["parameters"]) == list(flat["parameters"]), name  # the same parameters, same order


@pytest.mark.skipif(not (BUNDLED / "ldmgraph-shapes-txt2img.safetensors").is_file(), reason="needs the bundled model")
def test_subgraph_hires_fix_draws_its_flat_versions_pixels(tmp_path):
    new, old = images([ROOT / "workflows" / "hires_fix.json", GOLDEN / "hires_fix_flat.json"],
                      {"steps": 3, "seed": 5, "prompt": "a green triangle on the right"}, (BUNDLED,), tmp_path)
    assert new.shape == (64, 64, 3) and new.std() > 1.0
    assert np.array_equal(new, old)


@pytest.mark.slow
def test_subgraph_sdxl_refiner_draws_its_flat_versions_pixels(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import sdxl_models

    torch.set_num_threads(1)
    modules = sdxl_models.build(tmp_path / "models" / "diffusers")
    sdxl_models.write_single_file(tmp_path / "models" / "tiny_base.safetensors", modules["base"], refiner=False)
    overrides = {"base_ckpt_name": "tiny_base.safetensors", "refiner_ckpt_name": "diffusers/sdxl_refiner",
                 "width": 64, "height": 64, "steps": 4, "switch_step": 3, "seed": 9}
    new, old = images([ROOT / "workflows" / "sdxl_refiner.json", GOLDEN / "sdxl_refiner_flat.json"], overrides,
                      (tmp_path / "models",), tmp_path)
    assert new.shape == (64, 64, 3) and new.std() > 1.0
    assert np.array_equal(new, old)
