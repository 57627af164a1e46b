"""Fuzzing: thousands of malformed workflow documents all end in our ValidationError.

Each generated document is a valid workflow broken by at least one mutation that makes it
invalid for sure (wrong shapes and types, huge numbers, unicode, deep nesting, cycles, links to
nowhere), or raw text/bytes; it goes through the same loader and validator as `ldmgraph run`.
"""

from __future__ import annotations

import json
from typing import Any

from graph_helpers import make_registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmgraph.graph import ValidationError
from ldmgraph.graph.loading import load_workflow_bytes
from ldmgraph.graph.validate import validate_workflow

REGISTRY = make_registry()
KNOWN_IDS = ("c", "a", "s")

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**200), max_value=2**200) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
non_int = json_values.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)))
non_dict = json_values.filter(lambda v: not isinstance(v, dict))
non_str = json_values.filter(lambda v: not isinstance(v, str))
new_id = st.text(min_size=1, max_size=12).filter(lambda s: s not in KNOWN_IDS)


def base() -> dict[str, Any]:
    return {"format": "ldmgraph/1", "nodes": {
        "c": {"type": "TConst", "inputs": {"value": 3}},
        "a": {"type": "TAdd", "inputs": {"a": {"node": "c", "output": "value"}, "b": 1}},
        "s": {"type": "TSink", "inputs": {"x": {"node": "a", "output": "value"}}},
    }}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc = base()
    nodes = doc["nodes"]
    kind = draw(st.integers(0, 15))
    if kind == 0:
        doc["format"] = draw(json_values.filter(lambda v: v != "ldmgraph/1"))
    elif kind == 1:
        doc["nodes"] = draw(non_dict)
    elif kind == 2:
        nodes[draw(st.sampled_from(KNOWN_IDS))] = draw(non_dict)
    elif kind == 3:
        nodes["c"]["type"] = draw(non_str)
    elif kind == 4:
        nodes["c"]["type"] = draw(st.text(max_size=30).filter(lambda t: t not in REGISTRY.nodes))
    elif kind == 5:
        nodes["c"]["inputs"]["value"] = draw(non_int | st.integers(min_value=1001) | st.integers(max_value=-1001))
    elif kind == 6:
        nodes["a"]["inputs"]["a"] = {"node": draw(new_id), "output": "value"}
    elif kind == 7:
        nodes["a"]["inputs"]["a"] = {"node": "c", "output": draw(st.text(max_size=10).filter(lambda t: t != "value"))}
    elif kind == 8:
        nodes["c"]["inputs"][draw(st.text(max_size=10).filter(lambda t: t != "value"))] = draw(json_values)
    elif kind == 9:
        nodes["c"]["inputs"] = {"value": {"node": "s", "output": "value"}}  # cycle through the sink
        nodes["c"]["type"] = "TAdd"
        nodes["c"]["inputs"] = {"a": {"node": "a", "output": "value"}}
    elif kind == 10:
        nodes["s"]["type"] = "TAdd"  # no output node left
        nodes["s"]["inputs"] = {"a": nodes["s"]["inputs"]["x"]}
    elif kind == 11:
        doc["parameters"] = {draw(st.text(max_size=10)): draw(json_values.filter(
            lambda v: not isinstance(v, dict) or "targets" not in v))}
    elif kind == 12:
        nodes["c"]["inputs"]["value"] = nested(draw(st.integers(1, 3000)))
    elif kind == 13:
        nodes[draw(new_id)] = {"type": draw(st.text(max_size=20).filter(lambda t: t not in REGISTRY.nodes)),
                               "inputs": draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3))}
    elif kind == 14:
        nodes["s"]["inputs"]["x"] = {"node": "a", "output": "value", draw(st.text(max_size=5)): 1}
    else:
        nodes["a"]["inputs"]["b"] = draw(st.sampled_from([10**400, -(10**400), 2**64, -(2**63) - 1, "∞", "1e999", 2.5]))
    # unicode decoration that must not matter for the verdict
    if draw(st.booleans()) and isinstance(doc.get("nodes"), dict):
        doc.setdefault("metadata", {})["note"] = draw(st.text(max_size=10))
    return doc


raw_documents = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


def to_bytes(doc: Any) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except RecursionError:
        return b"[" * 5000


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(mutated().map(to_bytes), raw_documents))
def test_malformed_documents_end_in_validation_error(data: bytes) -> None:
    try:
        loaded = load_workflow_bytes(data, "fuzz")
        validate_workflow(loaded.document, REGISTRY)
    except ValidationError as exc:
        assert exc.problems and all(p.code and p.message for p in exc.problems)
    else:
        raise AssertionError(f"accepted a malformed document: {data[:200]!r}")
