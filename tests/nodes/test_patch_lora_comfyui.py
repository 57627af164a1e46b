"""LoRA and FreeU in ComfyUI graphs: `ldmgraph import` maps LoraLoader, LoraLoaderModelOnly and FreeU,
the imported graph runs on the bundled model and gives the image of the same graph written in
ldmgraph's own nodes, and `ldmgraph serve` lists the files of the loras/ folders for ComfyUI's
lora_name widget (`/object_info`, `/models/loras`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "ldmgraph" / "assets" / "models"
TXT2IMG = "ldmgraph-shapes-txt2img.safetensors"

pytestmark = pytest.mark.skipif(not (BUNDLED / TXT2IMG).is_file(), reason="the bundled model is not installed")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose loras/ holds a small random LoRA for the bundled U-Net (kohya format)."""
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.lora import write_kohya_lora

    folder = tmp_path_factory.mktemp("models")
    (folder / "loras").mkdir()
    unet = load_checkpoint(BUNDLED / TXT2IMG, text_encoder=False).unet.diffusion_model
    g = torch.Generator().manual_seed(0)
    factors = {name: (torch.randn(4, m.weight.shape[1], generator=g) * 0.2, torch.randn(m.weight.shape[0], 4, generator=g) * 0.2,
                      4.0)
               for name, m in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q"))}
    write_kohya_lora(folder / "loras" / "style.safetensors", factors)
    return folder


def comfy_graph(lora_class: str) -> dict:
    lora_inputs = {"model": ["1", 0], "lora_name": "style.safetensors", "strength_model": 0.9}
    if lora_class == "LoraLoader":
        lora_inputs |= {"clip": ["1", 1], "strength_clip": 1.0}
    clip = ["2", 1] if lora_class == "LoraLoader" else ["1", 1]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
        "2": {"class_type": lora_class, "inputs": lora_inputs},
        "3": {"class_type": "FreeU", "inputs": {"model": ["2", 0], "b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on the left", "clip": clip}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 4, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "lora"}},
    }


def ours(lora_class: str) -> dict:
    link = lambda n, o: {"node": n, "output": o}  # noqa: E731
    lora = {"model": link("ckpt", "model"), "lora_name": "style", "strength_model": 0.9}
    if lora_class == "LoraLoader":
        lora |= {"text_encoder": link("ckpt", "text_encoder"), "strength_clip": 1.0}
    text = link("lora", "text_encoder") if lora_class == "LoraLoader" else link("ckpt", "text_encoder")
    return {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": TXT2IMG}},
        "lora": {"type": lora_class, "inputs": lora},
        "freeu": {"type": "FreeU", "inputs": {"model": link("lora", "model")}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": "a red circle on the left"}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": ""}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
        "sample": {"type": "Sampler", "inputs": {
            "model": link("freeu", "model"), "positive": link("pos", "conditioning"), "negative": link("neg", "conditioning"),
            "latent": link("latent", "latent"), "seed": 4, "steps": 4, "cfg": 3.0, "convention": "comfyui"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
    }}


@pytest.mark.parametrize("lora_class", ["LoraLoader", "LoraLoaderModelOnly"])
def test_imported_comfyui_lora_graph_runs_like_ours(lora_class, models, tmp_path):
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    source = tmp_path / "comfy.json"
    source.write_text(json.dumps(comfy_graph(lora_class)))
    done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "import", str(source), "-o", str(tmp_path / "wf.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    imported = json.loads((tmp_path / "wf.json").read_text())
    types = {node["type"] for node in imported["nodes"].values()}
    assert {lora_class, "FreeU"} <= types
    assert next(n for n in imported["nodes"].values() if n["type"] == "FreeU")["inputs"]["rule"] == "channels"
    torch.set_num_threads(1)
    executor = Executor(load_registry(), Environment(input_dir=tmp_path, output_dir=tmp_path / "out",
                                                     model_dirs=(models, BUNDLED)))
    decode = next(i for i, n in imported["nodes"].items() if n["type"] == "VAEDecode")
    theirs = np.asarray(executor.run(imported, outputs=[decode]).outputs[decode]["image"])
    mine = np.asarray(executor.run(ours(lora_class), outputs=["decode"]).outputs["decode"]["image"])
    plain = ours(lora_class)
    plain["nodes"]["lora"]["inputs"]["strength_model"] = 0.0
    base = np.asarray(executor.run(plain, outputs=["decode"]).outputs["decode"]["image"])
    assert np.array_equal(theirs, mine)
    assert np.abs(mine - base).max() > 1e-2


def test_served_catalogue_lists_the_lora_files(models, tmp_path):
    pytest.importorskip("fastapi")
    sys.path.insert(0, str(ROOT / "tests" / "server"))
    from server_helpers import ServerProcess

    server = ServerProcess(tmp_path / "data", "--models-dir", str(models)).start()
    try:
        files = ["ldmgraph-shapes-outlined.safetensors", "style.safetensors"]  # the bundled LoRA and the user's
        info = server.http.get("/api/object_info/LoraLoader").json()["LoraLoader"]
        assert sorted(info["input"]["required"]["lora_name"][0]) == files
        assert sorted(server.http.get("/api/models/loras").json()) == files
        only = server.http.get("/api/object_info/LoraLoaderModelOnly").json()["LoraLoaderModelOnly"]
        assert sorted(only["input"]["required"]["lora_name"][0]) == files
    finally:
        server.stop()
