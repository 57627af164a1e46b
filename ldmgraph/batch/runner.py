"""One worker's side of a batch: an executor that lives as long as the worker, running row after row.

The same :class:`RowRunner` runs the rows of the local backend and, inside each Ray actor, the
rows of the Ray backend, so both write the same bytes. Its executor (and with it the model cache)
is kept across rows: a checkpoint is loaded once per worker. Each row runs with a fresh staging
folder as its output folder; the files the workflow's output nodes (``SaveImage``) write there are
read back and renamed ``{prefix}{name}`` (``row00042_txt2img_00001_.png``), then either returned as
bytes (the driver writes them) or written by the worker into a shared folder. The PNGs keep what
``SaveImage`` embeds: the resolved workflow and its parameter values.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ldmgraph.graph.context import CancelToken, Environment
from ldmgraph.graph.errors import Cancelled, ExecutionError, LdmGraphError, ValidationError
from ldmgraph.graph.events import Event
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.files import atomic_write_bytes, safe_join
from ldmgraph.graph.validate import CompiledWorkflow

MODEL_CACHE_KEY = "model_cache"  # the resource name the loader nodes keep their ModelCache under


@dataclass
class RowOutput:
    """What a worker sends back for a finished row."""

    files: list[tuple[str, bytes | None]]  # (name relative to the output folder, PNG bytes or None)
    parameters: dict[str, Any]  # resolved parameter values (drawn seeds included)
    seconds: float
    worker: str
    model_loads: int  # models this worker has loaded from disk so far
    attempts: int = 1
    retried: list[str] = field(default_factory=list)  # errors of earlier attempts (set by the pool)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.files]


@dataclass
class RowFailure:
    """A row that raised: the error as text (exceptions need not survive pickling between processes)."""

    error: str
    worker: str
    model_loads: int = 0
    detail: dict[str, Any] | None = None  # see failure_detail: what a server reports about it


Emit = Callable[[tuple[Any, ...]], None]


class RowRunner:
    """A long-lived executor that runs one workflow row at a time (see the module docstring)."""

    def __init__(self, env: Environment, plugin_dirs: Sequence[str] = (), *, write_dir: Path | None = None,
                 name: str = "local", threads: int | None = None) -> None:
        from ldmgraph.plugins import PluginManager

        self.staging = Path(tempfile.mkdtemp(prefix="ldmgraph-batch-"))
        self.base_env = env
        self.executor = Executor(PluginManager(plugin_dirs=list(plugin_dirs)).registry, env)
        self.write_dir = write_dir
        self.threads = threads
        self.worker = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self._count = 0

    @property
    def model_loads(self) -> int:
        """Models loaded from disk by this runner's model cache (0 before the first load)."""
        cache = self.executor.resources.get(MODEL_CACHE_KEY)
        return int(cache.stats.loads) if cache is not None else 0

    def run(self, doc: Mapping[str, Any], params: Mapping[str, Any], prefix: str = "",
            cancel: CancelToken | None = None, *, outputs: list[str] | None = None,
            emit: Emit | None = None) -> RowOutput:
        """Run the workflow with ``params`` as parameter overrides; raises on an invalid or failed run.

        ``outputs`` runs only those output nodes. With ``emit``, the run is told as it goes:
        ``("files", node_id, files)`` for the files a node wrote (sent before that node's ``done``
        event, and then left out of the returned :class:`RowOutput`) and ``("event", event)`` for
        each executor event (its exception dropped: exceptions need not pickle).
        """
        self._count += 1
        if self.threads:
            set_torch_threads(self.threads)
        folder = self.staging / f"run{self._count:07d}"
        folder.mkdir()
        started = time.perf_counter()
        sent: set[str] = set()
        try:
            self.executor.env = replace(self.base_env, output_dir=folder)
            compiled = always_run_outputs(self.executor.validate(dict(doc), dict(params), outputs))
            on_event = None if emit is None else self._streamer(folder, prefix, emit, sent)
            result = self.executor.execute(compiled, cancel=cancel, on_event=on_event)
            files = self._collect(folder, [p for p in result.files if str(p) not in sent], prefix)
        finally:
            self.executor.env = self.base_env
            shutil.rmtree(folder, ignore_errors=True)
        return RowOutput(files, dict(result.parameters), time.perf_counter() - started, self.worker,
                         self.model_loads)

    def try_run(self, doc: Mapping[str, Any], params: Mapping[str, Any], prefix: str = "",
                cancel: CancelToken | None = None, *, outputs: list[str] | None = None,
                emit: Emit | None = None) -> RowOutput | RowFailure:
        """:meth:`run`, with a failure returned as text rather than raised (for other processes)."""
        try:
            return self.run(doc, params, prefix, cancel, outputs=outputs, emit=emit)
        except (LdmGraphError, Exception) as exc:  # noqa: BLE001 - any error of a row is that row's result
            return RowFailure(f"{type(exc).__name__}: {exc}", self.worker, self.model_loads, failure_detail(exc))

    def _streamer(self, folder: Path, prefix: str, emit: Emit, sent: set[str]) -> Callable[[Event], None]:
        """The executor callback of a streamed run: a node's new files, then its events."""

        def on_event(event: Event) -> None:
            if event.kind == "done" and folder.is_dir():
                new = sorted(p for p in folder.rglob("*") if p.is_file() and str(p) not in sent
                             and not p.name.startswith("."))
                if new:
                    sent.update(str(p) for p in new)
                    emit(("files", event.node_id, self._collect(folder, new, prefix)))
            emit(("event", replace(event, error=None) if event.error is not None else event))

        return on_event

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _collect(self, folder: Path, written: list[Path], prefix: str) -> list[tuple[str, bytes | None]]:
        files: list[tuple[str, bytes | None]] = []
        resolved = folder.resolve()
        for path in written:
            try:
                relative = Path(path).resolve().relative_to(resolved)
            except ValueError:
                continue  # not in the output folder (PreviewImage's temporary files)
            name = (relative.parent / f"{prefix}{relative.name}").as_posix()
            data = Path(path).read_bytes()
            if self.write_dir is not None:
                atomic_write_bytes(safe_join(self.write_dir, name), data)
                files.append((name, None))
            else:
                files.append((name, data))
        return files


def failure_detail(exc: BaseException) -> dict[str, Any]:
    """A failed run as plain data: ``kind`` (cancelled, validation, execution, error), the node, the cause."""
    node_id = node_type = None
    cause: BaseException = exc
    if isinstance(exc, Cancelled):
        kind = "cancelled"
    elif isinstance(exc, ValidationError):
        kind = "validation"
    elif isinstance(exc, ExecutionError):
        kind, node_id, node_type = "execution", exc.node_id, exc.node_type
        cause = exc.cause if exc.cause is not None else exc
    else:
        kind = "error"
    return {"kind": kind, "node_id": node_id, "node_type": node_type, "exception_type": type(cause).__name__,
            "exception_message": str(cause),
            "traceback": traceback.format_exception(type(cause), cause, cause.__traceback__)[-8:]}


def set_torch_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch (for this whole process).

    CPU results depend on the thread count (matrix products split their sums by thread), so two
    workers give the same bytes for the same row only with the same count.
    """
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def always_run_outputs(compiled: CompiledWorkflow) -> CompiledWorkflow:
    """The same workflow with its output nodes marked to run every time.

    Otherwise a row identical to an earlier one would find ``SaveImage`` in the executor's cache and
    write nothing into this row's folder; the nodes upstream of it stay cached as usual.
    """
    nodes = dict(compiled.nodes)
    for node_id in compiled.outputs:
        nodes[node_id] = replace(nodes[node_id], deterministic=False)
    return replace(compiled, nodes=nodes)
