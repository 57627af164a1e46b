"""ComfyUI's subgraphs (``definitions.subgraphs``) and group nodes (``extra.groupNodes``) in UI-format
files: they import into one flat graph with the editor's ids (``20:1``), run, and give the same image,
bit for bit, as the same graph written flat.

The files are written as the editor saves them: subgraph links as objects with the boundary node
ids -10 (the subgraph's inputs) and -20 (its outputs), widget inputs on the instance holding their
values in the instance's ``widgets_values`` (the seed followed by its "control after generate").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfy_graphs import TXT2IMG
from PIL import Image

from ldmgraph.interop.comfyui import to_workflow

PROMPT = "a red circle on the left"
KSAMPLER_WIDGETS = [42, "fixed", 2, 4.0, "euler", "karras", 1.0]


def slot(name: str, kind: str, link: int | None, widget: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": kind, "link": link}
    if widget:
        out["widget"] = {"name": name}
    return out


def out(name: str, links: list[int]) -> dict[str, Any]:
    return {"name": name, "type": name, "links": links}


def node(node_id: int, kind: str, widgets: list[Any], inputs: list[Any], outputs: list[Any]) -> dict[str, Any]:
    return {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0, "mode": 0,
            "inputs": inputs, "outputs": outputs, "properties": {}, "widgets_values": widgets}


def ui(nodes: list[Any], links: list[Any], **extra: Any) -> dict[str, Any]:
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4, **extra}


def sg_link(link_id: int, src: int, src_slot: int, dst: int, dst_slot: int, kind: str) -> dict[str, Any]:
    return {"id": link_id, "origin_id": src, "origin_slot": src_slot, "target_id": dst, "target_slot": dst_slot,
            "type": kind}


def sg_slots(names: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"id": f"slot-{i}", "name": n, "type": t, "linkIds": [], "localized_name": n} for i, (n, t) in enumerate(names)]


CHECKPOINT = node(4, "CheckpointLoaderSimple", [TXT2IMG], [],
                  [out("MODEL", [1]), out("CLIP", [2, 3]), out("VAE", [7])])

FLAT = ui([
    CHECKPOINT,
    node(6, "CLIPTextEncode", [PROMPT], [slot("clip", "CLIP", 2)], [out("CONDITIONING", [5])]),
    node(7, "CLIPTextEncode", [""], [slot("clip", "CLIP", 3)], [out("CONDITIONING", [6])]),
    node(5, "EmptyLatentImage", [64, 64, 1], [], [out("LATENT", [4])]),
    node(3, "KSampler", KSAMPLER_WIDGETS, [slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 5),
                                           slot("negative", "CONDITIONING", 6), slot("latent_image", "LATENT", 4)],
         [out("LATENT", [8])]),
    node(8, "VAEDecode", [], [slot("samples", "LATENT", 8), slot("vae", "VAE", 7)], [out("IMAGE", [9])]),
    node(9, "SaveImage", ["flat"], [slot("images", "IMAGE", 9)], []),
], [[1, 4, 0, 3, 0, "MODEL"], [2, 4, 1, 6, 0, "CLIP"], [3, 4, 1, 7, 0, "CLIP"], [4, 5, 0, 3, 3, "LATENT"],
    [5, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 4, 2, 8, 1, "VAE"],
    [8, 3, 0, 8, 0, "LATENT"], [9, 8, 0, 9, 0, "IMAGE"]])

# "sample and decode": KSampler + VAEDecode; seed and steps are subgraph inputs fed to widgets
SAMPLE_ID = "5c1b2f6e-0000-4000-8000-00000000a001"
SAMPLE = {
    "id": SAMPLE_ID, "version": 1, "name": "sample and decode", "revision": 0, "config": {},
    "inputNode": {"id": -10, "bounding": [0, 0, 120, 200]}, "outputNode": {"id": -20, "bounding": [900, 0, 120, 60]},
    "inputs": sg_slots([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent", "LATENT"), ("vae", "VAE"), ("seed", "INT"), ("steps", "INT")]),
    "outputs": sg_slots([("IMAGE", "IMAGE")]), "widgets": [],
    "nodes": [
        node(1, "KSampler", [0, "randomize", 20, 4.0, "euler", "karras", 1.0],
             [slot("model", "MODEL", 11), slot("positive", "CONDITIONING", 12), slot("negative", "CONDITIONING", 13),
              slot("latent_image", "LATENT", 14), slot("seed", "INT", 15, widget=True),
              slot("steps", "INT", 16, widget=True)], [out("LATENT", [17])]),
        node(2, "VAEDecode", [], [slot("samples", "LATENT", 17), slot("vae", "VAE", 18)], [out("IMAGE", [19])]),
    ],
    "links": [sg_link(11, -10, 0, 1, 0, "MODEL"), sg_link(12, -10, 1, 1, 1, "CONDITIONING"),
              sg_link(13, -10, 2, 1, 2, "CONDITIONING"), sg_link(14, -10, 3, 1, 3, "LATENT"),
              sg_link(15, -10, 5, 1, 4, "INT"), sg_link(16, -10, 6, 1, 5, "INT"),
              sg_link(17, 1, 0, 2, 0, "LATENT"), sg_link(18, -10, 4, 2, 1, "VAE"), sg_link(19, 2, 0, -20, 0, "IMAGE")],
    "groups": [], "extra": {},
}


def sample_instance(node_id: int, links: list[int | None], widgets: list[Any], out_links: list[int]) -> dict:
    names = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
             ("vae", "VAE")]
    inputs = [slot(n, t, link) for (n, t), link in zip(names, links, strict=True)]
    inputs += [slot("seed", "INT", None, widget=True), slot("steps", "INT", None, widget=True)]
    return node(node_id, SAMPLE_ID, widgets, inputs, [out("IMAGE", out_links)])


ONE_LEVEL = ui([
    CHECKPOINT,
    node(6, "CLIPTextEncode", [PROMPT], [slot("clip", "CLIP", 2)], [out("CONDITIONING", [5])]),
    node(7, "CLIPTextEncode", [""], [slot("clip", "CLIP", 3)], [out("CONDITIONING", [6])]),
    node(5, "EmptyLatentImage", [64, 64, 1], [], [out("LATENT", [4])]),
    sample_instance(20, [1, 5, 6, 4, 7], [42, "fixed", 2], [9]),
    node(9, "SaveImage", ["one_level"], [slot("images", "IMAGE", 9)], []),
], [[1, 4, 0, 20, 0, "MODEL"], [2, 4, 1, 6, 0, "CLIP"], [3, 4, 1, 7, 0, "CLIP"], [4, 5, 0, 20, 3, "LATENT"],
    [5, 6, 0, 20, 1, "CONDITIONING"], [6, 7, 0, 20, 2, "CONDITIONING"], [7, 4, 2, 20, 4, "VAE"],
    [9, 20, 0, 9, 0, "IMAGE"]], definitions={"subgraphs": [SAMPLE]})

# "text to image": the prompts and the empty latent around an instance of "sample and decode";
# its prompt is a widget input of the outer instance
TXT2IMG_ID = "5c1b2f6e-0000-4000-8000-00000000a002"
TEXT_TO_IMAGE = {
    "id": TXT2IMG_ID, "version": 1, "name": "text to image", "revision": 0, "config": {},
    "inputNode": {"id": -10, "bounding": [0, 0, 120, 120]}, "outputNode": {"id": -20, "bounding": [900, 0, 120, 60]},
    "inputs": sg_slots([("clip", "CLIP"), ("model", "MODEL"), ("vae", "VAE"), ("text", "STRING")]),
    "outputs": sg_slots([("IMAGE", "IMAGE")]), "widgets": [],
    "nodes": [
        node(1, "CLIPTextEncode", ["overwritten by the instance"], [slot("clip", "CLIP", 21),
                                                                    slot("text", "STRING", 28, widget=True)],
             [out("CONDITIONING", [23])]),
        node(2, "CLIPTextEncode", [""], [slot("clip", "CLIP", 22)], [out("CONDITIONING", [24])]),
        node(3, "EmptyLatentImage", [64, 64, 1], [], [out("LATENT", [25])]),
        sample_instance(4, [26, 23, 24, 25, 27], [42, "fixed", 2], [29]),
    ],
    "links": [sg_link(21, -10, 0, 1, 0, "CLIP"), sg_link(22, -10, 0, 2, 0, "CLIP"),
              sg_link(23, 1, 0, 4, 1, "CONDITIONING"), sg_link(24, 2, 0, 4, 2, "CONDITIONING"),
              sg_link(25, 3, 0, 4, 3, "LATENT"), sg_link(26, -10, 1, 4, 0, "MODEL"), sg_link(27, -10, 2, 4, 4, "VAE"),
              sg_link(28, -10, 3, 1, 1, "STRING"), sg_link(29, 4, 0, -20, 0, "IMAGE")],
    "groups": [], "extra": {},
}

NESTED = ui([
    CHECKPOINT,
    node(30, TXT2IMG_ID, [PROMPT], [slot("clip", "CLIP", 2), slot("model", "MODEL", 1), slot("vae", "VAE", 7),
                                    slot("text", "STRING", None, widget=True)], [out("IMAGE", [9])]),
    node(9, "SaveImage", ["nested"], [slot("images", "IMAGE", 9)], []),
], [[1, 4, 0, 30, 1, "MODEL"], [2, 4, 1, 30, 0, "CLIP"], [7, 4, 2, 30, 2, "VAE"], [9, 30, 0, 9, 0, "IMAGE"]],
    definitions={"subgraphs": [TEXT_TO_IMAGE, SAMPLE]})

# the older group node: KSampler + VAEDecode saved as "sampler group"; the instance's inputs are the
# inner nodes' unlinked link inputs in order, its widgets the inner widgets in order
GROUP = ui([
    CHECKPOINT,
    node(6, "CLIPTextEncode", [PROMPT], [slot("clip", "CLIP", 2)], [out("CONDITIONING", [5])]),
    node(7, "CLIPTextEncode", [""], [slot("clip", "CLIP", 3)], [out("CONDITIONING", [6])]),
    node(5, "EmptyLatentImage", [64, 64, 1], [], [out("LATENT", [4])]),
    node(40, "workflow>sampler group", KSAMPLER_WIDGETS,
         [slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 5), slot("negative", "CONDITIONING", 6),
          slot("latent_image", "LATENT", 4), slot("vae", "VAE", 7)], [out("IMAGE", [9])]),
    node(9, "SaveImage", ["group"], [slot("images", "IMAGE", 9)], []),
], [[1, 4, 0, 40, 0, "MODEL"], [2, 4, 1, 6, 0, "CLIP"], [3, 4, 1, 7, 0, "CLIP"], [4, 5, 0, 40, 3, "LATENT"],
    [5, 6, 0, 40, 1, "CONDITIONING"], [6, 7, 0, 40, 2, "CONDITIONING"], [7, 4, 2, 40, 4, "VAE"],
    [9, 40, 0, 9, 0, "IMAGE"]])
GROUP["extra"] = {"groupNodes": {"sampler group": {
    "nodes": [
        {**node(3, "KSampler", [7, "randomize", 20, 8.0, "euler", "normal", 1.0],
                [slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 5), slot("negative", "CONDITIONING", 6),
                 slot("latent_image", "LATENT", 4)], [out("LATENT", [8])]), "index": 0},
        {**node(8, "VAEDecode", [], [slot("samples", "LATENT", 8), slot("vae", "VAE", 7)], [out("IMAGE", [9])]),
         "index": 1},
    ],
    "links": [[0, 0, 1, 0, 3, "LATENT"]],
    "external": [[1, 0, "IMAGE"]],
}}}


def run_image(doc: dict[str, Any], comfy_models_dir: Path, tmp_path: Path) -> np.ndarray:
    """Import and run in a fresh executor (nothing cached from another run), return the saved pixels."""
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    out_dir = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    env = Environment(input_dir=tmp_path, output_dir=out_dir, model_dirs=(comfy_models_dir,))
    result = Executor(load_registry(), env).run(to_workflow(copy.deepcopy(doc)))
    (saved,) = result.files
    with Image.open(saved) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def flat_image(comfy_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return run_image(FLAT, comfy_models_dir, tmp_path_factory.mktemp("flat"))


def test_comfyui_subgraph_imports_with_the_editors_ids_and_widget_inputs():
    nodes = to_workflow(copy.deepcopy(ONE_LEVEL))["nodes"]
    sampler, decode = nodes["20:1"], nodes["20:2"]
    assert sampler["type"] == "Sampler" and decode["type"] == "VAEDecode"
    # seed and steps are the instance's widget values, not the inner node's own
    assert (sampler["inputs"]["seed"], sampler["inputs"]["steps"], sampler["inputs"]["cfg"]) == (42, 2, 4.0)
    assert sampler["inputs"]["model"] == {"node": "4", "output": "model"}
    assert sampler["inputs"]["positive"] == {"node": "6", "output": "conditioning"}
    assert decode["inputs"]["latent"] == {"node": "20:1", "output": "latent"}
    assert nodes["9"]["inputs"]["images"] == {"node": "20:2", "output": "image"}
    assert "20" not in nodes


def test_comfyui_subgraph_nested_imports_three_levels_of_ids():
    nodes = to_workflow(copy.deepcopy(NESTED))["nodes"]
    assert nodes["30:1"]["inputs"]["text"] == PROMPT  # a widget input of the outer instance
    assert nodes["30:4:1"]["inputs"]["positive"] == {"node": "30:1", "output": "conditioning"}
    assert nodes["30:4:1"]["inputs"]["seed"] == 42 and nodes["30:4:1"]["inputs"]["model"]["node"] == "4"
    assert nodes["9"]["inputs"]["images"] == {"node": "30:4:2", "output": "image"}


@pytest.mark.parametrize("name, doc", [("one level", ONE_LEVEL), ("nested", NESTED), ("group node", GROUP)])
def test_comfyui_subgraph_gives_the_image_of_the_same_graph_written_flat(name, doc, flat_image, comfy_models_dir,
                                                                        tmp_path):
    image = run_image(doc, comfy_models_dir, tmp_path)
    assert image.shape == (64, 64, 3)
    assert np.array_equal(image, flat_image), f"the {name} graph draws a different image from the flat one"


def test_comfyui_subgraph_group_node_takes_the_instance_widgets():
    nodes = to_workflow(copy.deepcopy(GROUP))["nodes"]
    sampler = nodes["40:0"]
    assert (sampler["inputs"]["seed"], sampler["inputs"]["cfg"], sampler["inputs"]["schedule"]) == (42, 4.0, "karras")
    assert nodes["9"]["inputs"]["images"] == {"node": "40:1", "output": "image"}


def test_comfyui_subgraph_that_contains_itself_is_refused():
    from ldmgraph.graph import codes
    from ldmgraph.graph.errors import ValidationError

    looping = copy.deepcopy(SAMPLE)
    looping["nodes"].append(node(9, SAMPLE_ID, [], [], [out("IMAGE", [])]))
    looping["links"].append(sg_link(90, 9, 0, 2, 1, "IMAGE"))
    doc = copy.deepcopy(ONE_LEVEL)
    doc["definitions"] = {"subgraphs": [looping]}
    with pytest.raises(ValidationError) as caught:
        to_workflow(doc)
    assert caught.value.problems[0].code == codes.CYCLE and "sample and decode" in caught.value.problems[0].message


def test_comfyui_subgraph_import_and_run_commands(comfy_models_dir, tmp_path, capsys):
    from ldmgraph.cli import main

    path = tmp_path / "nested.json"
    path.write_text(json.dumps(NESTED))
    assert main(["import", str(path), "-o", str(tmp_path / "flat.json")]) == 0
    imported = json.loads((tmp_path / "flat.json").read_text())
    assert imported["nodes"]["30:4:1"]["type"] == "Sampler"
    assert main(["run", str(path), "--models-dir", str(comfy_models_dir), "--output-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "out").glob("nested_*.png"))) == 1
