"""ComfyUI's reusable parts in the editor's UI format, flattened into one plain UI graph.

Two generations of them exist:

* subgraphs (editor 1.24 and later): ``definitions.subgraphs`` lists definitions, each with an
  ``id`` (a UUID that instance nodes use as their ``type``), ``inputs`` and ``outputs`` (slots, in
  order), ``nodes`` and ``links``. Links are objects ``{id, origin_id, origin_slot, target_id,
  target_slot, type}``; origin ``-10`` is the definition's input slot ``origin_slot``, target
  ``-20`` its output slot ``target_slot``. An instance's input slot with a ``widget`` shows a value
  on the instance (its ``widgets_values``, in the order of those slots) when nothing is linked.
  Definitions may contain instances of other definitions.
* group nodes (older): ``extra.groupNodes[name]`` holds ``nodes`` (in order; links name them by
  position), ``links`` ``[src, src_slot, dst, dst_slot, ...]`` and ``external`` ``[[node, slot,
  type]]`` (outputs also used outside). An instance has type ``workflow/<name>`` (or
  ``workflow>name``); its input slots are the inner nodes' unlinked link inputs in node order, then
  their unlinked converted widgets; its outputs the inner outputs not used only inside; its
  ``widgets_values`` the inner nodes' remaining widgets in node order.

The result is what the editor submits: every inner node becomes a node of the outer graph, its id
the instance's id, ``:`` and its own (``12:5``; nested ``12:5:3``), with links across the
boundaries joined and literal values fed in through PrimitiveNodes. The rest of the UI importer
then reads it as any UI graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ldmgraph.graph import codes
from ldmgraph.graph.errors import Problem, ValidationError
from ldmgraph.interop.comfyui_nodes import COMFYUI_NODES, SEED_CONTROL_VALUES

INPUT_NODE, OUTPUT_NODE = "-10", "-20"
SEPARATOR = ":"
GROUP_PREFIXES = ("workflow/", "workflow>")
MAX_DEPTH = 32
MAX_NODES = 100_000

Link = tuple[str, int, str, int, str]  # (source node, source slot, target node, target slot, type)


@dataclass
class _Definition:
    """A subgraph or group node in one form: inner nodes and links, ``-10``/``-20`` for its slots."""

    name: str
    nodes: list[dict[str, Any]]
    links: dict[int, Link]
    widget_targets: list[tuple[str, str]] = field(default_factory=list)  # group nodes: instance widgets


@dataclass(frozen=True)
class _Source:
    """What feeds an input: an output of a flattened node, or a literal."""

    node: str | None = None
    slot: int = 0
    kind: str = "*"
    value: Any = None


def has_parts(doc: dict[str, Any]) -> bool:
    """Whether a UI-format document holds subgraphs or group nodes."""
    definitions = doc.get("definitions")
    extra = doc.get("extra")
    return bool((isinstance(definitions, dict) and definitions.get("subgraphs"))
                or (isinstance(extra, dict) and extra.get("groupNodes")))


def flatten_parts(doc: dict[str, Any]) -> dict[str, Any]:
    """The UI document with every subgraph and group node instance replaced by its inner nodes."""
    definitions = {**_subgraph_definitions(doc), **_group_definitions(doc)}
    flattener = _Flattener(definitions)
    flattener.scope(list(doc.get("nodes") or []), _links(doc.get("links") or []), "", {}, ())
    if flattener.problems:
        raise ValidationError(flattener.problems)
    return {**doc, "nodes": flattener.nodes, "links": [[i, *link] for i, link in flattener.links.items()],
            "definitions": {}, "extra": {**(doc.get("extra") or {}), "groupNodes": {}}}


# -- reading definitions ------------------------------------------------------------------------------
def _links(raw: list[Any]) -> dict[int, Link]:
    table: dict[int, Link] = {}
    for link in raw:
        if isinstance(link, dict):
            fields = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")]
            fields.append(link.get("type", "*"))
        elif isinstance(link, list) and len(link) >= 5:
            fields = [*link[:5], link[5] if len(link) > 5 else "*"]
        else:
            continue
        link_id, src, src_slot, dst, dst_slot, kind = fields
        table[int(link_id)] = (str(src), int(src_slot), str(dst), int(dst_slot), str(kind))
    return table


def _subgraph_definitions(doc: dict[str, Any]) -> dict[str, _Definition]:
    raw = (doc.get("definitions") or {}).get("subgraphs") or []
    return {str(sg["id"]): _Definition(str(sg.get("name") or sg["id"]), list(sg.get("nodes") or []),
                                       _links(sg.get("links") or []))
            for sg in raw if isinstance(sg, dict) and "id" in sg}


def _group_definitions(doc: dict[str, Any]) -> dict[str, _Definition]:
    groups = (doc.get("extra") or {}).get("groupNodes") or {}
    found: dict[str, _Definition] = {}
    for name, group in groups.items():
        if isinstance(group, dict):
            definition = _group_definition(str(name), group)
            for prefix in GROUP_PREFIXES:
                found[prefix + str(name)] = definition
    return found


def _group_definition(name: str, group: dict[str, Any]) -> _Definition:
    """A group node in the subgraph form: its implicit input and output slots made explicit."""
    nodes = [copy.deepcopy(n) for n in group.get("nodes") or []]
    for index, node in enumerate(nodes):
        node["id"] = index
        for slot in node.get("inputs") or []:
            slot["link"] = None
    links: dict[int, Link] = {}
    internal_out: set[tuple[int, int]] = set()
    for raw in group.get("links") or []:
        src, src_slot, dst, dst_slot = (int(v) for v in raw[:4])
        link_id = len(links) + 1
        links[link_id] = (str(src), src_slot, str(dst), dst_slot, str(raw[5]) if len(raw) > 5 else "*")
        nodes[dst]["inputs"][dst_slot]["link"] = link_id
        internal_out.add((src, src_slot))
    external = {(int(e[0]), int(e[1])) for e in group.get("external") or []}
    converted: list[tuple[int, int, dict[str, Any]]] = []
    slot_number = 0
    for index, node in enumerate(nodes):  # the instance's input slots: unlinked inputs, widgets last
        for position, slot in enumerate(node.get("inputs") or []):
            if slot.get("link") is not None:
                continue
            if slot.get("widget"):
                converted.append((index, position, slot))
                continue
            slot_number = _boundary_input(links, nodes, index, position, slot, slot_number)
    for index, position, slot in converted:
        slot_number = _boundary_input(links, nodes, index, position, slot, slot_number)
    outputs = 0
    for index, node in enumerate(nodes):
        for position, out in enumerate(node.get("outputs") or []):
            if (index, position) in internal_out and (index, position) not in external:
                continue
            links[len(links) + 1] = (str(index), position, OUTPUT_NODE, outputs, str(out.get("type", "*")))
            outputs += 1
    targets = [(str(index), widget) for index, node in enumerate(nodes) for widget in _free_widgets(node)]
    return _Definition(name, nodes, links, targets)


def _boundary_input(links: dict[int, Link], nodes: list[dict[str, Any]], index: int, position: int,
                    slot: dict[str, Any], number: int) -> int:
    link_id = len(links) + 1
    links[link_id] = (INPUT_NODE, number, str(index), position, str(slot.get("type", "*")))
    nodes[index]["inputs"][position]["link"] = link_id
    return number + 1


def _free_widgets(node: dict[str, Any]) -> list[str]:
    """The widgets a group node instance shows for an inner node: those not turned into inputs."""
    mapping = COMFYUI_NODES.get(str(node.get("type")))
    if node.get("type") == "PrimitiveNode":
        return ["value"]
    converted = {slot["widget"]["name"] for slot in node.get("inputs") or [] if isinstance(slot.get("widget"), dict)}
    return [w for w in (mapping.widgets if mapping else ()) if w not in converted]


# -- flattening -----------------------------------------------------------------------------------------
class _Flattener:
    def __init__(self, definitions: dict[str, _Definition]) -> None:
        self.definitions = definitions
        self.nodes: list[dict[str, Any]] = []
        self.links: dict[int, Link] = {}
        self.problems: list[Problem] = []

    def scope(self, nodes: list[dict[str, Any]], links: dict[int, Link], prefix: str,
              inputs: dict[int, _Source | None], stack: tuple[str, ...]) -> dict[int, _Source | None]:
        """Flatten one graph level; ``inputs`` feed its ``-10`` slots. Returns what feeds its ``-20`` slots."""
        by_id = {str(n.get("id")): n for n in nodes if isinstance(n, dict)}
        expanded: dict[str, dict[int, _Source | None]] = {}

        def source(src: str, slot: int, kind: str) -> _Source | None:
            if src == INPUT_NODE:
                return inputs.get(slot)
            node = by_id.get(src)
            if node is None:
                return None
            if str(node.get("type")) in self.definitions:
                if src not in expanded:
                    expanded[src] = {}  # guards a link loop through this instance
                    expanded[src] = self.instance(node, links, prefix, source, stack)
                return expanded[src].get(slot)
            return _Source(prefix + src, slot, kind)

        for node_id, node in by_id.items():
            if str(node.get("type")) in self.definitions:
                if node_id not in expanded:
                    expanded[node_id] = {}
                    expanded[node_id] = self.instance(node, links, prefix, source, stack)
                continue
            self.copy(node, prefix, links, source)
        return {slot: source(src, src_slot, kind)
                for src, src_slot, dst, slot, kind in links.values() if dst == OUTPUT_NODE}

    def copy(self, node: dict[str, Any], prefix: str, links: dict[int, Link], source: Any) -> None:
        if len(self.nodes) >= MAX_NODES:
            if not self.problems:
                self.problems.append(Problem(None, None, codes.OVER_BUDGET,
                                             f"more than {MAX_NODES} nodes once the subgraphs are expanded"))
            return
        flat = copy.deepcopy(node)
        flat["id"] = prefix + str(node.get("id"))
        self.nodes.append(flat)
        for index, slot in enumerate(flat.get("inputs") or []):
            link = links.get(int(slot["link"])) if isinstance(slot.get("link"), int) else None
            fed = source(link[0], link[1], link[4]) if link is not None else None
            slot["link"] = self.connect(fed, flat["id"], index, slot)

    def connect(self, fed: _Source | None, node_id: str, index: int, slot: dict[str, Any]) -> int | None:
        """A new link from ``fed`` into input ``index`` of ``node_id`` (a literal through a PrimitiveNode)."""
        if fed is None:
            return None
        link_id = len(self.links) + 1
        source_id = fed.node
        if source_id is None:
            source_id = f"{node_id}{SEPARATOR}{slot.get('name', index)}"
            self.nodes.append({"id": source_id, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                               "outputs": [{"name": "value", "type": slot.get("type", "*"), "links": [link_id]}],
                               "widgets_values": [fed.value]})
        self.links[link_id] = (source_id, fed.slot, node_id, index, fed.kind)
        return link_id

    def instance(self, node: dict[str, Any], links: dict[int, Link], prefix: str, source: Any,
                 stack: tuple[str, ...]) -> dict[int, _Source | None]:
        """Flatten one instance; returns what feeds each of its output slots."""
        kind = str(node.get("type"))
        definition = self.definitions[kind]
        flat_id = prefix + str(node.get("id"))
        if kind in stack or len(stack) >= MAX_DEPTH:
            why = "contains itself" if kind in stack else f"is nested more than {MAX_DEPTH} deep"
            self.problems.append(Problem(flat_id, None, codes.CYCLE if kind in stack else codes.TOO_DEEP,
                                         f"ComfyUI subgraph {definition.name!r} {why}"))
            return {}
        if node.get("mode", 0) == 2:  # muted: nothing inside runs, nothing comes out
            return {}
        fed: dict[int, _Source | None] = {}
        values = _instance_widget_values(node)
        for index, slot in enumerate(node.get("inputs") or []):
            link = links.get(int(slot["link"])) if isinstance(slot.get("link"), int) else None
            if link is not None:
                fed[index] = source(link[0], link[1], link[4])
            elif slot.get("widget") and not definition.widget_targets:
                name = slot["widget"].get("name", slot.get("name"))
                value = values.pop(name) if isinstance(values, dict) and name in values else _next_value(values)
                fed[index] = None if value is _NONE else _Source(value=value)
        inner = definition.nodes
        if definition.widget_targets:
            inner = _with_widget_values(inner, definition.widget_targets, values)
        return self.scope(inner, definition.links, flat_id + SEPARATOR, fed, (*stack, kind))


_NONE = object()


def _instance_widget_values(node: dict[str, Any]) -> Any:
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return dict(values)
    return list(values or [])


def _next_value(values: Any) -> Any:
    """The next positional widget value, skipping the seed's "control after generate" companion."""
    if not isinstance(values, list) or not values:
        return _NONE
    value = values.pop(0)
    if values and isinstance(value, int) and values[0] in SEED_CONTROL_VALUES:
        values.pop(0)
    return value


def _with_widget_values(nodes: list[dict[str, Any]], targets: list[tuple[str, str]], values: Any) -> list[Any]:
    """A group node's inner nodes with the instance's widget values written into them (by name)."""
    from ldmgraph.interop.comfyui import widget_values_by_name

    nodes = copy.deepcopy(nodes)
    by_id = {str(n["id"]): n for n in nodes}
    named = {str(n["id"]): widget_values_by_name(n) for n in nodes}
    for node_id, widget in targets:
        value = values.pop(widget) if isinstance(values, dict) and widget in values else _next_value(values)
        if value is not _NONE:
            named[node_id][widget] = value
    for node_id, node in by_id.items():
        if node.get("type") == "PrimitiveNode":
            node["widgets_values"] = [named[node_id].get("value", (node.get("widgets_values") or [None])[0])]
        else:
            node["widgets_values"] = named[node_id]
    return nodes
