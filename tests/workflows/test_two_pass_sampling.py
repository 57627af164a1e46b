"""SamplerAdvanced split in two passes (leftover noise handed over) equals one Sampler run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def test_two_advanced_passes_equal_one_full_pass(make_executor):
    doc = json.loads((WORKFLOWS / "txt2img.json").read_text())
    nodes = doc["nodes"]
    common = {k: nodes["sampler"]["inputs"][k] for k in ("model", "positive", "negative", "seed", "cfg")}
    common.update(steps=4, sampler="euler", schedule="normal")
    nodes["sampler"]["inputs"].update(steps=4, sampler="euler", schedule="normal")
    nodes["first"] = {
        "type": "SamplerAdvanced",
        "inputs": {
            **common,
            "latent": {"node": "latent", "output": "latent"},
            "add_noise": True,
            "start_step": 0,
            "end_step": 2,
            "return_with_leftover_noise": True,
        },
    }
    nodes["second"] = {
        "type": "SamplerAdvanced",
        "inputs": {
            **common,
            "latent": {"node": "first", "output": "latent"},
            "add_noise": False,
            "start_step": 2,
            "end_step": 10000,
            "return_with_leftover_noise": False,
        },
    }
    nodes["decode_two"] = {
        "type": "VAEDecode",
        "inputs": {
            "vae": {"node": "ckpt", "output": "vae"},
            "latent": {"node": "second", "output": "latent"},
        },
    }
    nodes["save_two"] = {
        "type": "SaveImage",
        "inputs": {"images": {"node": "decode_two", "output": "image"}, "filename_prefix": "two_pass"},
    }
    result = make_executor().run(doc)
    single = next(f for f in result.files if f.name.startswith("txt2img_"))
    double = next(f for f in result.files if f.name.startswith("two_pass_"))
    with Image.open(single) as a, Image.open(double) as b:
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    assert diff.max() <= 1, diff.max()
