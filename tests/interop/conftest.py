"""Fixtures for the ComfyUI import tests: tiny models under the bundled names, one shared model cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldmgraph_tiny_models import BUNDLED_NAMES, write_tiny_checkpoint  # noqa: E402

INPUTS = Path(__file__).resolve().parents[2] / "workflows" / "inputs"


@pytest.fixture(scope="session")
def comfy_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random models named like the bundled ones (always tiny here: fast and independent)."""
    folder = tmp_path_factory.mktemp("comfy-models")
    for kind in ("txt2img", "inpaint"):
        write_tiny_checkpoint(folder / BUNDLED_NAMES[kind], kind)
    return folder


@pytest.fixture(scope="session")
def comfy_executor(comfy_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One executor for the session (its output and model caches make repeated graphs cheap)."""
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    env = Environment(
        input_dir=INPUTS, output_dir=tmp_path_factory.mktemp("comfy-out"), model_dirs=(comfy_models_dir,)
    )
    return Executor(load_registry(), env)
