"""PreviewImage in an imported ComfyUI graph writes 8-bit pixels as ComfyUI does: clip(255 x) truncated
(`astype(uint8)`), like the imported SaveImage; ldmgraph's own graphs keep rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from comfy_graphs import API_TXT2IMG
from PIL import Image

from ldmgraph.interop.comfyui import to_workflow

pytestmark = pytest.mark.reference


def _preview_pixels(result) -> np.ndarray:
    (path,) = [f for f in result.files if f.name.startswith("preview_")]
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_imported_preview_image_truncates_like_comfyui(comfy_executor):
    workflow = to_workflow(copy.deepcopy(API_TXT2IMG))
    assert workflow["nodes"]["11"]["inputs"]["quantize"] == "truncate"
    result = comfy_executor.run(workflow, outputs=["8", "11"])
    decoded = np.asarray(result.outputs["8"]["image"])[0]
    truncated = np.clip(255.0 * decoded, 0, 255).astype(np.uint8)  # ComfyUI's rule, restated
    preview = _preview_pixels(result)
    assert np.array_equal(preview, truncated)
    assert not np.array_equal(preview, np.clip(np.rint(255.0 * decoded), 0, 255).astype(np.uint8))

    workflow["nodes"]["11"]["inputs"]["quantize"] = "round"  # ldmgraph's default
    rounded = _preview_pixels(comfy_executor.run(workflow, outputs=["11"]))
    assert np.array_equal(rounded, np.clip(np.rint(255.0 * decoded), 0, 255).astype(np.uint8))
