"""Fixtures of the batch tests: an image-only workflow file (the Ray cluster is in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import blend_workflow


@pytest.fixture
def blend_file(tmp_path: Path) -> Path:
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(blend_workflow()), encoding="utf-8")
    return path
