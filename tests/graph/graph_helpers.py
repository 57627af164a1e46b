"""Helpers shared by the framework tests (a unique module name: conftest modules collide)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import graph_testnodes
import numpy as np
from PIL import Image

from ldmgraph.graph import Registry
from ldmgraph.plugins import PluginManager

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE / "workflows"


def make_registry() -> Registry:
    manager = PluginManager(builtins=["ldmgraph.nodes.image", "ldmgraph.nodes.primitives"],
                            entry_points_group=None, use_env=False)
    status = manager.register(graph_testnodes, "graph-testnodes")
    assert status.ok, status.error
    return manager.registry


def link(node: str, output: str = "value") -> dict[str, str]:
    return {"node": node, "output": output}


def workflow(nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"format": "ldmgraph/1", "nodes": nodes, **extra}


def write_png(path: Path, rgba: bool = False, size: tuple[int, int] = (12, 8), seed: int = 0) -> np.ndarray:
    """Write a random 8-bit PNG and return its pixels as uint8."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 4 if rgba else 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels
