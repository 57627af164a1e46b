"""ComfyUI import: hand-written API- and UI-format graphs convert, validate and run on tiny models;
the same graph in both formats gives the same image; unsupported nodes are all reported at once."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from comfy_graphs import API_GRAPHS, API_TXT2IMG, SAME_GRAPH_BOTH_FORMATS, UI_TXT2IMG
from PIL import Image

from ldmgraph.cli import main
from ldmgraph.graph import codes
from ldmgraph.graph.errors import ValidationError
from ldmgraph.interop.comfyui import to_workflow
from ldmgraph.interop.comfyui_nodes import COMFYUI_NODES, PASS_THROUGH_CLASSES

CORE_NODES = {
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "CLIPSetLastLayer",
    "EmptyLatentImage",
    "KSampler",
    "KSamplerAdvanced",
    "VAEEncode",
    "VAEDecode",
    "VAEEncodeForInpaint",
    "SetLatentNoiseMask",
    "InpaintModelConditioning",
    "VAELoader",
    "LoadImage",
    "SaveImage",
    "PreviewImage",
    "ConditioningCombine",
    "ConditioningAverage",
    "ConditioningConcat",
    "ConditioningSetArea",
    "LatentUpscale",
    "LatentUpscaleBy",
    "ImageScale",
}


def image_of(result, prefix: str) -> np.ndarray:
    (path,) = [f for f in result.files if f.name.startswith(prefix + "_")]
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_hand_written_graphs_cover_every_core_node():
    used = {node["class_type"] for graph, _ in API_GRAPHS.values() for node in graph.values()}
    assert CORE_NODES <= used
    assert CORE_NODES <= set(COMFYUI_NODES) | PASS_THROUGH_CLASSES


@pytest.mark.parametrize("name", sorted(API_GRAPHS))
def test_api_graph_converts_and_runs(name, comfy_executor):
    graph, (width, height) = API_GRAPHS[name]
    result = comfy_executor.run(to_workflow(copy.deepcopy(graph)))
    saved = [f for f in result.files if f.suffix == ".png" and "preview" not in f.name]
    assert saved
    for path in saved:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert (pixels.shape[1], pixels.shape[0]) == (width, height)
        assert pixels.std() > 2.0


@pytest.mark.parametrize("name", sorted(SAME_GRAPH_BOTH_FORMATS))
def test_the_same_graph_in_api_and_ui_format_gives_the_same_image(name, comfy_executor):
    api, ui = SAME_GRAPH_BOTH_FORMATS[name]
    from_api = comfy_executor.run(to_workflow(copy.deepcopy(api)))
    from_ui = comfy_executor.run(to_workflow(copy.deepcopy(ui)))
    prefix = {"txt2img": "comfy_txt2img", "inpaint": "comfy_inpaint", "hires_fix": "comfy_hires"}[name]
    assert np.array_equal(image_of(from_api, prefix), image_of(from_ui, prefix))


def test_ui_editor_features_are_flattened():
    workflow = to_workflow(copy.deepcopy(UI_TXT2IMG))
    nodes = workflow["nodes"]
    assert "15" not in nodes and "14" not in nodes and "12" not in nodes  # Note, Reroute, Primitive
    assert "11" not in nodes and "13" not in nodes  # muted preview, bypassed upscale
    sampler = nodes["3"]["inputs"]
    assert sampler["seed"] == 42  # from the primitive, not the widget's stale 0
    assert sampler["latent"] == {"node": "5", "output": "latent"}  # through the bypassed node
    assert nodes["8"]["inputs"]["vae"] == {"node": "4", "output": "vae"}  # through the reroute
    assert nodes["6"]["inputs"]["clip_skip"] == 2  # CLIPSetLastLayer -2 folded into the encoder
    assert nodes["6"]["inputs"]["text_encoder"] == {"node": "4", "output": "text_encoder"}
    assert (sampler["steps"], sampler["cfg"], sampler["sampler"], sampler["schedule"]) == (
        2,
        4.0,
        "euler",
        "karras",
    )
    assert workflow["parameters"]["seed"]["targets"] == [{"node": "3", "input": "seed"}]
    assert workflow["parameters"]["prompt"]["targets"] == [{"node": "6", "input": "text"}]


def test_every_unknown_node_is_reported_at_once_with_id_and_class():
    graph = copy.deepcopy(API_TXT2IMG)
    graph["20"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}}
    graph["21"] = {
        "class_type": "ImageUpscaleWithModel",
        "inputs": {"upscale_model": ["20", 0], "image": ["8", 0]},
    }
    with pytest.raises(ValidationError) as error:
        to_workflow(graph)
    problems = error.value.problems
    assert [(p.node_id, p.code) for p in problems] == [
        ("20", codes.UNKNOWN_NODE_TYPE),
        ("21", codes.UNKNOWN_NODE_TYPE),
    ]
    assert "UpscaleModelLoader" in problems[0].message and "ImageUpscaleWithModel" in problems[1].message


def test_unknown_nodes_in_ui_format_are_reported_too():
    graph = copy.deepcopy(UI_TXT2IMG)
    graph["nodes"].append(
        {"id": 30, "type": "FaceDetailer", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [1, 2]}
    )
    with pytest.raises(ValidationError) as error:
        to_workflow(graph)
    assert [(p.node_id, p.code) for p in error.value.problems] == [("30", codes.UNKNOWN_NODE_TYPE)]


def test_ldmgraph_import_writes_our_format_and_run_takes_the_comfyui_file(tmp_path, comfy_models_dir, capsys):
    source = tmp_path / "comfy_api.json"
    source.write_text(json.dumps(API_TXT2IMG))
    converted = tmp_path / "converted.json"
    assert main(["import", str(source), "-o", str(converted)]) == 0
    workflow = json.loads(converted.read_text())
    assert workflow["format"] == "ldmgraph/1" and workflow["nodes"]["3"]["type"] == "Sampler"
    ui_file = tmp_path / "comfy_ui.json"
    ui_file.write_text(json.dumps(UI_TXT2IMG))
    assert main(["validate", str(ui_file), "--models-dir", str(comfy_models_dir)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**API_TXT2IMG, "99": {"class_type": "Nope", "inputs": {}}}))
    assert main(["import", str(bad), "-o", str(tmp_path / "never.json")]) == 2
    assert "Nope" in capsys.readouterr().err and not (tmp_path / "never.json").exists()


def test_a_comfyui_png_prompt_chunk_imports(tmp_path):
    from PIL import PngImagePlugin

    from ldmgraph.interop.cli import read_comfyui_file

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(API_TXT2IMG))
    info.add_text("workflow", json.dumps(UI_TXT2IMG))
    path = tmp_path / "ComfyUI_00001_.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert to_workflow(read_comfyui_file(path)) == to_workflow(copy.deepcopy(API_TXT2IMG))


def test_pixel_sizes_use_the_graphs_vae_factor():
    from comfy_graphs import API_AREA_COMPOSITION

    nodes = to_workflow(copy.deepcopy(API_AREA_COMPOSITION))["nodes"]
    for node_id in ("6", "8", "12"):  # two areas and the empty latent
        assert nodes[node_id]["inputs"]["vae"] == {"node": "1", "output": "vae"}
