"""Validation reports every problem at once, each with node id, input, a stable code and a fix."""

from __future__ import annotations

import json

import pytest
from graph_helpers import WORKFLOWS, link, workflow, write_png

from ldmgraph.graph import ValidationError, codes
from ldmgraph.graph.validate import validate_workflow


def problems(doc, registry, env=None, **kwargs) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as info:
        validate_workflow(doc, registry, env, **kwargs)
    return {(p.node_id, p.input, p.code): p.message for p in info.value.problems}


def test_broken_workflow_reports_every_problem_with_its_node(registry) -> None:
    found = problems(json.loads((WORKFLOWS / "broken.json").read_text()), registry)
    keys = set(found)
    assert ("typo", None, codes.UNKNOWN_NODE_TYPE) in keys
    assert ("nolink", "image", codes.MISSING_INPUT) in keys
    assert ("dangling", "image", codes.DANGLING_LINK) in keys
    assert ("mismatch", "image", codes.TYPE_MISMATCH) in keys
    assert ("bounds", "width", codes.OUT_OF_BOUNDS) in keys
    assert ("loop_a", None, codes.CYCLE) in keys
    assert "'ImageInvert'" in found[("typo", None, codes.UNKNOWN_NODE_TYPE)]  # closest known name
    assert "'loop_a'" in found[("loop_a", None, codes.CYCLE)] and "'loop_b'" in found[("loop_a", None, codes.CYCLE)]
    assert "INT" in found[("mismatch", "image", codes.TYPE_MISMATCH)]


@pytest.mark.parametrize(
    ("inputs", "code"),
    [
        ({"value": "7"}, codes.WRONG_TYPE),
        ({"value": True}, codes.WRONG_TYPE),
        ({"value": 1.5}, codes.WRONG_TYPE),
        ({"value": 10**30}, codes.OUT_OF_BOUNDS),
        ({"value": -1001}, codes.OUT_OF_BOUNDS),
        ({"value": [1, [2, [3]]]}, codes.WRONG_TYPE),
        ({"bogus": 1}, codes.UNKNOWN_INPUT),
    ],
)
def test_literal_problems(registry, inputs, code) -> None:
    doc = workflow({"c": {"type": "TConst", "inputs": inputs}, "s": {"type": "TSink", "inputs": {"x": link("c")}}})
    assert {k[2] for k in problems(doc, registry)} == {code}


def test_enum_choices_come_from_the_registry(registry) -> None:
    ok = workflow({"p": {"type": "TPick", "inputs": {"sampler": "other_sampler"}}})
    assert validate_workflow(ok, registry).outputs == ["p"]
    found = problems(workflow({"p": {"type": "TPick", "inputs": {"sampler": "test_samplr"}}}), registry)
    message = found[("p", "sampler", codes.NOT_IN_CHOICES)]
    assert "'test_sampler'" in message  # lists the choices and suggests the closest


def test_unknown_output_link_required_and_no_output_node(registry) -> None:
    found = problems(workflow({
        "c": {"type": "TConst", "inputs": {}},
        "a": {"type": "TAdd", "inputs": {"a": link("c", "nope")}},
        "i": {"type": "ImageInvert", "inputs": {"image": [[0.5]]}},
    }), registry)
    assert set(found) == {("a", "a", codes.UNKNOWN_OUTPUT), ("i", "image", codes.LINK_REQUIRED),
                          (None, None, codes.NO_OUTPUT_NODE)}
    assert "value" in found[("a", "a", codes.UNKNOWN_OUTPUT)]  # names the outputs that exist


def test_parameters_override_and_bad_overrides(registry) -> None:
    doc = workflow({"c": {"type": "TConst", "inputs": {"value": 1}}, "s": {"type": "TSink", "inputs": {"x": link("c")}}},
                   parameters={"n": {"targets": [{"node": "c", "input": "value"}]}})
    compiled = validate_workflow(doc, registry, overrides={"n": 5})
    assert compiled.nodes["c"].literals["value"] == 5 and compiled.parameters == {"n": 5}
    assert compiled.resolved_document()["nodes"]["c"]["inputs"]["value"] == 5
    assert validate_workflow(doc, registry).parameters == {"n": 1}
    assert set(problems(doc, registry, overrides={"m": 5})) == {(None, None, codes.BAD_PARAMETER)}
    # an out-of-range value is out_of_bounds, as the same literal in the file would be
    assert set(problems(doc, registry, overrides={"n": 5000})) == {("c", "value", codes.OUT_OF_BOUNDS)}
    broken = workflow(doc["nodes"], parameters={"n": {"targets": [{"node": "zz", "input": "value"},
                                                                 {"node": "c", "input": "nope"}]}})
    assert set(problems(broken, registry)) == {("zz", "value", codes.BAD_PARAMETER),
                                               ("c", "nope", codes.BAD_PARAMETER)}


def test_missing_and_unsafe_files(registry, env) -> None:
    write_png(env.input_dir / "here.png")
    doc = workflow({
        "ok": {"type": "LoadImage", "inputs": {"image": "here.png"}},
        "missing": {"type": "LoadImage", "inputs": {"image": "absent.png"}},
        "escape": {"type": "LoadImage", "inputs": {"image": "../secret.png"}},
        "abs": {"type": "LoadImage", "inputs": {"image": "/etc/passwd"}},
        "save": {"type": "SaveImage", "inputs": {"images": link("ok", "image"), "filename_prefix": "../up"}},
    })
    assert set(problems(doc, registry, env)) == {
        ("missing", "image", codes.FILE_NOT_FOUND), ("escape", "image", codes.UNSAFE_PATH),
        ("abs", "image", codes.UNSAFE_PATH), ("save", "filename_prefix", codes.UNSAFE_PATH)}


@pytest.mark.parametrize("doc", [None, [], "text", 3, {"format": "ldmgraph/2", "nodes": {}},
                                 {"format": "ldmgraph/1"}, {"format": "ldmgraph/1", "nodes": []},
                                 {"format": "ldmgraph/1", "nodes": {"a": {"inputs": {}}}},
                                 {"format": "ldmgraph/1", "nodes": {}, "extra": 1}])
def test_malformed_documents_are_bad_document(registry, doc) -> None:
    assert {k[2] for k in problems(doc, registry)} <= {codes.BAD_DOCUMENT, codes.NO_OUTPUT_NODE}


def test_a_crashing_input_check_is_a_problem_not_a_crash(registry) -> None:
    from ldmgraph.graph import InputField, Node, NodeInputs, Registry
    from ldmgraph.graph.sockets import INT

    class Fragile(Node):
        """Its input check has a bug."""

        type_name = "TFragile"
        output_node = True

        class Inputs(NodeInputs):
            x: int = InputField(INT, 0)

        @classmethod
        def check_inputs(cls, literals, env):
            raise KeyError("oops")

    reg = Registry()
    reg.add_node(Fragile, "test")
    found = problems(workflow({"f": {"type": "TFragile", "inputs": {}}}), reg)
    assert list(found) == [("f", None, codes.CHECK_FAILED)] and "KeyError" in found[("f", None, codes.CHECK_FAILED)]
