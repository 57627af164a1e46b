"""Helpers of the batch tests: the saved text-to-image workflow, an image-only workflow, manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TXT2IMG = ROOT / "workflows" / "txt2img.json"
INPUTS = ROOT / "workflows" / "inputs"
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the centre",
           "a small yellow circle at the bottom"]


def blend_workflow() -> dict[str, Any]:
    """Image only (no torch): an input image blended with its inverse, saved; three parameters."""
    return {
        "format": "ldmgraph/1",
        "nodes": {
            "load": {"type": "LoadImage", "inputs": {"image": "shapes.png"}},
            "invert": {"type": "ImageInvert", "inputs": {"image": {"node": "load", "output": "image"}}},
            "blend": {"type": "ImageBlend", "inputs": {"image1": {"node": "load", "output": "image"},
                                                       "image2": {"node": "invert", "output": "image"},
                                                       "blend_factor": 0.25, "blend_mode": "normal"}},
            "save": {"type": "SaveImage", "inputs": {"images": {"node": "blend", "output": "image"},
                                                     "filename_prefix": "blend"}},
        },
        "parameters": {
            "image": {"targets": [{"node": "load", "input": "image"}]},
            "strength": {"targets": [{"node": "blend", "input": "blend_factor"}]},
            "prefix": {"targets": [{"node": "save", "input": "filename_prefix"}]},
        },
    }


def prompt_csv(path: Path, prompts: list[str], steps: int = 2) -> Path:
    """The README's worked example: a prompt list (with a steps column), one row per prompt."""
    lines = ["prompt,steps"] + [f'"{p}",{steps}' for p in prompts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def manifest_lines(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "manifest.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
