"""ComfyUI's core node catalogue, served by `ldmgraph serve` from the importer's own table.

The reference is ComfyUI 0.3.64's `/object_info` for the classes ldmgraph maps
(`data/comfyui_object_info.json`: its answer less its prose and its file lists). Every class the
importer maps is served under its ComfyUI name in that exact shape, its list widgets cut only to the
values ldmgraph honours; ldmgraph's own node types are served too; and the widget order the importer
reads from the editor's UI format is the order the catalogue tells the editor.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ldmgraph.interop.comfyui import ui_to_api
from ldmgraph.interop.comfyui_nodes import (
    COMFYUI_NODES,
    PASS_THROUGH_CLASSES,
    SEED_CONTROL_VALUES,
    UNMAPPED_COMFYUI_CLASSES,
)
from ldmgraph.plugins import load_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
pytest.importorskip("fastapi")
from server_helpers import ServerProcess, comfy_graph, wait_history  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfyui_object_info.json").read_text())
FILE_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("VAELoader", "vae_name"), ("LoadImage", "image"),
              ("ControlNetLoader", "control_net_name"), ("LoraLoader", "lora_name"),
              ("LoraLoaderModelOnly", "lora_name")}
SERVED = sorted(set(COMFYUI_NODES) | PASS_THROUGH_CLASSES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("catalogue") / "data").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def catalogue(server: ServerProcess) -> dict[str, Any]:
    return server.http.get("/object_info").json() | {"_one": {  # type: ignore[no-any-return]
        name: server.http.get(f"/api/object_info/{name}").json() for name in ("KSampler", "LoadImage")}}


def test_every_mapped_comfyui_class_is_served_in_comfyuis_shape(catalogue: dict[str, Any]) -> None:
    for name in SERVED:
        served, reference = catalogue[name], REFERENCE[name]
        if "output_tooltips" in reference:
            assert len(served["output_tooltips"]) == reference["output_tooltips"], name
        for key in ("input_order", "output", "output_is_list", "output_name", "name", "display_name", "category",
                    "output_node", "python_module", "deprecated", "experimental", "api_node"):
            assert served.get(key) == reference.get(key), (name, key)
        assert list(served["input"]) == list(reference["input"]), name
        for section, inputs in reference["input"].items():
            assert list(served["input"][section]) == list(inputs), (name, section)
            for input_name, declared in inputs.items():
                got = served["input"][section][input_name]
                if section == "hidden":
                    assert got == declared
                    continue
                assert len(got) == len(declared) and got[1:] == declared[1:], (name, input_name, got)
                if (name, input_name) in FILE_LISTS:
                    assert isinstance(got[0], list), (name, input_name)
                elif isinstance(declared[0], list):  # a list widget: ComfyUI's values in its order, less refusals
                    assert got[0] and [v for v in declared[0] if v in got[0]] == got[0], (name, input_name)
                else:
                    assert got[0] == declared[0], (name, input_name)


def test_served_choices_are_those_ldmgraph_honours(catalogue: dict[str, Any]) -> None:
    ksampler = catalogue["KSampler"]["input"]["required"]
    registry = load_registry()
    assert ksampler["sampler_name"][0] == [s for s in REFERENCE["KSampler"]["input"]["required"]["sampler_name"][0]
                                           if s in registry.choices("samplers")]
    assert {"euler", "dpmpp_2m", "ddim", "uni_pc"} <= set(ksampler["sampler_name"][0])
    assert "bislerp" not in catalogue["LatentUpscale"]["input"]["required"]["upscale_method"][0]
    assert catalogue["DualCFGGuider"]["input"]["required"]["style"][0] == ["regular"]
    ckpt = catalogue["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "ldmgraph-shapes-txt2img.safetensors" in ckpt
    assert catalogue["_one"]["KSampler"] == {"KSampler": catalogue["KSampler"]}
    assert catalogue["_one"]["LoadImage"]["LoadImage"]["input"]["required"]["image"][1] == {"image_upload": True}


def test_ldmgraphs_own_nodes_stay_listed(catalogue: dict[str, Any]) -> None:
    registry = load_registry()
    for name, cls in registry.nodes.items():
        served = f"ldmgraph.{name}" if name in SERVED or name in UNMAPPED_COMFYUI_CLASSES else name
        entry = catalogue[served]
        assert entry["name"] == served and entry["category"].startswith("ldmgraph/"), name
        listed = entry["input_order"]["required"] + entry["input_order"]["optional"]
        assert sorted(listed) == sorted(cls.spec.inputs), name
    assert "latent" in catalogue["ldmgraph.VAEDecode"]["input_order"]["required"]
    assert catalogue["VAEDecode"]["input_order"]["required"] == ["samples", "vae"]
    unmapped = {k for k, v in catalogue.items() if k != "_one" and not v["category"].startswith("ldmgraph/")}
    assert unmapped == set(SERVED), "a ComfyUI class is served that the importer does not map"
    assert not UNMAPPED_COMFYUI_CLASSES & set(catalogue), "a ComfyUI name describes one of ldmgraph's nodes"
    assert not UNMAPPED_COMFYUI_CLASSES & set(SERVED)
    taken = set(registry.nodes) & set(REFERENCE["_class_names"]) - set(SERVED)
    assert taken <= UNMAPPED_COMFYUI_CLASSES, "an ldmgraph node is named like a ComfyUI class: list it there"


def _editor_widgets(info: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """The widget names and values the editor stores for a node drawn from its catalogue entry: list and
    scalar inputs in declaration order, the seed's "control after generate", the upload button."""
    names: list[str] = []
    values: list[Any] = []
    for section in ("required", "optional"):
        for name, declared in info["input"].get(section, {}).items():
            kind, options = declared[0], (declared[1] if len(declared) > 1 else {})
            if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")):
                continue
            value = options.get("default", kind[0] if isinstance(kind, list) and kind else f"<{name}>")
            names.append(name)
            values.append(value)
            if options.get("control_after_generate"):
                values.append("fixed")
            if options.get("image_upload"):
                values.append("image")
    return names, values


def test_importer_reads_widgets_in_the_order_the_catalogue_declares(catalogue: dict[str, Any]) -> None:
    for name in sorted(COMFYUI_NODES):
        names, values = _editor_widgets(catalogue[name])
        ui = {"nodes": [{"id": 1, "type": name, "mode": 0, "inputs": [], "outputs": [], "widgets_values": values}],
              "links": []}
        inputs = ui_to_api(ui)["1"]["inputs"]
        assert {k: v for k, v in inputs.items() if k != "upload"} == dict(zip(names, _named(names, values), strict=True)), name


def _named(names: list[str], values: list[Any]) -> list[Any]:
    """The values of `names`, skipping the seed control and upload companions the editor adds."""
    out: list[Any] = []
    position = 0
    for _ in names:
        out.append(values[position])
        position += 1
        while position < len(values) and (values[position] == "image" or values[position] in SEED_CONTROL_VALUES):
            position += 1
    return out


def _saved_pixels(server: ServerProcess, prompt: dict[str, Any]) -> Any:
    import io

    import numpy as np
    from PIL import Image

    entry = wait_history(server, server.submit(prompt)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    return np.asarray(Image.open(io.BytesIO(server.http.get("/view", params=image).content)))


def test_a_graph_mixing_comfyui_classes_and_ldmgraph_nodes_queues(server: ServerProcess) -> None:
    """The editor lists both kinds; a graph with ldmgraph's VAEDecode in place of ComfyUI's (other input
    names, same node behind them) queues and draws the same pixels."""
    comfy = comfy_graph(seed=11, prefix="pure")
    mixed = comfy_graph(seed=11, prefix="mixed")
    mixed["8"] = {"class_type": "ldmgraph.VAEDecode", "inputs": {"latent": ["3", 0], "vae": ["4", 2]}}
    assert (_saved_pixels(server, comfy) == _saved_pixels(server, mixed)).all()
    mixed["8"]["class_type"] = "VAEDecode"  # ComfyUI's class: its input is samples, not latent
    reply = server.http.post("/prompt", json={"prompt": mixed})
    assert reply.status_code == 400 and "8" in reply.json()["node_errors"]


def test_saved_workflows_as_the_editor_draws_them_import_back_to_the_same_graph(server: ServerProcess) -> None:
    """A saved workflow in the editor's UI format (ldmgraph's own nodes, under their editor names)
    imports back, through the importer `ldmgraph run` uses, to the same nodes, inputs and links."""
    from ldmgraph.interop.comfyui import to_workflow

    names = [w["name"] for w in server.http.get("/api/workflows").json()]
    assert "txt2img" in names
    for name in names:
        original = server.http.get(f"/api/workflows/{name}").json()
        ui = server.http.get(f"/api/userdata/workflows%2F{name}.json").json()
        ids = ui["extra"]["ldmgraph"]["node_ids"]  # the editor's integer ids -> the workflow's ids
        imported = to_workflow(ui)["nodes"]
        for number, node in imported.items():
            source = original["nodes"][ids[number]]
            assert node["type"] == source["type"], (name, number)
            for input_name, value in source["inputs"].items():
                got = node["inputs"].get(input_name)
                if isinstance(value, dict) and "node" in value:
                    got = {"node": ids[got["node"]], "output": got["output"]}
                assert got == value, (name, ids[number], input_name)
