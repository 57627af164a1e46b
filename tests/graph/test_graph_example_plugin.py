"""The example third-party plugin (plugins/ldmgraph-example-nodes), found through its entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from graph_helpers import WORKFLOWS
from PIL import Image

pytestmark = pytest.mark.skipif(
    not any(ep.name == "example-nodes" for ep in entry_points(group="ldmgraph")),
    reason="pip install -e plugins/ldmgraph-example-nodes (CI installs every plugins/*/ package)",
)


def test_workflow_using_the_plugin_runs(tmp_path: Path) -> None:
    shutil.copy(WORKFLOWS / "example_plugin.json", tmp_path / "board.json")
    run = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", "board.json", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    [path] = json.loads(run.stdout)["files"]
    with Image.open(path) as image:
        grey = np.asarray(image)
    # closed form: 4-pixel tiles alternating 0.2 / 0.8; Rec. 709 weights sum to 1, so grey == level
    y, x = np.mgrid[0:16, 0:32]
    level = np.where((y // 4 + x // 4) % 2 == 1, 0.8, 0.2)
    np.testing.assert_array_equal(grey, np.repeat(np.rint(level * 255)[..., None], 3, axis=2).astype(np.uint8))
    plugins = json.loads(subprocess.run([sys.executable, "-m", "ldmgraph.cli", "plugins", "--json"], cwd=tmp_path,
                                        capture_output=True, text=True, timeout=300).stdout)
    [entry] = [p for p in plugins if p["name"].startswith("example-nodes")]
    assert entry["ok"] and entry["source"] == "entry-point"
    assert entry["nodes"] == ["ExampleCheckerboard", "ExampleGrayscale"]
