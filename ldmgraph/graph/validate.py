"""Validation: check a whole workflow before anything runs, reporting every problem at once.

The result is a :class:`CompiledWorkflow`: node classes looked up, literals coerced to their
canonical form, defaults filled in, links resolved, a topological order of the nodes the
requested outputs need, and each node's static cache-key material. The executor runs that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import codes
from .components import expand_components
from .context import Environment
from .errors import Problem, ValidationError
from .estimate import estimate_workflow
from .node import InputSpec, Node, NodeSpec
from .registry import Registry
from .sockets import ENUM
from .topology import ancestors_and_self, cycles, to_networkx, topological_order
from .workflow import Link, Workflow, parse_workflow


@dataclass
class CompiledNode:
    """A validated node, ready to run."""

    node_id: str
    cls: type[Node]
    spec: NodeSpec
    literals: dict[str, Any]  # canonical literal values, defaults included
    links: list[tuple[str, str, str]]  # (input name, source node id, source output name)
    static_key: bytes = b""  # hash of type, version, literals and the node's fingerprint
    deterministic: bool = True
    enum_checks: list[InputSpec] = field(default_factory=list)  # ENUM inputs fed by a STRING link
    # literals plus the values of links from constant nodes (String, Int, ...): what check_inputs
    # and fingerprint see at validation
    known: dict[str, Any] = field(default_factory=dict)
    # linked scalar inputs whose values are only known at run time: check_inputs runs again then
    deferred: tuple[str, ...] = ()


@dataclass
class CompiledWorkflow:
    """A workflow that passed validation."""

    workflow: Workflow
    nodes: dict[str, CompiledNode]
    order: list[str]  # topological order of the nodes the outputs need
    outputs: list[str]
    parameters: dict[str, Any]  # every declared parameter's value (override or current literal)
    overrides: dict[str, Any]
    env_dependent: list[str] = field(default_factory=list)  # nodes with file checks or fingerprints
    warnings: list[Problem] = field(default_factory=list)  # worth saying, not worth refusing (model limits)
    expanded: bool = False  # component instances were expanded: ``workflow`` is not the document given

    def to_networkx(self) -> Any:
        """The needed part of the workflow as a ``networkx.DiGraph`` (edge: source -> consumer)."""
        return to_networkx(self.order, {n: [s for _, s, _ in self.nodes[n].links] for n in self.order})

    def resolved_document(self) -> dict[str, Any]:
        """The workflow as JSON with parameter overrides applied (embedded in saved images)."""
        doc = self.workflow.model_dump(mode="json", exclude_none=True)
        for name, value in self.overrides.items():
            for target in self.workflow.parameters[name].targets:
                doc["nodes"][target.node]["inputs"][target.input] = value
        return doc


def validate_workflow(
    doc: Any,
    registry: Registry,
    env: Environment | None = None,
    overrides: Mapping[str, Any] | None = None,
    outputs: list[str] | None = None,
) -> CompiledWorkflow:
    """Validate ``doc`` (a decoded JSON document or a :class:`Workflow`) against ``registry``.

    Component instances (``workflow/<stem>`` nodes) are expanded first: the result describes the
    expanded workflow, whose inner node ids are paths such as ``hires.sampler``.

    Raises :class:`ValidationError` listing every problem (node id, input, code, how to fix).
    """
    parsed = parse_workflow(doc)
    workflow, expansion_problems = expand_components(parsed, registry)
    env = env or Environment()
    checker = _Checker(workflow, registry, env)
    checker.problems += expansion_problems
    overrides = dict(overrides or {})
    inputs_by_node = checker.apply_parameters(overrides)
    compiled = {nid: node for nid in workflow.nodes if (node := checker.check_node(nid, inputs_by_node[nid]))}
    sources = checker.sources()
    graph = to_networkx(workflow.nodes, sources)
    order, on_cycles = topological_order(graph)
    if on_cycles:
        checker.report_cycles(graph.subgraph(on_cycles))
    constants: dict[str, dict[str, Any]] = {}
    for node_id in order:
        if node_id in compiled and not checker.check_environment(compiled[node_id], constants):
            del compiled[node_id]
    wanted = checker.check_outputs(outputs if outputs is not None else workflow.outputs)
    if checker.problems:
        raise ValidationError(checker.problems)
    needed = ancestors_and_self(graph, wanted)
    order = [node_id for node_id in order if node_id in needed]
    env_dependent = [n for n in order if _depends_on_env(compiled[n].cls)]
    result = CompiledWorkflow(workflow, compiled, order, wanted, checker.parameter_values, overrides, env_dependent,
                              expanded=workflow is not parsed)
    over_budget, result.warnings = estimate_workflow(result, env)
    if over_budget:
        raise ValidationError(over_budget)
    return result


def recheck_environment(compiled: CompiledWorkflow, env: Environment) -> CompiledWorkflow:
    """Re-run the file checks and fingerprints of a workflow validated earlier (files may have
    changed since); the rest of validation depends only on the document and the registry."""
    if not compiled.env_dependent:
        return compiled
    problems: list[Problem] = []
    nodes = compiled.nodes
    for node_id in compiled.env_dependent:
        node = nodes[node_id]
        try:
            found = node.cls.check_inputs(node.known, env)
            key = _static_key(node.cls, node.literals, node.known, env) if not found else node.static_key
        except Exception as exc:  # noqa: BLE001 - as in check_node
            found = [(None, codes.CHECK_FAILED, f"could not check its inputs: {type(exc).__name__}: {exc}")]
        problems += [Problem(node_id, name, code, message) for name, code, message in found]
        if not found:
            if key != node.static_key:
                nodes = dict(nodes) if nodes is compiled.nodes else nodes
                nodes[node_id] = replace(node, static_key=key)
    if problems:
        raise ValidationError(problems)
    return compiled if nodes is compiled.nodes else replace(compiled, nodes=nodes)


def _depends_on_env(cls: type[Node]) -> bool:
    return (cls.check_inputs.__func__ is not _BASE_CHECK_INPUTS  # type: ignore[attr-defined]
            or cls.fingerprint.__func__ is not _BASE_FINGERPRINT)  # type: ignore[attr-defined]


class _Checker:
    """Collects problems while walking the workflow once."""

    def __init__(self, workflow: Workflow, registry: Registry, env: Environment) -> None:
        self.workflow = workflow
        self.registry = registry
        self.env = env
        self.problems: list[Problem] = []
        self.parameter_values: dict[str, Any] = {}

    def add(self, node_id: str | None, input_name: str | None, code: str, message: str) -> None:
        self.problems.append(Problem(node_id, input_name, code, message))

    # -- parameters --------------------------------------------------------------------------
    def apply_parameters(self, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
        inputs = {nid: entry.inputs for nid, entry in self.workflow.nodes.items()}
        declared = self.workflow.parameters
        for name in overrides:
            if name not in declared:
                known = ", ".join(sorted(declared)) or "none"
                self.add(None, None, codes.BAD_PARAMETER,
                         f"--set {name}=...: the workflow declares no parameter {name!r}{_did_you_mean(name, declared)} "
                         f"(declared: {known}; NODE.INPUT=... sets any node's input)")
        for name, param in declared.items():
            for target in param.targets:
                value = self._check_target(name, target.node, target.input, overrides)
                if name in overrides and value is not _INVALID:
                    inputs[target.node] = {**inputs[target.node], target.input: value}
                if name not in self.parameter_values and value is not _INVALID and not isinstance(value, Link):
                    self.parameter_values[name] = overrides.get(name, value)
        return inputs

    def _check_target(self, name: str, node_id: str, input_name: str, overrides: dict[str, Any]) -> Any:
        entry = self.workflow.nodes.get(node_id)
        if entry is None:
            self.add(node_id, input_name, codes.BAD_PARAMETER,
                     f"parameter {name!r} targets node {node_id!r}, which is not in the workflow")
            return _INVALID
        cls = self.registry.node(entry.type)
        if cls is None:
            return _INVALID  # reported as unknown_node_type
        spec = cls.spec.inputs.get(input_name)
        if spec is None:
            self.add(node_id, input_name, codes.BAD_PARAMETER,
                     f"parameter {name!r} targets input {input_name!r}, which {entry.type} does not have "
                     f"(inputs: {', '.join(cls.spec.inputs)})")
            return _INVALID
        if name not in overrides:  # a linked target keeps its link (a component's linkable input)
            return entry.inputs.get(input_name, spec.default)
        value, code, message = spec.check_literal(overrides[name], self.registry)
        if code is not None:
            self.add(node_id, input_name, code, f"value of parameter {name!r}: {message}")
            return _INVALID
        return value

    # -- nodes -------------------------------------------------------------------------------
    def check_node(self, node_id: str, given: dict[str, Any]) -> CompiledNode | None:
        entry = self.workflow.nodes[node_id]
        cls = self.registry.node(entry.type)
        if cls is None:
            close = self.registry.closest_node_types(entry.type)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else "see `ldmgraph nodes`"
            self.add(node_id, None, codes.UNKNOWN_NODE_TYPE,
                     f"unknown node type {entry.type!r}; {hint} (or install the plugin that provides it)")
            return None
        spec = cls.spec
        before = len(self.problems)
        for name in given:
            if name not in spec.inputs:
                self.add(node_id, name, codes.UNKNOWN_INPUT,
                         f"{spec.type_name} has no input {name!r}{_did_you_mean(name, spec.inputs)}; its inputs are: "
                         f"{', '.join(spec.inputs) or 'none'}")
        literals: dict[str, Any] = {}
        links: list[tuple[str, str, str]] = []
        enum_checks: list[InputSpec] = []
        for name, ispec in spec.inputs.items():
            if name not in given:
                if ispec.required:
                    self.add(node_id, name, codes.MISSING_INPUT,
                             f"required {ispec.socket.name} input {name!r} of {spec.type_name} is not set; "
                             + ("link it to a node's output" if not ispec.socket.literal else "give it a value"))
                else:
                    literals[name] = ispec.default
                continue
            value = given[name]
            if isinstance(value, Link):
                if self._check_link(node_id, ispec, value):
                    links.append((name, value.node, value.output))
                    if issubclass(ispec.socket, ENUM) and not issubclass(self._source_socket(value), ENUM):
                        enum_checks.append(ispec)
                continue
            if isinstance(value, dict) and "node" in value:
                self.add(node_id, name, codes.BAD_DOCUMENT,
                         'a link is exactly {"node": "<id>", "output": "<name>"} with string values')
                continue
            canonical, code, message = ispec.check_literal(value, self.registry)
            if code is not None:
                self.add(node_id, name, code, message)
            literals[name] = canonical
        if len(self.problems) != before:
            return None
        return CompiledNode(node_id, cls, spec, literals, links, enum_checks=enum_checks)

    def check_environment(self, node: CompiledNode, constants: dict[str, dict[str, Any]]) -> bool:
        """The node's own checks (files, names) on its literals and on the values of links from
        constant nodes, then its cache-key material; called in topological order so that
        ``constants`` holds the outputs of every constant node upstream. False if problems."""
        before = len(self.problems)
        node.known, deferred = self._known_inputs(node, constants)
        cls = node.cls
        try:
            if len(self.problems) == before:
                for input_name, code, message in cls.check_inputs(node.known, self.env):
                    self.add(node.node_id, input_name, code, message)
            if len(self.problems) == before:
                node.static_key = _static_key(cls, node.literals, node.known, self.env)
                node.deterministic = cls.is_deterministic(node.literals)
                if deferred and _depends_on_env(cls):
                    node.deferred = tuple(deferred)
                    node.deterministic = False  # a file named at run time may change between runs
                if not deferred:
                    outputs = cls.constant_outputs(node.known)
                    if outputs is not None:
                        constants[node.node_id] = outputs
        except Exception as exc:  # noqa: BLE001 - a plugin's check must not crash validation
            self.add(node.node_id, None, codes.CHECK_FAILED,
                     f"{cls.type_name} could not check its inputs: {type(exc).__name__}: {_text(exc)}")
        return len(self.problems) == before

    def _known_inputs(
        self, node: CompiledNode, constants: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, Any], list[str]]:
        """Literals plus linked scalar values from constant nodes (checked like literals), and the
        names of linked scalar inputs whose values only the run will know."""
        known = dict(node.literals)
        deferred: list[str] = []
        for input_name, source, output in node.links:
            ispec = node.spec.inputs[input_name]
            if not ispec.socket.literal:
                continue
            if source not in constants or output not in constants[source]:
                deferred.append(input_name)
                continue
            value, code, message = ispec.check_literal(constants[source][output], self.registry)
            if code is not None:
                self.add(node.node_id, input_name, code, f"the value from node {source!r}: {message}")
            known[input_name] = value
        return known, deferred

    def _source_socket(self, link: Link) -> type:
        cls = self.registry.node(self.workflow.nodes[link.node].type)
        assert cls is not None
        return cls.spec.outputs[link.output].socket

    def _check_link(self, node_id: str, ispec: InputSpec, link: Link) -> bool:
        source = self.workflow.nodes.get(link.node)
        if source is None:
            self.add(node_id, ispec.name, codes.DANGLING_LINK,
                     f"input {ispec.name!r} links to node {link.node!r}, which is not in the workflow; "
                     "fix the node id or add that node")
            return False
        source_cls = self.registry.node(source.type)
        if source_cls is None:
            return False  # the source is reported as unknown_node_type
        out = source_cls.spec.outputs.get(link.output)
        if out is None:
            names = ", ".join(source_cls.spec.outputs) or "none"
            self.add(node_id, ispec.name, codes.UNKNOWN_OUTPUT,
                     f"node {link.node!r} ({source.type}) has no output {link.output!r}; its outputs are: {names}")
            return False
        if not ispec.socket.accepts(out.socket):
            self.add(node_id, ispec.name, codes.TYPE_MISMATCH,
                     f"input {ispec.name!r} takes {ispec.socket.name} but is linked to {out.socket.name} output "
                     f"{link.output!r} of node {link.node!r} ({source.type}); link a {ispec.socket.name} output")
            return False
        return True

    # -- graph -------------------------------------------------------------------------------
    def sources(self) -> dict[str, list[str]]:
        """node id -> the ids of existing nodes it links to."""
        nodes = self.workflow.nodes
        return {
            node_id: [v.node for v in entry.inputs.values() if isinstance(v, Link) and v.node in nodes]
            for node_id, entry in nodes.items()
        }

    def report_cycles(self, graph: Any) -> None:
        for cycle in cycles(graph):
            path = " -> ".join(map(repr, [*cycle, cycle[0]]))
            self.add(min(cycle), None, codes.CYCLE,
                     f"nodes {path} form a cycle; a workflow must be acyclic, remove one of these links")

    def check_outputs(self, requested: list[str] | dict[str, Link] | None) -> list[str]:
        nodes = self.workflow.nodes
        declared: list[str] = []
        if isinstance(requested, dict):  # a component run alone: its output nodes and its declared outputs
            declared = list(dict.fromkeys(link.node for link in requested.values() if link.node in nodes))
            requested = None
        if requested is not None:
            for node_id in requested:
                if node_id not in nodes:
                    self.add(node_id, None, codes.NO_OUTPUT_NODE,
                             f"requested output node {node_id!r} is not in the workflow")
            return [n for n in requested if n in nodes]
        wanted = []
        for node_id, entry in nodes.items():
            cls = self.registry.node(entry.type)
            if cls is not None and cls.output_node:
                wanted.append(node_id)
        wanted += [node_id for node_id in declared if node_id not in wanted]
        if not wanted and nodes.keys() and all(self.registry.node(e.type) for e in nodes.values()):
            self.add(None, None, codes.NO_OUTPUT_NODE,
                     "the workflow has no output node (e.g. SaveImage), so running it would do nothing")
        elif not nodes:
            self.add(None, None, codes.NO_OUTPUT_NODE, "the workflow has no nodes")
        return wanted


_INVALID = object()


def _text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - str() of a plugin's exception may fail
        text = "<unprintable>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:500]


def _static_key(cls: type[Node], literals: dict[str, Any], known: dict[str, Any], env: Environment) -> bytes:
    """Hash of what a node's result depends on besides its upstream values.

    ``literals`` is in the declaration order of the node's inputs and holds canonical values
    (coerced JSON scalars and containers), so their ``repr`` is a canonical encoding; it is several
    times cheaper than ``json.dumps`` per node.
    """
    payload = repr((cls.type_name, cls.version, tuple(literals.items())))
    digest = hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16)
    custom = cls.fingerprint.__func__ is not _BASE_FINGERPRINT  # type: ignore[attr-defined]
    extra = cls.fingerprint(known, env) if custom else None
    if extra is not None:
        digest.update(b"\x00" + extra.encode("utf-8", "surrogatepass"))
    return digest.digest()


_BASE_FINGERPRINT = Node.fingerprint.__func__  # type: ignore[attr-defined]
_BASE_CHECK_INPUTS = Node.check_inputs.__func__  # type: ignore[attr-defined]


def describe_parameters(workflow: Workflow, registry: Registry) -> dict[str, dict[str, Any]]:
    """What ``ldmgraph params`` lists: each declared parameter's type, current value, bounds,
    choices and help (from the input it targets first), and every input it sets."""
    listing: dict[str, dict[str, Any]] = {}
    for name, param in workflow.parameters.items():
        entry: dict[str, Any] = {"type": "?", "targets": [f"{t.node}.{t.input}" for t in param.targets]}
        target = param.targets[0]
        node = workflow.nodes.get(target.node)
        cls = registry.node(node.type) if node is not None else None
        spec = cls.spec.inputs.get(target.input) if cls is not None else None
        if node is not None and spec is not None:
            described = spec.describe(registry)
            given = node.inputs.get(target.input, spec.default)
            entry.update({k: v for k, v in described.items() if k not in ("required", "default")})
            entry["value"] = None if isinstance(given, Link) else given
        entry["description"] = param.description or entry.get("description", "")
        listing[name] = entry
    return listing


def _did_you_mean(word: str, names: Any) -> str:
    """`` (did you mean 'steps'?)`` for a misspelt name among ``names``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, [str(n) for n in names], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
