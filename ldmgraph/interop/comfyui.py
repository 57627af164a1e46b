"""ComfyUI graph import: API format and UI format -> an ldmgraph workflow (`ldmgraph/1`).

Two formats exist:

* the API format ("prompt"): `{id: {"class_type", "inputs"}}`, a link is `[source_id, output_index]`,
  a literal list is wrapped as `{"__value__": [...]}`;
* the UI format saved by the editor: `nodes` with positional `widgets_values`, a `links` table
  `[link_id, src_node, src_slot, dst_node, dst_slot, type]`, editor-only nodes (Reroute, PrimitiveNode,
  Note) and node modes (0 normal, 2 muted, 4 bypassed).

The UI format is first flattened to the API format, as ComfyUI's editor does before it queues a graph
(Reroutes followed, Primitives turned into literals, muted nodes dropped, bypassed nodes replaced by
their input of the same type); then one API-format converter maps classes, input names and output
indices through `comfyui_nodes.COMFYUI_NODES`. Every unsupported node is reported at once, by id and
class, as one `ValidationError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from ldmgraph.graph import codes
from ldmgraph.graph.errors import Problem, ValidationError
from ldmgraph.interop.comfyui_nodes import (
    COMFYUI_NODES,
    EDITOR_ONLY_CLASSES,
    PASS_THROUGH_CLASSES,
    SEED_CONTROL_VALUES,
    VAE_SOURCES,
    NodeMapping,
    native_mapping,
    served_name,
)
from ldmgraph.interop.comfyui_subgraphs import flatten_parts, has_parts

MUTED, BYPASSED = 2, 4

__all__ = ["to_workflow", "ui_to_api", "api_to_workflow"]


def to_workflow(doc: dict[str, Any]) -> dict[str, Any]:
    """Convert a ComfyUI graph (API or UI format, or `{"prompt": ...}` from a PNG) to our format.

    Raises `ValidationError` listing every node that has no counterpart here (code
    `unknown_node_type`, with the node id and ComfyUI class), or a malformed document.
    """
    if not isinstance(doc, dict):
        raise ValidationError([_problem(None, codes.BAD_DOCUMENT, "a ComfyUI graph is a JSON object")])
    if isinstance(doc.get("prompt"), dict):
        doc = doc["prompt"]
    api = ui_to_api(doc) if _is_ui_format(doc) else doc
    unknown = {str(n.get("class_type")) for n in api.values() if isinstance(n, dict)}
    unknown -= set(COMFYUI_NODES) | PASS_THROUGH_CLASSES
    natives = {k: m for k in unknown if (m := _native_mappings().get(k)) is not None}
    return api_to_workflow(api, {**natives, **COMFYUI_NODES} if natives else None)


# ---------------------------------------------------------------------------------------------
# UI format -> API format


def _is_ui_format(doc: dict[str, Any]) -> bool:
    return isinstance(doc.get("nodes"), list) and "links" in doc


def _link_table(doc: dict[str, Any]) -> dict[int, tuple[str, int, str, int, str]]:
    """link id -> (src node, src slot, dst node, dst slot, type); both the 0.4 and 1.0 schemas."""
    table: dict[int, tuple[str, int, str, int, str]] = {}
    for link in doc.get("links") or []:
        if isinstance(link, dict):
            fields = (
                link.get("id"),
                link.get("origin_id"),
                link.get("origin_slot"),
                link.get("target_id"),
                link.get("target_slot"),
                link.get("type", "*"),
            )
        else:
            fields = tuple(link) + ("*",) * (6 - len(link))
        link_id, src, src_slot, dst, dst_slot, kind = fields[:6]
        table[int(link_id)] = (str(src), int(src_slot), str(dst), int(dst_slot), str(kind))
    return table


def _widget_inputs(node: dict[str, Any], widgets: tuple[str, ...], seeds: frozenset[str]) -> dict[str, Any]:
    """Name the positional `widgets_values`, skipping the value the editor stores after a seed."""
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some editor versions store widgets by name
        return {k: v for k, v in values.items() if k in widgets}
    named: dict[str, Any] = {}
    position = 0
    values = list(values or [])
    for name in widgets:
        if position >= len(values):
            break
        named[name] = values[position]
        position += 1
        if name in seeds and position < len(values) and values[position] in SEED_CONTROL_VALUES:
            position += 1
    return named


_CLIP_SET_LAST_LAYER = NodeMapping("", {}, ("clip",), ("stop_at_clip_layer",))


def _mapping(kind: str) -> NodeMapping | None:
    """The table's entry for a class, else ldmgraph's own node type of that name (the editor lists
    both, so a graph saved from it may use both)."""
    found = COMFYUI_NODES.get(kind) or (_CLIP_SET_LAST_LAYER if kind in PASS_THROUGH_CLASSES else None)
    return found if found is not None or kind in EDITOR_ONLY_CLASSES else _native_mappings().get(kind)


@lru_cache(maxsize=1)
def _native_mappings() -> dict[str, NodeMapping]:
    """ldmgraph's node types (built-ins and installed plugins) by their editor names and their own,
    each mapped to itself; loaded only when a graph names a class the table does not have."""
    from ldmgraph.plugins import load_registry

    mappings: dict[str, NodeMapping] = {}
    for name, cls in load_registry().nodes.items():
        mapping = native_mapping(cls.spec)
        mappings[served_name(name)] = mapping
        if name not in COMFYUI_NODES and name not in PASS_THROUGH_CLASSES:
            mappings[name] = mapping
    return mappings


def widget_values_by_name(node: dict[str, Any]) -> dict[str, Any]:
    """A UI node's widget values by widget name (empty for a class the table does not know)."""
    kind = node.get("type", "")
    mapping = _mapping(kind)
    return _widget_inputs(node, mapping.widgets, mapping.seed_widgets) if mapping is not None else {}


def ui_to_api(doc: dict[str, Any]) -> dict[str, Any]:
    """Flatten the editor's UI format into the API format, as the editor does before queueing.

    Subgraphs (``definitions.subgraphs``) and group nodes (``extra.groupNodes``) are expanded first,
    into nodes with ids such as ``12:5`` (instance 12, inner node 5), as the editor submits them.
    """
    if has_parts(doc):
        doc = flatten_parts(doc)
    nodes = {str(n["id"]): n for n in doc["nodes"] if isinstance(n, dict) and "id" in n}
    links = _link_table(doc)
    api: dict[str, Any] = {}
    for node_id, node in nodes.items():
        kind = node.get("type", "")
        if kind in EDITOR_ONLY_CLASSES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        mapping = _mapping(kind)
        inputs: dict[str, Any] = {}
        if mapping is not None:
            inputs.update(_widget_inputs(node, mapping.widgets, mapping.seed_widgets))
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            source = _resolve_link(int(slot["link"]), nodes, links, set())
            if source is not None:
                inputs[slot["name"]] = source
        entry: dict[str, Any] = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[node_id] = entry
    return api


def _resolve_link(
    link_id: int,
    nodes: dict[str, dict[str, Any]],
    links: dict[int, tuple[str, int, str, int, str]],
    seen: set[int],
) -> Any:
    """What a UI link carries in API terms: `[node, slot]`, a literal (Primitive), or None (muted)."""
    if link_id in seen or link_id not in links:
        return None
    seen.add(link_id)
    src_id, src_slot, _dst, _slot, kind = links[link_id]
    src = nodes.get(src_id)
    if src is None:
        return None
    src_type = src.get("type")
    if src_type == "PrimitiveNode":
        values = src.get("widgets_values") or [None]
        return {"__value__": values[0]} if isinstance(values[0], list) else values[0]
    if src_type == "Reroute":
        upstream = (src.get("inputs") or [{}])[0].get("link")
        return None if upstream is None else _resolve_link(int(upstream), nodes, links, seen)
    mode = src.get("mode", 0)
    if mode == MUTED:
        return None
    if mode == BYPASSED:
        outputs = src.get("outputs") or []
        out_type = outputs[src_slot].get("type", kind) if src_slot < len(outputs) else kind
        for slot in src.get("inputs") or []:
            if slot.get("type") == out_type and slot.get("link") is not None:
                return _resolve_link(int(slot["link"]), nodes, links, seen)
        return None
    return [src_id, src_slot]


# ---------------------------------------------------------------------------------------------
# API format -> ldmgraph/1


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _problem(node_id: str | None, code: str, message: str, input_name: str | None = None) -> Problem:
    return Problem(node_id=node_id, input=input_name, code=code, message=message)


def api_to_workflow(api: dict[str, Any], classes: Mapping[str, NodeMapping] | None = None) -> dict[str, Any]:
    """Map an API-format graph onto our nodes; all unsupported nodes are reported together.

    `classes` replaces the table (the server adds ldmgraph's own node types, mapped to themselves, so
    a graph that mixes them with ComfyUI's classes in the editor converts in one pass)."""
    classes = COMFYUI_NODES if classes is None else classes
    problems = _check_classes(api, classes)
    if problems:
        raise ValidationError(problems)
    vae_link = _vae_source(api)
    nodes: dict[str, Any] = {}
    for node_id, node in api.items():
        kind = node["class_type"]
        if kind in PASS_THROUGH_CLASSES:
            continue
        mapping = classes[kind]
        inputs = dict(mapping.extra)
        for name, value in (node.get("inputs") or {}).items():
            if name not in mapping.inputs:
                continue  # editor-only widgets such as LoadImage's "upload" button
            our_name = mapping.inputs[name]
            if _is_link(value):
                link, clip_skip = _follow_pass_through(api, value)
                if clip_skip is not None and kind == "CLIPTextEncode":
                    inputs["clip_skip"] = clip_skip
                inputs[our_name] = _our_link(api, link, node_id, our_name, problems, classes)
            else:
                if isinstance(value, dict) and "__value__" in value:
                    value = value["__value__"]
                inputs[our_name] = mapping.convert.get(name, lambda v: v)(value)
        if mapping.wants_vae_geometry and vae_link is not None and "vae" not in inputs:
            inputs["vae"] = vae_link
        entry: dict[str, Any] = {"type": mapping.our_type, "inputs": inputs}
        title = (node.get("_meta") or {}).get("title")
        if title:
            entry["title"] = title
        nodes[str(node_id)] = entry
    if problems:
        raise ValidationError(problems)
    return {"format": "ldmgraph/1", "nodes": nodes, "parameters": _parameters(nodes)}


def _check_classes(api: Any, classes: Mapping[str, NodeMapping]) -> list[Problem]:
    if not isinstance(api, dict) or not api:
        return [_problem(None, codes.BAD_DOCUMENT, "not a ComfyUI graph: expected API or UI format")]
    problems = []
    for node_id, node in api.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind in classes or kind in PASS_THROUGH_CLASSES:
            continue
        problems.append(
            _problem(
                str(node_id),
                codes.UNKNOWN_NODE_TYPE,
                f"ComfyUI node {node_id} of class {kind!r} has no ldmgraph counterpart; supported: "
                + ", ".join(sorted(COMFYUI_NODES) + sorted(PASS_THROUGH_CLASSES)),
            )
        )
    return problems


def _follow_pass_through(api: dict[str, Any], link: list[Any]) -> tuple[list[Any], int | None]:
    """Skip CLIPSetLastLayer nodes; the one nearest the consumer sets the clip skip (-layer)."""
    clip_skip: int | None = None
    seen: set[str] = set()
    while str(link[0]) in api and api[str(link[0])]["class_type"] in PASS_THROUGH_CLASSES:
        source = api[str(link[0])]
        if str(link[0]) in seen:
            break
        seen.add(str(link[0]))
        layer = source["inputs"].get("stop_at_clip_layer", -1)
        if clip_skip is None and isinstance(layer, int):
            clip_skip = -layer
        link = source["inputs"].get("clip", link)
        if not _is_link(link):
            break
    return link, clip_skip


def _our_link(
    api: dict[str, Any],
    link: list[Any],
    node_id: str,
    input_name: str,
    problems: list[Problem],
    classes: Mapping[str, NodeMapping],
) -> dict[str, str] | None:
    src_id, index = str(link[0]), int(link[1])
    source = api.get(src_id)
    if source is None or source["class_type"] not in classes:
        problems.append(
            _problem(
                node_id, codes.DANGLING_LINK, f"links to node {src_id}, which is not in the graph", input_name
            )
        )
        return None
    outputs = classes[source["class_type"]].outputs
    if not 0 <= index < len(outputs):
        problems.append(
            _problem(
                node_id,
                codes.UNKNOWN_OUTPUT,
                f"links to output {index} of node {src_id} ({source['class_type']}), which has {len(outputs)}",
                input_name,
            )
        )
        return None
    return {"node": src_id, "output": outputs[index]}


def _vae_source(api: dict[str, Any]) -> dict[str, str] | None:
    """The VAE whose downscale factor sizes imported empty latents (ComfyUI assumes 8)."""
    for kind in VAE_SOURCES:
        for node_id, node in api.items():
            if node.get("class_type") == kind:
                return {"node": str(node_id), "output": "vae"}
    return None


def _parameters(nodes: dict[str, Any]) -> dict[str, Any]:
    """Declare seed, steps and prompts so `--set seed=N` works on an imported graph too."""
    samplers = [i for i, n in nodes.items() if n["type"] in ("Sampler", "SamplerAdvanced")]
    params: dict[str, Any] = {}
    for name, description in (("seed", "noise seed"), ("steps", "sampling steps"), ("cfg", "guidance scale")):
        targets = [
            {"node": i, "input": name} for i in samplers if not isinstance(nodes[i]["inputs"].get(name), dict)
        ]
        if targets and name in nodes[samplers[0]]["inputs"]:
            params[name] = {"targets": targets, "description": f"{description} of every sampler"}
    for name, socket in (("prompt", "positive"), ("negative_prompt", "negative")):
        encoders = _text_sources(nodes, samplers, socket)
        if len(encoders) == 1:
            params[name] = {
                "targets": [{"node": encoders[0], "input": "text"}],
                "description": f"{socket} prompt",
            }
    return params


def _text_sources(nodes: dict[str, Any], samplers: list[str], socket: str) -> list[str]:
    """TextEncode nodes with a literal text feeding `socket` of a sampler (directly or via inpainting)."""
    found: list[str] = []
    for sampler_id in samplers:
        link = nodes[sampler_id]["inputs"].get(socket)
        while isinstance(link, dict) and link.get("node") in nodes:
            source = nodes[link["node"]]
            if source["type"] == "TextEncode" and isinstance(source["inputs"].get("text"), str):
                if link["node"] not in found:
                    found.append(link["node"])
                break
            link = source["inputs"].get(socket) if source["type"] == "InpaintConditioning" else None
    return found
