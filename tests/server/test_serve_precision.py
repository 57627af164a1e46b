"""`ldmgraph serve --precision`: every job's loaders get the resolved dtype, as with `run` and `batch`."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_helpers import ServerProcess, txt2img_api

from ldmgraph.graph.loading import load_workflow_file

pytestmark = pytest.mark.slow


@pytest.fixture
def bf16_server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data", "--precision", "bf16", "--no-editor").start()
    yield process
    process.stop()


def _png(server: ServerProcess, graph: dict) -> bytes:
    job = server.wait_status(server.submit(graph)["prompt_id"], {"success", "error"})
    assert job["ldmgraph"]["status"] == "success", job["ldmgraph"]["error"]
    return server.http.get("/view", params=job["outputs"]["7"]["images"][0]).content


def test_precision_reaches_the_loaders_of_every_job(bf16_server: ServerProcess, server: ServerProcess,
                                                    tmp_path: Path) -> None:
    graph = txt2img_api(seed=31, steps=4, size=64, prefix="precision")
    low, full = _png(bf16_server, graph), _png(server, graph)  # the shared server: the file's own fp32
    path = tmp_path / "low.png"
    path.write_bytes(low)
    loaders = {n["type"]: n["inputs"].get("dtype") for n in load_workflow_file(path).document["nodes"].values()
               if n["type"].endswith("Loader")}
    assert loaders == {"CheckpointLoader": "bf16"}  # written into the job's workflow (and its PNG)

    a, b = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64) for png in (low, full))
    psnr = 10 * np.log10(255.0**2 / max(((a - b) ** 2).mean(), 1e-12))
    assert low != full and psnr >= 30.0, psnr  # computed in bf16, close to fp32
