"""The example conditioner plugin, installed (pip install -e plugins/ldmgraph-example-conditioner):
registered by its entry point, its node generated and listed, its contribution applied, and its
workflow runs on the bundled models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import PluginManager

HERE = Path(__file__).resolve().parents[1]
WORKFLOW = HERE / "workflows" / "prompt_append.json"


@pytest.fixture(scope="module")
def registry():
    manager = PluginManager(use_env=False)
    status = next(s for s in manager.statuses if s.name.startswith("example_conditioner"))
    assert status.ok and status.source == "entry-point" and status.conditioners == ["PromptAppend"], status.error
    return manager.registry


def test_its_node_is_listed_with_route_and_inputs() -> None:
    listing = json.loads(subprocess.run([sys.executable, "-m", "ldmgraph.cli", "nodes", "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    node = listing["PromptAppend"]
    assert node["route"] == "crossattn" and node["plugin"].startswith("example_conditioner")
    assert {k: v["type"] for k, v in node["inputs"].items()} == {
        "conditioning": "CONDITIONING", "text_encoder": "TEXT_ENCODER", "text": "STRING", "weight": "FLOAT"}
    assert node["inputs"]["weight"]["le"] == 4.0


def test_the_appended_tokens_are_the_second_prompt_scaled(registry, tmp_path: Path) -> None:
    doc = json.loads(WORKFLOW.read_text())
    doc["nodes"]["append"]["inputs"]["weight"] = 0.5
    from ldmgraph.train.export import assets_dir

    executor = Executor(registry, Environment(output_dir=tmp_path, model_dirs=(assets_dir(),)))
    out = executor.run(doc, outputs=["append", "positive", "ckpt"]).outputs
    base = out["positive"]["conditioning"][0].context
    added = out["ckpt"]["text_encoder"].encode(["a large red circle"]).context
    (entry,) = out["append"]["conditioning"]
    assert entry.context.shape[1] == base.shape[1] + added.shape[1]
    assert torch.equal(entry.context, torch.cat([base, added * 0.5], dim=1))


def test_its_workflow_runs_and_the_appended_prompt_changes_the_image(tmp_path: Path) -> None:
    images = []
    for weight in ("1.0", "0.0"):
        out = tmp_path / weight
        subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", str(WORKFLOW), "--output-dir", str(out),
                        "--set", "steps=8", "--set", f"weight={weight}", "--no-progress"], check=True,
                       capture_output=True)
        (png,) = out.glob("prompt_append_*.png")
        with Image.open(png) as image:
            images.append(np.asarray(image.convert("RGB"), np.float32))
    assert images[0].shape == (64, 64, 3)
    assert np.abs(images[0] - images[1]).mean() > 1.0
