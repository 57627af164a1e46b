"""The executor: runs a validated workflow in topological order with a content-addressed cache.

Each node's cache key is a hash of its type, version, literal inputs (and fingerprint) and the
keys of its upstream nodes' outputs, computed in one forward pass over the topological order, so
the cost is linear in the size of the graph (no walk over each node's ancestry, no recursion).
A node runs only if one of the requested outputs needs it and its key is not cached: an
unchanged re-run executes nothing, and a changed input re-runs that node and its descendants
only. Non-deterministic nodes always run, and so do the nodes that depend on them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import ByteLRU, CacheEntry
from .context import CancelToken, Environment, NodeContext, RunState
from .errors import Cancelled, ExecutionError, InputCheckError
from .events import Event, EventCallback
from .node import Node, NodeOutputs
from .registry import Registry
from .validate import CompiledWorkflow, recheck_environment, validate_workflow

DEFAULT_CACHE_BYTES = 2 * 1024**3
VALIDATION_MEMO_SIZE = 16


@dataclass
class RunResult:
    """What a run produced: output nodes' values, files written, and which nodes ran or were cached."""

    outputs: dict[str, dict[str, Any]]
    files: list[Path]
    executed: list[str]
    cached: list[str]
    parameters: dict[str, Any]
    seconds: float
    compiled: CompiledWorkflow | None = field(default=None, repr=False)
    _workflow: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def workflow(self) -> dict[str, Any]:
        """The resolved workflow document (parameters and drawn seeds applied), built on demand."""
        if self._workflow is None:
            self._workflow = self.compiled.resolved_document() if self.compiled is not None else {}
        return self._workflow

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (values of output nodes are left out: they can be arrays)."""
        return {
            "ok": True,
            "files": [str(f) for f in self.files],
            "executed": self.executed,
            "cached": self.cached,
            "parameters": self.parameters,
            "seconds": round(self.seconds, 6),
        }


class _LazyRunState(RunState):
    """Run state whose resolved workflow document is built only if a node asks for it."""

    __slots__ = ("_compiled",)

    def __init__(self, compiled: CompiledWorkflow) -> None:
        super().__init__(None, dict(compiled.parameters))
        self._compiled = compiled

    def document(self) -> dict[str, Any]:
        if self.workflow is None:
            self.workflow = self._compiled.resolved_document()
        return self.workflow


class Executor:
    """Runs workflows against one registry; owns the output cache and the session's resources.

    Keep one executor per process (or per server) to benefit from caching across runs.
    """

    def __init__(
        self,
        registry: Registry,
        env: Environment | None = None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.registry = registry
        self.env = env or Environment()
        self.cache = ByteLRU(cache_bytes)
        self.resources: dict[Any, Any] = {}
        self._instances: dict[type[Node], Node] = {}
        self._validated: OrderedDict[bytes, tuple[int, CompiledWorkflow]] = OrderedDict()

    def validate(
        self, doc: Any, overrides: Mapping[str, Any] | None = None, outputs: list[str] | None = None
    ) -> CompiledWorkflow:
        """Validate a workflow for this executor's registry and environment (raises ValidationError).

        Results are remembered by the document's exact JSON text (and overrides, outputs and the
        registry's version), so re-running an unchanged workflow skips re-validating it; file
        checks and fingerprints are redone every time.
        """
        with gc_paused():
            memo = _memo_key(doc, overrides, outputs)
            hit = self._validated.get(memo) if memo is not None else None
            if hit is not None and hit[0] == self.registry.version:
                self._validated.move_to_end(memo)  # type: ignore[arg-type]
                return recheck_environment(hit[1], self.env)
            compiled = validate_workflow(doc, self.registry, self.env, overrides, outputs)
            if memo is not None:
                self._validated[memo] = (self.registry.version, compiled)
                if len(self._validated) > VALIDATION_MEMO_SIZE:
                    self._validated.popitem(last=False)
            return compiled

    def run(
        self,
        doc: Any,
        *,
        overrides: Mapping[str, Any] | None = None,
        outputs: list[str] | None = None,
        on_event: EventCallback | None = None,
        cancel: CancelToken | None = None,
        previews: int = 0,
    ) -> RunResult:
        """Validate then run a workflow; raises ValidationError, ExecutionError or Cancelled."""
        compiled = doc if isinstance(doc, CompiledWorkflow) else self.validate(doc, overrides, outputs)
        return self.execute(compiled, on_event=on_event, cancel=cancel, previews=previews)

    def execute(
        self,
        compiled: CompiledWorkflow,
        *,
        on_event: EventCallback | None = None,
        cancel: CancelToken | None = None,
        previews: int = 0,
    ) -> RunResult:
        """Run an already validated workflow.

        ``previews`` N > 0 asks nodes that can draw one (the samplers) for a preview image in the
        progress events of every N-th step and of the last; 0 (the default) asks for none, and then
        none is computed. Previews need ``on_event``.
        """
        started = time.perf_counter()
        token = cancel or CancelToken()
        with gc_paused():
            keys, tainted = self._keys(compiled)
            plan, hits = self._plan(compiled, keys)
        state = _LazyRunState(compiled)
        consumers = _consumer_counts(compiled, plan, hits)
        values: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        cached: list[str] = []
        total = len(plan)
        progress = _progress_relay(on_event, compiled, total) if on_event else None
        wanted = set(compiled.outputs)
        if on_event:  # every cache hit is known before anything runs: reported first, together
            for index, node_id in enumerate(plan, 1):
                if node_id in hits:
                    on_event(Event("cached", node_id, compiled.nodes[node_id].spec.type_name, index, total,
                                   files=tuple(hits[node_id].files)))
        for index, node_id in enumerate(plan, 1):
            token.check()
            node = compiled.nodes[node_id]
            entry = hits.get(node_id)
            if entry is not None:
                values[node_id] = entry.outputs
                state.files.extend(entry.files)
                cached.append(node_id)
            else:
                outs, files = self._run_node(node, values, state, token, progress, on_event, index, total,
                                             previews)
                values[node_id] = outs
                executed.append(node_id)
                if node_id not in tainted:
                    self.cache.put(keys[node_id], outs, files)
                for _, source, _ in node.links:
                    consumers[source] -= 1
                    if consumers[source] == 0 and source not in wanted:
                        del values[source]
        return RunResult(
            outputs={nid: values[nid] for nid in compiled.outputs if nid in values},
            files=list(state.files),
            executed=executed,
            cached=cached,
            parameters=state.parameters,
            seconds=time.perf_counter() - started,
            compiled=compiled,
            _workflow=state.workflow,
        )

    # -- internals -------------------------------------------------------------------------------
    def _keys(self, compiled: CompiledWorkflow) -> tuple[dict[str, bytes], set[str]]:
        """Cache key of every needed node, in one forward pass; tainted = depends on a random node."""
        keys: dict[str, bytes] = {}
        tainted: set[str] = set()
        blake2b = hashlib.blake2b
        for node_id in compiled.order:
            node = compiled.nodes[node_id]
            digest = blake2b(node.static_key, digest_size=16)
            for input_name, source, output in node.links:
                digest.update(keys[source])
                digest.update(f"{input_name}\x00{output}\x00".encode())
                if source in tainted:
                    tainted.add(node_id)
            if not node.deterministic:
                digest.update(os.urandom(16))
                tainted.add(node_id)
            keys[node_id] = digest.digest()
        return keys, tainted

    def _plan(
        self, compiled: CompiledWorkflow, keys: dict[str, bytes]
    ) -> tuple[list[str], dict[str, CacheEntry]]:
        """The nodes to visit (outputs, plus the sources of every needed node that is not cached)
        and the cache entries of the needed nodes that are, pinned now so that evictions during the
        run cannot take them away."""
        needed = set(compiled.outputs)
        hits: dict[str, CacheEntry] = {}
        cache = self.cache
        for node_id in reversed(compiled.order):
            if node_id not in needed:
                continue
            entry = cache.get(keys[node_id])
            if entry is not None:
                hits[node_id] = entry
            else:
                needed.update(source for _, source, _ in compiled.nodes[node_id].links)
        return [node_id for node_id in compiled.order if node_id in needed], hits

    def _check_deferred(self, node: Any, inputs: dict[str, Any]) -> None:
        """Validate linked scalar inputs whose values became known only now (a file name from a
        node that computes it) as validation checks literals, before the node runs."""
        problems = _deferred_problems(node, inputs, self.env, self.registry)
        if problems:
            raise InputCheckError("; ".join(problems))

    def _run_node(
        self,
        node: Any,
        values: dict[str, dict[str, Any]],
        state: RunState,
        token: CancelToken,
        progress: Any,
        on_event: EventCallback | None,
        index: int,
        total: int,
        previews: int = 0,
    ) -> tuple[dict[str, Any], list[Path]]:
        node_id, type_name = node.node_id, node.spec.type_name
        inputs = dict(node.literals)
        for input_name, source, output in node.links:
            inputs[input_name] = values[source][output]
        instance = self._instances.get(node.cls)
        if instance is None:
            instance = self._instances[node.cls] = node.cls()
        ctx = NodeContext(node_id, type_name, self.env, self.registry, self.resources, token, progress, state,
                          max(0, previews))
        if on_event:
            on_event(Event("start", node_id, type_name, index, total))
        started = time.perf_counter()
        try:
            for spec in node.enum_checks:
                _, code, message = spec.check_literal(inputs[spec.name], self.registry)
                if code is not None:
                    raise ValueError(f"input {spec.name!r}: {message}")
            if node.deferred:
                self._check_deferred(node, inputs)
            result = instance.run(node.cls.Inputs.model_construct(**inputs), ctx)
            outs = _outputs_dict(node, result)
        except Cancelled as exc:
            if on_event:
                on_event(Event("error", node_id, type_name, index, total, error=exc))
            raise
        except Exception as exc:
            error = ExecutionError(node_id, type_name, exc)
            if on_event:
                on_event(Event("error", node_id, type_name, index, total, error=error))
            raise error from exc
        if on_event:
            on_event(Event("done", node_id, type_name, index, total, seconds=time.perf_counter() - started,
                           files=tuple(ctx.files)))
        return outs, ctx.files


def _deferred_problems(node: Any, inputs: dict[str, Any], env: Environment, registry: Registry) -> list[str]:
    problems = []
    for name in node.deferred:
        _, code, message = node.spec.inputs[name].check_literal(inputs[name], registry)
        if code is not None:
            problems.append(f"input {name!r}: [{code}] {message}")
    if not problems:
        values = {**node.known, **{name: inputs[name] for name in node.deferred}}
        for name, code, message in node.cls.check_inputs(values, env):
            problems.append(f"input {name!r}: [{code}] {message}" if name else f"[{code}] {message}")
    return problems


def _memo_key(doc: Any, overrides: Mapping[str, Any] | None, outputs: list[str] | None) -> bytes | None:
    """Digest of the exact JSON text of a run request, or None when it is not plain JSON."""
    if not isinstance(doc, dict):
        return None
    try:
        text = json.dumps([doc, overrides, outputs], ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector during the framework's own bookkeeping.

    Validation and key computation allocate many small containers; on a 10,000-node graph the
    collector's repeated scans of them doubled the per-node cost. Nodes run with the collector on.
    Re-enabled only by whoever disabled it, so overlapping runs in threads leave it enabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _outputs_dict(node: Any, result: NodeOutputs | None) -> dict[str, Any]:
    """The node's outputs as a dict, checking it returned what it declared."""
    declared = node.spec.outputs
    if result is None:
        if declared:
            raise TypeError(f"run() returned None but {node.spec.type_name} declares outputs {list(declared)}")
        return {}
    if not isinstance(result, NodeOutputs):
        raise TypeError(f"run() must return {node.spec.type_name}.Outputs, got {type(result).__name__}")
    outs = result.__dict__
    if len(outs) != len(declared) or any(name not in outs for name in declared):
        raise TypeError(f"run() returned outputs {list(outs)}, expected {list(declared)}")
    return outs


def _consumer_counts(
    compiled: CompiledWorkflow, plan: list[str], hits: dict[str, CacheEntry]
) -> dict[str, int]:
    """How many nodes to execute read each node's outputs, to free values once nobody needs them."""
    counts = dict.fromkeys(plan, 0)
    for node_id in plan:
        if node_id in hits:
            continue
        for _, source, _ in compiled.nodes[node_id].links:
            counts[source] += 1
    return counts


def _progress_relay(on_event: EventCallback, compiled: CompiledWorkflow, total: int) -> Any:
    def relay(node_id: str, k: int, n: int, preview: Any = None) -> None:
        on_event(Event("progress", node_id, compiled.nodes[node_id].spec.type_name, 0, total, k=k, n=n,
                       preview=preview))

    return relay
