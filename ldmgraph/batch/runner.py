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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ldmgraph.graph.context import CancelToken, Environment
from ldmgraph.graph.errors import LdmGraphError
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
            cancel: CancelToken | None = None) -> RowOutput:
        """Run the workflow with ``params`` as parameter overrides; raises on an invalid or failed run."""
        self._count += 1
        if self.threads:
            set_torch_threads(self.threads)
        folder = self.staging / f"run{self._count:07d}"
        folder.mkdir()
        started = time.perf_counter()
        try:
            self.executor.env = replace(self.base_env, output_dir=folder)
            compiled = always_run_outputs(self.executor.validate(dict(doc), dict(params)))
            result = self.executor.execute(compiled, cancel=cancel)
            files = self._collect(folder, result.files, prefix)
        finally:
            self.executor.env = self.base_env
            shutil.rmtree(folder, ignore_errors=True)
        return RowOutput(files, dict(result.parameters), time.perf_counter() - started, self.worker,
                         self.model_loads)

    def try_run(self, doc: Mapping[str, Any], params: Mapping[str, Any], prefix: str = "") -> RowOutput | RowFailure:
        """:meth:`run`, with a failure returned as text rather than raised (for other processes)."""
        try:
            return self.run(doc, params, prefix)
        except (LdmGraphError, Exception) as exc:  # noqa: BLE001 - any error of a row is that row's result
            return RowFailure(f"{type(exc).__name__}: {exc}", self.worker, self.model_loads)

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
