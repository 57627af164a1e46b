"""The saved SDXL workflows and ComfyUI's SDXL graph, on tiny random SDXL checkpoints built here.

- `workflows/sdxl.json` and `workflows/sdxl_refiner.json` validate without the checkpoints with a
  `file_not_found` that names the file and the model folders, and run through the CLI on any SDXL
  files given by `--set`.
- ComfyUI's SDXL example graph in the API format (CheckpointLoaderSimple x2, CLIPTextEncodeSDXL,
  CLIPTextEncodeSDXLRefiner, EmptyLatentImage, KSamplerAdvanced x2 with leftover noise, VAEDecode,
  SaveImage) imports and runs; imported CLIPTextEncode keeps ComfyUI's reading of BREAK (a word).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

import sdxl_models as sm  # noqa: E402

from ldmgraph.cli import main  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdxl_wf")
    modules = sm.build(root / "diffusers")
    sm.write_single_file(root / "tiny_base.safetensors", modules["base"], refiner=False)
    sm.write_single_file(root / "tiny_refiner.safetensors", modules["refiner"], refiner=True)
    return root


@pytest.mark.parametrize(("name", "files"), [
    ("sdxl", ["sd_xl_base_1.0.safetensors"]),
    ("sdxl_refiner", ["sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"]),
])
def test_sdxl_workflows_validate_without_files_naming_what_to_put_where(name, files, tmp_path, capsys):
    code = main(["validate", str(WORKFLOWS / f"{name}.json"), "--models-dir", str(tmp_path), "--json"])
    assert code != 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert {p["code"] for p in problems} == {"file_not_found"}
    for file in files:
        message = next(p["message"] for p in problems if file in p["message"])
        assert str(tmp_path) in message and "Put the file in one of those folders" in message


def _run(args: list[str], out: Path, capsys: pytest.CaptureFixture) -> list[Path]:
    code = main(["run", *args, "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    return sorted(out.glob("*.png"))


def test_sdxl_workflow_runs_on_a_user_sdxl_checkpoint(sdxl_dir, tmp_path, capsys):
    files = _run([str(WORKFLOWS / "sdxl.json"), "--models-dir", str(sdxl_dir), "--set", "ckpt_name=tiny_base.safetensors",
                  "--set", "width=64", "--set", "height=48", "--set", "steps=3", "--set", "batch_size=2"],
                 tmp_path / "out", capsys)
    assert len(files) == 2 and Image.open(files[0]).size == (64, 48)


def test_sdxl_refiner_workflow_runs_base_then_refiner(sdxl_dir, tmp_path, capsys):
    files = _run([str(WORKFLOWS / "sdxl_refiner.json"), "--models-dir", str(sdxl_dir),
                  "--set", "base_ckpt_name=tiny_base.safetensors", "--set", "refiner_ckpt_name=diffusers/sdxl_refiner",
                  "--set", "width=64", "--set", "height=64", "--set", "steps=4", "--set", "switch_step=3"],
                 tmp_path / "out", capsys)
    assert len(files) == 1 and Image.open(files[0]).size == (64, 64)


def comfyui_sdxl_graph(base: str, refiner: str) -> dict:
    """ComfyUI's SDXL base + refiner example, in the API format."""
    def sdxl(text: str) -> dict:
        return {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["4", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
            "target_height": 1024, "text_g": text, "text_l": text}}

    def refine(text: str, ascore: float) -> dict:
        return {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": ascore, "width": 1024, "height": 1024, "text": text, "clip": ["12", 1]}}

    def ksampler(model: str, pos: str, neg: str, latent: list, add: str, start: int, end: int, leftover: str) -> dict:
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": [model, 0], "add_noise": add, "noise_seed": 721, "steps": 4, "cfg": 8.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": [pos, 0], "negative": [neg, 0], "latent_image": latent,
            "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}

    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": refiner}},
        "6": sdxl("a lighthouse at sunset BREAK photo"),
        "7": sdxl("blurry"),
        "15": refine("a lighthouse at sunset BREAK photo", 6.0),
        "16": refine("blurry", 2.5),
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": ksampler("4", "6", "7", ["5", 0], "enable", 0, 3, "enable"),
        "11": ksampler("12", "15", "16", ["10", 0], "disable", 3, 10000, "disable"),
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 2]}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "ComfyUI"}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a BREAK b"}},
    }


def test_sdxl_comfyui_api_graph_with_refiner_imports_and_runs(sdxl_dir, tmp_path):
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.interop.comfyui import to_workflow
    from ldmgraph.plugins import load_registry

    workflow = to_workflow(comfyui_sdxl_graph("tiny_base.safetensors", "tiny_refiner.safetensors"))
    types = {n["type"] for n in workflow["nodes"].values()}
    assert {"CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner", "SamplerAdvanced"} <= types
    executor = Executor(load_registry(), Environment(input_dir=tmp_path, output_dir=tmp_path / "out",
                                                     model_dirs=(sdxl_dir,)))
    result = executor.run(workflow, outputs=["19", "17", "20"])
    image = np.asarray(result.outputs["17"]["image"])
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(list((tmp_path / "out").glob("ComfyUI*.png"))) == 1
    # ComfyUI's CLIPTextEncode reads "BREAK" as a word: one 77-token window, not two
    assert result.outputs["20"]["conditioning"][0].context.shape[1] == 77
