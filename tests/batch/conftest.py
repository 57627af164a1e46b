"""Fixtures of the batch tests: an image-only workflow file, a local Ray cluster."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import blend_workflow


@pytest.fixture
def blend_file(tmp_path: Path) -> Path:
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(blend_workflow()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster of 2 CPUs, token authentication off, torn down after the session."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
