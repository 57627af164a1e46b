"""A ComfyUI API graph with ControlNetLoader + Canny + ControlNetApplyAdvanced imports and runs on
the bundled text-to-image model and ControlNet (the real shipped files)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from PIL import Image

from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.interop.comfyui import to_workflow
from ldmgraph.plugins import load_registry
from ldmgraph.train.export import assets_dir

TXT2IMG = "ldmgraph-shapes-txt2img.safetensors"
CONTROLNET = "ldmgraph-shapes-controlnet.safetensors"
INPUTS = Path(__file__).resolve().parents[2] / "workflows" / "inputs"

API_CONTROLNET = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "LoadImage", "inputs": {"image": "shapes.png", "upload": "image"}},
    "5": {"class_type": "Canny", "inputs": {"image": ["4", 0], "low_threshold": 0.1, "high_threshold": 0.2}},
    "6": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
    "7": {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["2", 0], "negative": ["3", 0], "control_net": ["6", 0], "image": ["5", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
    "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "9": {"class_type": "KSampler", "inputs": {
        "seed": 3, "steps": 6, "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
        "model": ["1", 0], "positive": ["7", 0], "negative": ["7", 1], "latent_image": ["8", 0]}},
    "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
    "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy_controlnet", "images": ["10", 0]}},
}


def test_comfyui_controlnet_graph_imports_and_runs_on_the_bundled_controlnet(tmp_path) -> None:
    executor = Executor(load_registry(), Environment(input_dir=INPUTS, output_dir=tmp_path,
                                                     model_dirs=(assets_dir(),)))
    workflow = to_workflow(copy.deepcopy(API_CONTROLNET))
    types = {node["type"] for node in workflow["nodes"].values()}
    assert {"ControlNetLoader", "Canny", "ControlNetApplyAdvanced"} <= types
    pictures = []
    for strength in (1.0, 0.0):
        graph = copy.deepcopy(API_CONTROLNET)
        graph["7"]["inputs"]["strength"] = strength
        result = executor.run(to_workflow(graph))
        (path,) = [f for f in result.files if f.name.startswith("comfy_controlnet_")]
        with Image.open(path) as image:
            pictures.append(np.asarray(image.convert("RGB"), np.float32))
        path.unlink()
    assert pictures[0].shape == (64, 64, 3) and pictures[0].std() > 2.0
    assert np.abs(pictures[0] - pictures[1]).mean() > 1.0  # the edges steered the image
