"""Workflows as nodes (subgraphs): a workflow that declares outputs is a node type workflow/<stem>.

Built on the tiny integer test nodes, so every value has a closed form: TConst gives its value,
TAdd gives a + b, TSink is an output node returning its input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import graph_testnodes
import pytest
from graph_helpers import link

from ldmgraph.cli import main
from ldmgraph.graph import Registry, codes
from ldmgraph.graph.errors import ValidationError
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.validate import describe_parameters, validate_workflow
from ldmgraph.graph.workflow import parse_workflow
from ldmgraph.plugins import PluginManager, hookimpl

ROOT = Path(__file__).resolve().parents[2]


def component(nodes: dict[str, Any], parameters: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    return {"format": "ldmgraph/1", "nodes": nodes, "parameters": parameters, "outputs": outputs}


def param(*targets: tuple[str, str], description: str = "") -> dict[str, Any]:
    return {"targets": [{"node": n, "input": i} for n, i in targets], "description": description}


# adder: value + b, where value comes from an inner TConst; both parameters, b linkable
ADDER = component(
    {"c": {"type": "TConst", "inputs": {"value": 1}}, "add": {"type": "TAdd", "inputs": {"a": link("c"), "b": 2}}},
    {"value": param(("c", "value"), description="the constant"), "b": param(("add", "b"))},
    {"sum": link("add")},
)


def write(folder: Path, name: str, doc: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def registry_with(folder: Path) -> tuple[Registry, PluginManager]:
    manager = PluginManager(builtins=["ldmgraph.nodes.image", "ldmgraph.nodes.primitives"],
                            entry_points_group=None, use_env=False)
    assert manager.register(graph_testnodes, "graph-testnodes").ok
    manager.load_workflows([folder])
    return manager.registry, manager


@pytest.fixture
def components(tmp_path: Path) -> Path:
    folder = tmp_path / "components"
    write(folder, "adder", ADDER)
    # two deep: twice = adder(adder(x)); three deep: thrice = twice feeding one more adder
    write(folder, "twice", component(
        {"first": {"type": "workflow/adder", "inputs": {"value": 5, "b": 1}},
         "second": {"type": "workflow/adder", "inputs": {"value": 0, "b": link("first", "sum")}}},
        {"x": param(("first", "value")), "y": param(("second", "value"))},
        {"sum": link("second", "sum")}))
    write(folder, "thrice", component(
        {"inner": {"type": "workflow/twice", "inputs": {}},
         "last": {"type": "workflow/adder", "inputs": {"b": link("inner", "sum"), "value": 100}}},
        {"x": param(("inner", "x")), "z": param(("last", "value"))},
        {"sum": link("last", "sum")}))
    return folder


def outer(nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"format": "ldmgraph/1", "nodes": nodes, **extra}


def test_subgraph_component_is_a_node_type_with_inputs_and_outputs_from_its_file(components):
    registry, manager = registry_with(components)
    spec = registry.node("workflow/adder").spec
    assert list(spec.inputs) == ["value", "b"] and list(spec.outputs) == ["sum"]
    value, b = spec.inputs["value"], spec.inputs["b"]
    # type, default, bounds and help from the inner input each parameter targets
    assert (value.socket.name, value.default, value.ge, value.le, value.description) == ("INT", 1, -1000, 1000,
                                                                                        "the constant")
    assert (b.socket.name, b.default, b.required) == ("INT", 2, False)
    assert spec.outputs["sum"].socket.name == "INT"
    owners = {s.name: s for s in manager.statuses if s.source == "workflows"}
    assert all(s.ok for s in owners.values()) and "workflow/thrice" in next(iter(owners.values())).nodes


def test_subgraph_instances_take_literals_and_links_and_share_nothing(components):
    registry, _ = registry_with(components)
    doc = outer({
        "k": {"type": "TConst", "inputs": {"value": 40}},
        "x": {"type": "workflow/adder", "inputs": {"value": 10}},          # 10 + default b 2
        "y": {"type": "workflow/adder", "inputs": {"value": 7, "b": link("k")}},  # 7 + 40, b linked
        "sx": {"type": "TSink", "inputs": {"x": link("x", "sum")}},
        "sy": {"type": "TSink", "inputs": {"x": link("y", "sum")}},
    })
    result = Executor(registry).run(doc)
    assert result.outputs["sx"]["value"] == 12 and result.outputs["sy"]["value"] == 47
    assert {"x.c", "x.add", "y.c", "y.add"} <= set(result.executed)


def test_subgraph_changed_parameter_reruns_only_its_instance_dependents(components):
    registry, _ = registry_with(components)
    doc = outer({
        "x": {"type": "workflow/adder", "inputs": {"value": 10, "b": 1}},
        "y": {"type": "workflow/adder", "inputs": {"value": 20, "b": 1}},
        "sx": {"type": "TSink", "inputs": {"x": link("x", "sum")}},
        "sy": {"type": "TSink", "inputs": {"x": link("y", "sum")}},
    }, parameters={"y_b": param(("y", "b"))})
    executor = Executor(registry)
    first = executor.run(doc)
    assert len(first.executed) == 6
    again = executor.run(doc, overrides={"y_b": 5})
    # y's constant is unchanged: only y's adder and the sink after it run again
    assert sorted(again.executed) == ["sy", "y.add"]
    assert sorted(again.cached) == ["sx", "y.c"]  # x's sink is served whole from the cache
    assert again.outputs["sy"]["value"] == 25 and again.outputs["sx"]["value"] == 11


def test_subgraph_nested_three_deep(components):
    registry, _ = registry_with(components)
    doc = outer({"t": {"type": "workflow/thrice", "inputs": {"x": 3, "z": 1000}},
                 "s": {"type": "TSink", "inputs": {"x": link("t", "sum")}}})
    compiled = validate_workflow(doc, registry)
    assert "t.inner.first.add" in compiled.nodes and "t.last.add" in compiled.nodes
    # first: 3 + 1 = 4; second: 0 + 4 = 4; last: 1000 + 4
    assert Executor(registry).run(doc).outputs["s"]["value"] == 1004


def test_subgraph_errors_name_the_nested_path(components):
    registry, _ = registry_with(components)
    doc = outer({"t": {"type": "workflow/thrice", "inputs": {"x": 5000}},
                 "u": {"type": "workflow/adder", "inputs": {"nope": 1}},
                 "s": {"type": "TSink", "inputs": {"x": link("t", "total")}}})
    with pytest.raises(ValidationError) as caught:
        validate_workflow(doc, registry)
    found = {(p.node_id, p.input, p.code) for p in caught.value.problems}
    assert ("t.inner.first.c", "value", codes.OUT_OF_BOUNDS) in found  # three levels down
    assert ("u", "nope", codes.UNKNOWN_INPUT) in found
    assert ("s", "x", codes.UNKNOWN_OUTPUT) in found
    text = str(caught.value)
    assert "node 't.inner.first.c', input 'value'" in text and "its outputs are: sum" in text


def test_subgraph_cycle_between_two_files_names_the_files(tmp_path):
    folder = tmp_path / "cyclic"
    write(folder, "ping", component({"p": {"type": "workflow/pong", "inputs": {}}}, {}, {"sum": link("p", "sum")}))
    write(folder, "pong", component({"p": {"type": "workflow/ping", "inputs": {}}}, {}, {"sum": link("p", "sum")}))
    registry, manager = registry_with(folder)
    doc = outer({"a": {"type": "workflow/ping", "inputs": {}}, "s": {"type": "TSink", "inputs": {"x": link("a", "sum")}}})
    with pytest.raises(ValidationError) as caught:
        validate_workflow(doc, registry)
    problem = next(p for p in caught.value.problems if p.node_id == "a")
    assert problem.code == codes.CYCLE
    assert "ping.json -> pong.json -> ping.json" in problem.message
    status = next(s for s in manager.statuses if s.source == "workflows")
    assert not status.ok and "pong.json" in status.error


def test_subgraph_component_runs_alone_giving_its_declared_outputs(components):
    registry, _ = registry_with(components)
    result = Executor(registry).run(ADDER, overrides={"value": 30, "b": 12})
    assert result.outputs["add"]["value"] == 42


def test_subgraph_outer_parameters_reach_inner_inputs_and_are_described(components):
    registry, _ = registry_with(components)
    doc = outer({"t": {"type": "workflow/thrice", "inputs": {"x": 3}},
                 "s": {"type": "TSink", "inputs": {"x": link("t", "sum")}}},
                parameters={"start": param(("t", "x"), description="where the chain starts")})
    listing = describe_parameters(parse_workflow(doc), registry)
    assert listing["start"]["type"] == "INT" and listing["start"]["value"] == 3
    assert listing["start"]["targets"] == ["t.x"] and listing["start"]["description"] == "where the chain starts"
    compiled = validate_workflow(doc, registry, overrides={"start": 8})
    assert compiled.nodes["t.inner.first.c"].literals["value"] == 8 and compiled.parameters == {"start": 8}
    assert Executor(registry).run(compiled).outputs["s"]["value"] == 100 + 9
    # the resolved document (what a saved image embeds) needs no component files
    flat = compiled.resolved_document()
    assert flat["nodes"]["t.inner.first.c"]["inputs"]["value"] == 8
    assert all(not node["type"].startswith("workflow/") for node in flat["nodes"].values())


def test_subgraph_components_shipped_by_a_plugin(components, tmp_path):
    shipped = tmp_path / "plugin_workflows"
    write(shipped, "shipped_adder", ADDER)

    class Plugin:
        @hookimpl
        def ldmgraph_workflows(self):
            return [shipped]

    registry, manager = registry_with(tmp_path / "none")
    assert manager.register(Plugin(), "my-plugin").ok
    manager.load_workflows()
    assert registry.owner("node type", "workflow/shipped_adder") == "my-plugin"


SCALER = component(
    {"scale": {"type": "ImageScaleBy", "inputs": {"scale_by": 3.0}},
     "invert": {"type": "ImageInvert", "inputs": {"image": link("scale", "image")}}},
    {"image": param(("scale", "image"), description="what to scale"), "factor": param(("scale", "scale_by")),
     "method": param(("scale", "upscale_method"))},
    {"image": link("invert", "image")})


def test_subgraph_cli_nodes_lists_components_with_inputs_and_outputs(tmp_path, capsys):
    write(tmp_path / "mine", "scaler", SCALER)
    assert main(["nodes", "--json", "--workflows-dir", str(tmp_path / "mine")]) == 0
    listing = json.loads(capsys.readouterr().out)
    scaler = listing["workflow/scaler"]
    assert list(scaler["inputs"]) == ["image", "factor", "method"]
    assert scaler["inputs"]["image"] == {"type": "IMAGE", "required": True, "description": "what to scale"}
    assert (scaler["inputs"]["factor"]["default"], scaler["inputs"]["factor"]["ge"]) == (3.0, 0.01)
    assert "lanczos" in scaler["inputs"]["method"]["choices"]
    assert scaler["outputs"] == {"image": {"type": "IMAGE", "description": ""}}
    assert main(["nodes", "--workflows-dir", str(tmp_path / "mine")]) == 0
    text = capsys.readouterr().out
    assert "workflow/scaler" in text and "factor: FLOAT = 3.0, range 0.01..16" in text and "-> image: IMAGE" in text


def test_subgraph_cli_params_of_a_graph_built_from_components(capsys):
    hires = ROOT / "workflows" / "hires_fix.json"
    assert any(n["type"].startswith("workflow/") for n in json.loads(hires.read_text())["nodes"].values())
    assert main(["params", "--json", str(hires)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing) == list(json.loads(hires.read_text())["parameters"])
    assert listing["seed"]["type"] == "INT" and listing["seed"]["targets"] == ["base.seed", "hires.seed"]
    assert listing["denoise"]["value"] == 0.7 and listing["denoise"]["le"] == 1.0
    assert "choices" in listing["sampler"]


def test_subgraph_cli_run_and_validate_with_workflows_dir(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "mine"
    write(folder, "inverter", component(
        {"load": {"type": "LoadImage", "inputs": {"image": "in.png"}},
         "invert": {"type": "ImageInvert", "inputs": {"image": link("load", "image")}}},
        {"image": param(("load", "image"))}, {"image": link("invert", "image")}))
    (tmp_path / "input").mkdir()
    Image.new("RGB", (4, 2), (10, 20, 30)).save(tmp_path / "input" / "in.png")
    doc = write(tmp_path, "outer", outer({
        "a": {"type": "workflow/inverter", "inputs": {}},
        "b": {"type": "ImageInvert", "inputs": {"image": link("a", "image")}},
        "save": {"type": "SaveImage", "inputs": {"images": link("b", "image"), "filename_prefix": "twice"}}}))
    common = ["--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "out")]
    assert main(["validate", str(doc), *common]) == 2  # the component is unknown without its folder
    assert "workflow/inverter" in capsys.readouterr().err
    assert main(["validate", str(doc), "--workflows-dir", str(folder), *common]) == 0
    assert main(["run", str(doc), "--workflows-dir", str(folder), "--no-progress", *common]) == 0
    (saved,) = (tmp_path / "out").glob("twice_*.png")
    with Image.open(saved) as image:
        assert image.getpixel((0, 0)) == (10, 20, 30)  # inverted twice


def test_subgraph_cli_batch_with_workflows_dir_sweeps_a_component_input(tmp_path, capsys):
    from PIL import Image

    write(tmp_path / "mine", "scaler", SCALER)
    (tmp_path / "input").mkdir()
    Image.new("RGB", (4, 2), (200, 100, 50)).save(tmp_path / "input" / "in.png")
    doc = write(tmp_path, "outer", outer({
        "load": {"type": "LoadImage", "inputs": {"image": "in.png"}},
        "s": {"type": "workflow/scaler", "inputs": {"image": link("load", "image"), "method": "nearest"}},
        "save": {"type": "SaveImage", "inputs": {"images": link("s", "image"), "filename_prefix": "scaled"}}},
        parameters={"factor": param(("s", "factor"))}))
    code = main(["batch", str(doc), "--sweep", "factor=1,2", "--workflows-dir", str(tmp_path / "mine"),
                 "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    sizes = []
    for path in sorted((tmp_path / "out").glob("row*.png")):
        with Image.open(path) as image:
            sizes.append(image.size)
            assert image.getpixel((0, 0)) == (55, 155, 205)  # inverted inside the component
    assert sizes == [(4, 2), (8, 4)]


def test_subgraph_error_in_the_shipped_hires_fix_names_hires_refine_cfg(tmp_path, capsys):
    doc = json.loads((ROOT / "workflows" / "hires_fix.json").read_text())
    doc["nodes"]["hires"]["inputs"]["cfg"] = 500
    broken = write(tmp_path, "hires_fix_bad_cfg", doc)
    assert main(["validate", "--json", str(broken)]) == 2
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["node_id"], p["input"], p["code"]) for p in problems] == [("hires.refine", "cfg", "out_of_bounds")]
    assert "500" in problems[0]["message"] and "100" in problems[0]["message"]
