"""The server and the editor's subgraphs: the editor flattens a subgraph into an API graph whose ids
name the instance and the inner node (``12:5``); the server accepts those graphs, of its own node
types and of ComfyUI's core ones. The editor's node library (``/object_info``) lists ldmgraph's
workflow components, from the repository's workflows and from every ``--workflows-dir``, and a
graph that uses one as a node runs.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

pytest.importorskip("fastapi")
from server_helpers import ServerProcess, comfy_graph, txt2img_api  # noqa: E402

SHADE = {"format": "ldmgraph/1",
         "nodes": {"invert": {"type": "ImageInvert", "inputs": {}}},
         "parameters": {"image": {"targets": [{"node": "invert", "input": "image"}], "description": "to invert"}},
         "outputs": {"image": {"node": "invert", "output": "image"}}}


def prefixed(graph: dict, instance: str) -> dict:
    """An API graph as the editor submits it when all its nodes sit inside subgraph ``instance``."""
    def rename(value):
        return [f"{instance}:{value[0]}", value[1]] if isinstance(value, list) and len(value) == 2 else value

    return {f"{instance}:{node_id}": {**node, "inputs": {k: rename(v) for k, v in node["inputs"].items()}}
            for node_id, node in graph.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("components")
    (folder / "shade.json").write_text(json.dumps(SHADE))
    process = ServerProcess(tmp_path_factory.mktemp("subgraph-server") / "data", "--workflows-dir", str(folder))
    yield process.start()
    process.stop()


def succeeded(server: ServerProcess, prompt: dict) -> dict:
    job = server.wait_status(server.submit(prompt)["prompt_id"], {"success", "error"})
    assert job["ldmgraph"]["status"] == "success", job["ldmgraph"].get("error")
    return job


def test_comfyui_subgraph_editor_node_library_lists_workflow_components(server):
    info = server.http.get("/object_info").json()
    core = info["workflow/txt2img_core"]  # the repository's component
    assert core["category"] == "ldmgraph/workflows"
    assert core["output"] == ["IMAGE", "LATENT", "MODEL", "VAE", "CONDITIONING", "CONDITIONING"]
    assert core["output_name"] == ["image", "latent", "model", "vae", "positive", "negative"]
    assert core["input"]["required"]["prompt"] == ["STRING", {"tooltip": "what the image shows",
                                                              "default": "a red circle on the left",
                                                              "multiline": True}]
    assert core["input"]["required"]["seed"][1]["control_after_generate"] is True
    shade = info["workflow/shade"]  # from --workflows-dir
    assert shade["input"]["required"] == {"image": ["IMAGE", {"tooltip": "to invert"}]}
    assert shade["output"] == ["IMAGE"]


@pytest.mark.slow
def test_comfyui_subgraph_server_accepts_the_editors_flattened_ids(server):
    native = prefixed(txt2img_api(seed=4, prefix="flat_native"), "12")
    native["9"] = native.pop("12:7")  # the save node outside the subgraph
    job = succeeded(server, native)
    assert list(job["outputs"]) == ["9"]
    comfy = prefixed(comfy_graph(seed=6, prefix="flat_comfy"), "12")
    job = succeeded(server, comfy)
    assert job["ldmgraph"]["source"] == "comfyui" and list(job["outputs"]) == ["12:9"]


def test_comfyui_subgraph_server_runs_a_graph_that_uses_a_component(server):
    flat = txt2img_api(seed=8, prefix="flat")
    flat["i1"] = {"class_type": "ImageInvert", "inputs": {"image": ["6", 0]}}
    flat["i2"] = {"class_type": "ImageInvert", "inputs": {"image": ["i1", 0]}}
    flat["7"]["inputs"]["images"] = ["i2", 0]
    parts = {
        "5": {"class_type": "workflow/txt2img_core", "inputs": {
            "prompt": "a red circle on the left", "negative_prompt": "", "width": 32, "height": 32, "seed": 8,
            "steps": 1, "cfg": 1.0, "sampler": "euler", "schedule": "normal"}},
        "6": {"class_type": "workflow/shade", "inputs": {"image": ["5", 0]}},
        "7": {"class_type": "workflow/shade", "inputs": {"image": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "parts"}},
    }
    images = []
    for prompt, node in ((flat, "7"), (parts, "8")):
        image = succeeded(server, prompt)["outputs"][node]["images"][0]
        with Image.open(io.BytesIO(server.http.get("/view", params=image).content)) as png:
            images.append(np.asarray(png))
    assert images[0].shape == (32, 32, 3) and np.array_equal(images[0], images[1])
