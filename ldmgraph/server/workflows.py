"""Saved workflows: listed with a JSON Schema of their parameters, and drawn for the graph editor.

A saved workflow is an ``ldmgraph/1`` file in the workflows folder; its name is the file's stem.
Names come from the folder listing, never from a request: a request names a workflow, the server
looks it up in that listing.

The editor (ComfyUI's front end) reads LiteGraph's serialisation ("UI format", version 0.4):
``nodes`` with integer ids, positions, input slots (``link`` ids), output slots (``links``) and
positional ``widgets_values``, plus a ``links`` table ``[id, from_node, from_slot, to_node,
to_slot, type]``. :func:`to_ui` lays the graph out in columns by depth (longest path from a
source), so data flows left to right.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import networkx as nx

from ldmgraph.graph.node import InputSpec
from ldmgraph.graph.registry import Registry
from ldmgraph.graph.workflow import FORMAT

from .protocol import SEED_INPUTS, _is_required, served_name

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
COLUMN_WIDTH, NODE_WIDTH, ROW_GAP, SLOT_HEIGHT, TITLE_HEIGHT = 380, 320, 40, 24, 30
JSON_TYPES = {"INT": "integer", "FLOAT": "number", "STRING": "string", "BOOLEAN": "boolean", "ENUM": "string"}


def saved_workflows(folder: Path | None) -> dict[str, dict[str, Any]]:
    """Name -> document of every readable ``ldmgraph/1`` file in ``folder`` (others are skipped)."""
    found: dict[str, dict[str, Any]] = {}
    if folder is None or not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        if not NAME.match(path.stem):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("nodes"), dict):
            found[path.stem] = doc
    return found


def parameter_schema(doc: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """JSON Schema of a workflow's declared parameters (types, bounds, choices, defaults from the file)."""
    properties: dict[str, Any] = {}
    for name, parameter in (doc.get("parameters") or {}).items():
        target = (parameter.get("targets") or [{}])[0]
        node = doc["nodes"].get(target.get("node"), {})
        cls = registry.node(node.get("type", ""))
        spec = cls.spec.inputs.get(target.get("input", "")) if cls is not None else None
        schema = _input_schema(spec, registry) if spec is not None else {}
        if parameter.get("description"):
            schema["description"] = parameter["description"]
        current = (node.get("inputs") or {}).get(target.get("input"))
        if current is not None and not isinstance(current, dict):
            schema["default"] = current
        properties[name] = schema
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": properties, "additionalProperties": False}


def _input_schema(spec: InputSpec, registry: Registry) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    json_type = JSON_TYPES.get(spec.socket.name)
    if json_type:
        schema["type"] = json_type
    choices = spec.allowed_choices(registry)
    if choices is not None:
        schema["enum"] = choices
    if spec.ge is not None:
        schema["minimum"] = spec.ge
    if spec.le is not None:
        schema["maximum"] = spec.le
    if spec.multiple_of:
        schema["multipleOf"] = spec.multiple_of
    return schema


def summary(name: str, doc: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """What ``GET /api/workflows`` lists for one workflow."""
    metadata = doc.get("metadata") or {}
    return {"name": name, "description": metadata.get("description", ""), "nodes": len(doc["nodes"]),
            "parameters": parameter_schema(doc, registry), "ui": f"/api/userdata/workflows%2F{name}.json"}


# -- the editor's format ----------------------------------------------------------------------------
def to_ui(doc: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """An ``ldmgraph/1`` document in LiteGraph's serialisation, laid out left to right."""
    ids = {node_id: index for index, node_id in enumerate(doc["nodes"], 1)}
    links: list[list[Any]] = []
    ui_nodes = {node_id: _ui_node(node_id, entry, ids[node_id], registry) for node_id, entry in doc["nodes"].items()}
    for node_id, entry in doc["nodes"].items():
        target = ui_nodes[node_id]
        for name, value in (entry.get("inputs") or {}).items():
            if not (isinstance(value, dict) and set(value) == {"node", "output"}) or value["node"] not in ui_nodes:
                continue
            source = ui_nodes[value["node"]]
            out_slot = next((i for i, o in enumerate(source["outputs"]) if o["name"] == value["output"]), None)
            in_slot = next((i for i, s in enumerate(target["inputs"]) if s["name"] == name), None)
            if out_slot is None or in_slot is None:
                continue
            link_id = len(links) + 1
            kind = source["outputs"][out_slot]["type"]
            links.append([link_id, source["id"], out_slot, target["id"], in_slot, kind])
            source["outputs"][out_slot]["links"].append(link_id)
            target["inputs"][in_slot]["link"] = link_id
    _layout(doc, ui_nodes)
    return {"id": None, "revision": 0, "last_node_id": len(ids), "last_link_id": len(links),
            "nodes": list(ui_nodes.values()), "links": links, "groups": [], "config": {},
            "extra": {"ldmgraph": {"format": FORMAT, "node_ids": {str(v): k for k, v in ids.items()}}},
            "version": 0.4}


def _ui_node(node_id: str, entry: dict[str, Any], number: int, registry: Registry) -> dict[str, Any]:
    cls = registry.node(entry.get("type", ""))
    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    widgets: list[Any] = []
    given = entry.get("inputs") or {}
    if cls is not None:
        specs = sorted(cls.spec.inputs.values(), key=lambda s: not _is_required(s))
        for spec in specs:
            value = given.get(spec.name, spec.default)
            linked = isinstance(value, dict) and set(value) == {"node", "output"}
            if spec.socket.literal:
                widgets.append(None if linked else value)
                if spec.socket.name == "INT" and spec.name in SEED_INPUTS:
                    widgets.append("fixed")
                if linked:
                    inputs.append({"name": spec.name, "type": _ui_type(spec, registry), "link": None,
                                   "widget": {"name": spec.name}})
            else:
                inputs.append({"name": spec.name, "type": spec.socket.name, "link": None})
        outputs = [{"name": name, "type": o.socket.name, "links": [], "slot_index": i}
                   for i, (name, o) in enumerate(cls.spec.outputs.items())]
    height = TITLE_HEIGHT + SLOT_HEIGHT * (max(len(inputs), len(outputs)) + len(widgets))
    kind = served_name(entry.get("type", ""))  # the catalogue's name (ldmgraph.VAEDecode beside ComfyUI's)
    node: dict[str, Any] = {"id": number, "type": kind, "pos": [0, 0], "size": [NODE_WIDTH, height],
                            "flags": {}, "order": number - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                            "properties": {"Node name for S&R": kind}, "widgets_values": widgets,
                            "title": entry.get("title") or node_id}
    return node


def _ui_type(spec: InputSpec, registry: Registry) -> str:
    return "COMBO" if spec.allowed_choices(registry) is not None else spec.socket.name


def _layout(doc: dict[str, Any], ui_nodes: dict[str, dict[str, Any]]) -> None:
    """Columns by longest path from a source; within a column, rows in document order."""
    graph = nx.DiGraph()
    graph.add_nodes_from(doc["nodes"])
    for node_id, entry in doc["nodes"].items():
        for value in (entry.get("inputs") or {}).values():
            if isinstance(value, dict) and value.get("node") in doc["nodes"]:
                graph.add_edge(value["node"], node_id)
    depth: dict[str, int] = {}
    order = list(nx.topological_sort(graph)) if nx.is_directed_acyclic_graph(graph) else list(doc["nodes"])
    for node_id in order:
        depth[node_id] = max((depth.get(p, 0) + 1 for p in graph.predecessors(node_id)), default=0)
    next_y: dict[int, float] = {}
    for node_id in doc["nodes"]:
        column = depth.get(node_id, 0)
        y = next_y.get(column, 60.0)
        ui_nodes[node_id]["pos"] = [60 + column * COLUMN_WIDTH, y]
        next_y[column] = y + ui_nodes[node_id]["size"][1] + ROW_GAP + TITLE_HEIGHT
