"""Workflows as nodes: a workflow that declares outputs is a node type ``workflow/<stem>``.

A component is an ordinary ``ldmgraph/1`` file with ``"outputs": {name: {"node", "output"}}``
beside its ``parameters``. Its parameters are the node's inputs (linkable as well as literal; the
type, default, bounds and choices come from the inner input each one targets first) and its
declared outputs are the node's outputs. Components are registered as ordinary node types, so
listings, the JSON catalogue and the editor's node library show them like any other node.

Nothing runs a component node: validation first expands every instance into its inner nodes,
whose ids are the instance's id, a dot and the inner id (``hires.sampler``), recursively. So every
problem names its path through the nesting, caching works per inner node, two instances share
only what is identical, and a component that (through others) contains itself is refused with
the files on the cycle named.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from . import codes
from .context import NodeContext
from .errors import LdmGraphError, PluginError, Problem
from .files import read_regular_file
from .node import Node, NodeSpec, OutputSpec
from .registry import PluginStatus, Registry
from .workflow import (
    FORMAT,
    Link,
    NodeEntry,
    Parameter,
    ParameterTarget,
    Workflow,
    decode_json,
    parse_workflow,
)

PREFIX = "workflow/"
SEPARATOR = "."
CATEGORY = "workflows"
STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
MAX_COMPONENT_BYTES = 16 * 1024 * 1024
MAX_NESTING = 32
MAX_EXPANDED_NODES = 200_000
SUBFOLDER = "components"  # a workflow folder's components may also live in this subfolder


@dataclass(frozen=True)
class Component:
    """One component: its node type name, the file it came from, and its workflow."""

    type_name: str
    source: str
    workflow: Workflow
    problem: str | None = None  # why it cannot be used (a cycle, a parameter with no target)


class ComponentNode(Node):
    """Base of the node types made from workflows; validation expands them, so none ever runs."""

    estimate_rule = "expanded"  # validation replaces it by its nodes before estimates are made

    component: ClassVar[Component]

    def run(self, inputs: Any, ctx: NodeContext) -> None:
        raise LdmGraphError(f"{self.type_name} is a workflow component: validation expands it, it never runs")


def is_component(cls: type[Node] | None) -> bool:
    """Whether a registered node type is a workflow component."""
    return cls is not None and issubclass(cls, ComponentNode)


def component_file_stem(type_name: str) -> str:
    """``workflow/upscale_pass`` -> ``upscale_pass``."""
    return type_name[len(PREFIX):]


# -- building node types ------------------------------------------------------------------------------
def component_spec(type_name: str, workflow: Workflow, registry: Registry) -> NodeSpec:
    """The node declaration of a component: its parameters as inputs, its declared outputs as outputs.

    Raises ``ValueError`` naming the parameter or output that points nowhere.
    """
    inputs = {}
    for name, parameter in workflow.parameters.items():
        target = parameter.targets[0]
        entry = workflow.nodes.get(target.node)
        cls = registry.node(entry.type) if entry is not None else None
        spec = cls.spec.inputs.get(target.input) if cls is not None else None
        if spec is None:
            raise ValueError(f"parameter {name!r} targets {target.node}.{target.input}, which is not an input of "
                             "a known node in the file")
        given = entry.inputs.get(target.input) if entry is not None else None
        linked = isinstance(given, Link)
        has_value = entry is not None and target.input in entry.inputs
        inputs[name] = replace(
            spec, name=name, required=spec.required and not has_value,
            default=None if linked else (given if has_value else spec.default),
            description=parameter.description or spec.description)
    declared = workflow.outputs if isinstance(workflow.outputs, dict) else {}
    outputs = {}
    for name, link in declared.items():
        entry = workflow.nodes.get(link.node)
        cls = registry.node(entry.type) if entry is not None else None
        out = cls.spec.outputs.get(link.output) if cls is not None else None
        if out is None:
            raise ValueError(f"output {name!r} names {link.node}.{link.output}, which is not an output of a known "
                             "node in the file")
        outputs[name] = OutputSpec(name, out.socket, out.description)
    metadata = workflow.metadata
    description = metadata.get("description") if isinstance(metadata.get("description"), str) else ""
    output_node = any((c := registry.node(e.type)) is not None and c.output_node for e in workflow.nodes.values())
    return NodeSpec(type_name=type_name, version=_version(metadata), category=CATEGORY,
                    description=description or f"the workflow {component_file_stem(type_name)} as one node",
                    deterministic=True, output_node=output_node, inputs=inputs, outputs=outputs)


def _version(metadata: dict[str, Any]) -> str:
    version = metadata.get("version")
    return version if isinstance(version, str) and re.match(r"^\d+\.\d+\.\d+$", version) else "1.0.0"


def component_node(component: Component, spec: NodeSpec) -> type[ComponentNode]:
    """A node class for ``component`` (registered like any other node type)."""
    cls: type[ComponentNode] = type(f"Component_{component.type_name}", (ComponentNode,),
                                    {"component": component, "category": CATEGORY,
                                     "description": spec.description, "__module__": __name__})
    cls.type_name = component.type_name
    cls.spec = spec
    return cls


# -- reading folders ----------------------------------------------------------------------------------
def component_files(folder: Path) -> list[Path]:
    """The JSON files of a workflow folder and of its ``components/`` subfolder, sorted."""
    found: list[Path] = []
    for where in (folder, folder / SUBFOLDER):
        if where.is_dir():
            found += sorted(p for p in where.glob("*.json") if STEM.match(p.stem) and p.is_file())
    return found


def read_component(path: Path) -> Workflow | None:
    """The workflow in ``path`` if it declares outputs (a component), else None; raises
    ``ValidationError`` or ``OSError`` for a file that cannot be read as a workflow."""
    doc = decode_json(read_regular_file(path, MAX_COMPONENT_BYTES).decode("utf-8-sig"), str(path))
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("outputs"), dict)):
        return None
    return parse_workflow(doc)


def register_components(registry: Registry, sources: Sequence[tuple[str, Path]]) -> list[PluginStatus]:
    """Register every component found in ``sources`` (``(owner, folder)`` pairs, earliest first:
    a stem found twice is taken from the first folder, the other file is reported).

    Returns one status per folder (as ``ldmgraph plugins`` shows plugins): the node types it
    registered, and what was wrong with the files it could not use.
    """
    statuses: dict[str, PluginStatus] = {}
    found: dict[str, tuple[str, Path, Workflow]] = {}
    seen_paths: set[Path] = set()
    for owner, folder in sources:
        status = statuses.setdefault(owner, PluginStatus(name=owner, source="workflows", ok=True))
        for path in component_files(folder):
            if path.resolve() in seen_paths:
                continue
            seen_paths.add(path.resolve())
            type_name = PREFIX + path.stem
            if type_name in registry.nodes and type_name not in found:
                continue  # registered earlier (a second call): the first definition stays
            try:
                workflow = read_component(path)
            except (LdmGraphError, OSError, UnicodeDecodeError) as exc:
                _fail(status, f"{path}: {str(exc).splitlines()[-1].strip()}")
                continue
            if workflow is None:
                continue
            if type_name in found:
                _fail(status, f"{path}: {type_name} is already defined by {found[type_name][1]}; rename one")
                continue
            found[type_name] = (owner, path, workflow)
    _Builder(registry, found, statuses).build_all()
    return list(statuses.values())


def _fail(status: PluginStatus, message: str) -> None:
    status.ok = False
    status.error = message if status.error is None else f"{status.error}; {message}"


class _Builder:
    """Registers components in dependency order (a component's spec needs the specs of the
    components inside it), marking the members of a cycle as unusable."""

    def __init__(self, registry: Registry, found: dict[str, tuple[str, Path, Workflow]],
                 statuses: dict[str, PluginStatus]) -> None:
        self.registry, self.found, self.statuses = registry, found, statuses
        self.done: set[str] = set()
        self.broken: dict[str, str] = {}

    def build_all(self) -> None:
        for type_name in self.found:
            self.build(type_name, [])

    def build(self, type_name: str, stack: list[str]) -> None:
        if type_name in self.done:
            return
        if type_name in stack:
            cycle = stack[stack.index(type_name):] + [type_name]
            files = " -> ".join(self.found[t][1].name for t in cycle)
            for member in cycle[:-1]:
                self.broken.setdefault(member, f"workflow files form a cycle: {files}; a component cannot contain "
                                       "itself, remove one of these nodes")
            return
        stack.append(type_name)
        for entry in self.found[type_name][2].nodes.values():
            if entry.type in self.found:
                self.build(entry.type, stack)
        stack.pop()
        if type_name not in self.done:
            self.register(type_name)

    def register(self, type_name: str) -> None:
        self.done.add(type_name)
        owner, path, workflow = self.found[type_name]
        problem = self.broken.get(type_name)
        spec = NodeSpec(type_name, "1.0.0", CATEGORY, f"unusable: {problem}", True, False)
        if problem is None:
            try:
                spec = component_spec(type_name, workflow, self.registry)
            except ValueError as exc:
                problem = f"{path}: {exc}"
                spec = NodeSpec(type_name, "1.0.0", CATEGORY, f"unusable: {problem}", True, False)
        status = self.statuses[owner]
        if problem is not None:
            _fail(status, problem if str(path) in problem else f"{path}: {problem}")
        try:
            self.registry.add_node(component_node(Component(type_name, str(path), workflow, problem), spec), owner)
        except PluginError as exc:
            _fail(status, f"{path}: {exc}")
            return
        status.nodes.append(type_name)


# -- expansion ------------------------------------------------------------------------------------------
def uses_components(workflow: Workflow, registry: Registry) -> bool:
    """Whether any node of ``workflow`` is a component instance."""
    return any(is_component(registry.node(entry.type)) for entry in workflow.nodes.values())


def expand_components(workflow: Workflow, registry: Registry) -> tuple[Workflow, list[Problem]]:
    """The workflow with every component instance replaced by its inner nodes, recursively.

    Inner ids are ``<instance id>.<inner id>``; links to an instance's outputs go to the inner
    nodes that produce them; the workflow's parameters that target an instance's inputs target
    the inner inputs those feed. Problems found on the way (an unknown component input or output,
    a cycle, nesting too deep) come back with the expanded workflow, for validation to report.
    """
    if not uses_components(workflow, registry):
        return workflow, []
    expander = _Expander(registry)
    own = {nid: entry.model_copy(update={"inputs": dict(entry.inputs)}) for nid, entry in workflow.nodes.items()}
    nodes = expander.inline(own, (), 0)
    nodes = expander.resolve_links(nodes)
    parameters = {name: expander.retarget(name, param) for name, param in workflow.parameters.items()}
    outputs: Any = workflow.outputs
    if isinstance(outputs, dict):
        outputs = {name: expander.resolve(link, None, name) for name, link in outputs.items()}
    elif isinstance(outputs, list):
        outputs = [o for node_id in outputs for o in expander.output_nodes(node_id, nodes)]
    flat = workflow.model_copy(update={"nodes": nodes, "parameters": parameters, "outputs": outputs})
    return flat, expander.problems


class _Expander:
    """State of one expansion: where instances' outputs come from, where their parameters go."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.problems: list[Problem] = []
        self.aliases: dict[tuple[str, str], Link] = {}  # (instance id, output) -> inner source
        self.instances: dict[str, type[ComponentNode]] = {}
        self.targets: dict[tuple[str, str], list[ParameterTarget]] = {}  # (instance, input) -> inner inputs
        self.count = 0

    def inline(self, entries: dict[str, NodeEntry], stack: tuple[str, ...], depth: int) -> dict[str, NodeEntry]:
        """``entries`` (links already in expanded ids) with their component instances inlined."""
        out: dict[str, NodeEntry] = {}
        for node_id, entry in entries.items():
            cls = self.registry.node(entry.type)
            if not is_component(cls):
                self.count += 1
                out[node_id] = entry
                continue
            assert cls is not None and issubclass(cls, ComponentNode)
            inner = self.instance(node_id, entry, cls, stack, depth)
            for inner_id, inner_entry in inner.items():
                if inner_id in out or inner_id in entries:
                    self.problems.append(Problem(inner_id, None, codes.BAD_DOCUMENT,
                                                 f"the inner node {inner_id!r} of component instance {node_id!r} "
                                                 "has the id of another node; rename that node"))
                    continue
                out[inner_id] = inner_entry
        return out

    def instance(self, node_id: str, entry: NodeEntry, cls: type[ComponentNode], stack: tuple[str, ...],
                 depth: int) -> dict[str, NodeEntry]:
        component = cls.component
        self.instances[node_id] = cls
        problem = self._refusal(node_id, component, stack, depth)
        if problem is not None:
            self.problems.append(problem)
            return {}
        spec = cls.spec
        for name in entry.inputs:
            if name not in spec.inputs:
                self.problems.append(Problem(node_id, name, codes.UNKNOWN_INPUT,
                                             f"{spec.type_name} has no input {name!r}; its inputs are: "
                                             f"{', '.join(spec.inputs) or 'none'}"))
        for name, ispec in spec.inputs.items():
            if ispec.required and name not in entry.inputs:
                self.problems.append(Problem(node_id, name, codes.MISSING_INPUT,
                                             f"required {ispec.socket.name} input {name!r} of {spec.type_name} is "
                                             "not set; link it to a node's output"))
        prefix = node_id + SEPARATOR
        inner = {prefix + nid: NodeEntry(type=e.type, inputs={k: _prefixed(v, prefix) for k, v in e.inputs.items()},
                                         title=e.title, pos=e.pos)
                 for nid, e in component.workflow.nodes.items()}
        for name, parameter in component.workflow.parameters.items():
            targets = [ParameterTarget(node=prefix + t.node, input=t.input) for t in parameter.targets]
            self.targets[(node_id, name)] = targets
            if name in entry.inputs and name in spec.inputs:
                for target in targets:
                    if target.node in inner:
                        inner[target.node].inputs[target.input] = entry.inputs[name]
        declared = component.workflow.outputs if isinstance(component.workflow.outputs, dict) else {}
        for name, link in declared.items():
            self.aliases[(node_id, name)] = _prefixed(link, prefix)
        return self.inline(inner, (*stack, component.type_name), depth + 1)

    def _refusal(self, node_id: str, component: Component, stack: tuple[str, ...], depth: int) -> Problem | None:
        if component.problem is not None:
            return Problem(node_id, None, codes.CYCLE if "cycle" in component.problem else codes.BAD_DOCUMENT,
                           f"{component.type_name} cannot be used: {component.problem}")
        if component.type_name in stack:
            return Problem(node_id, None, codes.CYCLE, f"{component.type_name} ({component.source}) contains "
                           "itself; a component cannot contain itself")
        if depth >= MAX_NESTING:
            return Problem(node_id, None, codes.TOO_DEEP, f"components are nested more than {MAX_NESTING} deep")
        if self.count + len(component.workflow.nodes) > MAX_EXPANDED_NODES:
            return Problem(node_id, None, codes.OVER_BUDGET,
                           f"expanding {component.type_name} makes more than {MAX_EXPANDED_NODES} nodes")
        return None

    # -- links, outputs, parameters -------------------------------------------------------------------
    def resolve(self, link: Link, consumer: str | None, input_name: str | None) -> Link:
        """Follow a link to an instance's output down to the inner node that computes it."""
        seen = 0
        while link.node in self.instances and seen <= MAX_NESTING:
            target = self.aliases.get((link.node, link.output))
            if target is None:
                spec = self.instances[link.node].spec
                if not self.instances[link.node].component.problem:
                    self.problems.append(Problem(consumer, input_name, codes.UNKNOWN_OUTPUT,
                                                 f"node {link.node!r} ({spec.type_name}) has no output {link.output!r}; "
                                                 f"its outputs are: {', '.join(spec.outputs) or 'none'}"))
                return link
            link, seen = target, seen + 1
        return link

    def resolve_links(self, nodes: dict[str, NodeEntry]) -> dict[str, NodeEntry]:
        for node_id, entry in nodes.items():
            for name, value in entry.inputs.items():
                if isinstance(value, Link) and value.node in self.instances:
                    resolved = self.resolve(value, node_id, name)
                    entry.inputs[name] = resolved
        return {node_id: entry for node_id, entry in nodes.items()
                if all(not (isinstance(v, Link) and v.node in self.instances) for v in entry.inputs.values())}

    def retarget(self, name: str, parameter: Parameter) -> Parameter:
        """A parameter of the outer workflow, with targets on instance inputs moved to the inner inputs."""
        targets: list[ParameterTarget] = []
        pending = list(parameter.targets)
        while pending:
            target = pending.pop(0)
            if target.node not in self.instances:
                targets.append(target)
                continue
            inner = self.targets.get((target.node, target.input))
            if inner is None:
                cls = self.instances[target.node]
                if not cls.component.problem:
                    self.problems.append(Problem(target.node, target.input, codes.BAD_PARAMETER,
                                                 f"parameter {name!r} targets input {target.input!r}, which "
                                                 f"{cls.type_name} does not have (inputs: {', '.join(cls.spec.inputs)})"))
                continue
            pending[:0] = inner
        return parameter.model_copy(update={"targets": targets or parameter.targets})

    def output_nodes(self, node_id: str, nodes: dict[str, NodeEntry]) -> list[str]:
        """A requested output node id; for an instance, the output nodes inside it."""
        if node_id not in self.instances:
            return [node_id]
        prefix = node_id + SEPARATOR
        return [n for n, e in nodes.items() if n.startswith(prefix)
                and (cls := self.registry.node(e.type)) is not None and cls.output_node]


def _prefixed(value: Any, prefix: str) -> Any:
    return Link(node=prefix + value.node, output=value.output) if isinstance(value, Link) else value


def expanded_document(doc: Any, registry: Registry) -> Any:
    """``doc`` with its component instances expanded: a document that needs no component files
    (for workers that do not share this process's folders, and for edits to every loader node).

    ``doc`` comes back unchanged when it uses no component or cannot be expanded; validating it
    then reports why.
    """
    try:
        workflow = parse_workflow(doc)
    except LdmGraphError:
        return doc
    flat, problems = expand_components(workflow, registry)
    if problems or flat is workflow:
        return doc
    return flat.model_dump(mode="json", exclude_none=True)
