"""The server's worker on a Ray cluster (``ldmgraph serve --backend ray``): jobs run on long-lived actors.

The queue, history and files stay where they are (the server's SQLite store and data folder); only
the execution moves. :class:`RemoteWorker` has the in-process :class:`~.worker.Worker`'s interface:
it claims the next pending job while an actor is free (one job per live actor at a time), submits
it to :class:`ldmgraph.batch.ray_pool.RayWorkerPool` (each actor holds one executor and model
cache for its life, so a checkpoint loads once per actor) and turns what the actor streams back
into the same websocket messages and records as the in-process worker:

- the actor streams each executor event, and the files a node wrote just before that node's
  ``done`` event; the server writes the files into its output folder (numbered on from the files
  already there, as the in-process worker's are) and hands the events
  to :class:`~.worker.JobRun`, so ``executing``, ``progress``, ``progress_state``, ``executed``
  and previews read exactly as with the in-process worker;
- ``POST /interrupt`` reaches the actor (its ``cancel`` runs beside the job), the job stops at its
  next cancellation point and is recorded interrupted;
- a job that fails is recorded with its error and not retried; a job whose actor dies is retried
  once on another actor, then recorded failed; a dead actor is replaced by a new one (counted in
  ``/system_stats`` as a worker restart);
- jobs still pending when the server stops stay queued, and a job cut off by the server's end
  stays marked running until the next start marks it interrupted (the store's promises).
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmgraph.graph.files import atomic_write_bytes, atomic_write_new, safe_join
from ldmgraph.graph.validate import CompiledWorkflow

from .hub import Hub
from .store import Job, Store
from .worker import JobRun, WorkerHealth, _ms, comfyui_png_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC
COUNTED = re.compile(r"^(.+)_\d{5}_(\.[A-Za-z0-9]+)$")  # SaveImage's {prefix}_{counter:05d}_{suffix}


class RemoteWorker:
    """Runs queued jobs on a :class:`~ldmgraph.batch.ray_pool.RayWorkerPool` (see the module docstring)."""

    def __init__(self, pool: Any, store: Store, hub: Hub, output_root: Path, on_queue_change: Any,
                 redact: Any = None) -> None:
        self.pool = pool
        self.redact = redact or (lambda value: value)
        self.base_env: Any = None  # the actors hold the environment; temp files stay on them
        self.store = store
        self.hub = hub
        self.output_root = output_root
        self.on_queue_change = on_queue_change
        self.health = WorkerHealth(restarts=int(store.meta("worker_restarts", 0)))
        self.wake = threading.Event()
        self.runs: dict[str, RemoteRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._respawned = 0

    def prepare(self, job_id: str, compiled: CompiledWorkflow) -> None:
        """Nothing to keep: the actor validates the workflow again where it runs (its files, its plugins)."""

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="ldmgraph-remote-worker", daemon=True)
        self._thread.start()
        self.health.alive = self.pool.live_workers() > 0

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming jobs; jobs still running are interrupted (and can be queued again)."""
        self._stop.set()
        self.wake.set()
        self.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.runs and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pool.shutdown()

    def _main(self) -> None:
        while not self._stop.is_set():
            self._update_health()
            with self._lock:
                room = len(self.runs) < self.pool.live_workers()
            job = self.store.claim_next() if room else None
            if job is None:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            run = RemoteRun(job, self)
            with self._lock:
                self.runs[job.id] = run
            self.health.current = job.id
            self.on_queue_change()
            run.start()

    def _update_health(self) -> None:
        self.health.alive = self.pool.live_workers() > 0
        respawned = self.pool.respawned
        self.health.last_death = self.pool.last_death or self.health.last_death
        if respawned > self._respawned:
            self.health.restarts += respawned - self._respawned
            self._respawned = respawned
            self.store.set_meta("worker_restarts", self.health.restarts)

    def finished(self, run: RemoteRun) -> None:
        with self._lock:
            self.runs.pop(run.job.id, None)
            self.health.current = next(iter(self.runs), None)
        self.health.jobs_done += 1
        self._update_health()
        self.on_queue_change()
        self.wake.set()

    # -- requests from the HTTP side ----------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel the running job ``prompt_id`` (every running job when None); True if one was cancelled."""
        with self._lock:
            runs = [r for r in self.runs.values() if prompt_id is None or r.job.id == prompt_id]
        return any([run.cancel() for run in runs])

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """Each actor drops its cached outputs and/or models between its jobs."""
        self.pool.free(unload_models, free_memory)

    @property
    def running(self) -> Job | None:
        with self._lock:
            return next((r.job for r in self.runs.values()), None)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def workers(self) -> list[dict[str, Any]]:
        """The actors, for ``/system_stats``: name, process, alive, jobs done and running, models loaded."""
        return [{"name": w["name"], "worker": w["worker"], "alive": w["alive"], "jobs": w["rows"],
                 "running": w["running"], "model_loads": w["model_loads"]} for w in self.pool.worker_stats()]


@dataclass
class RemoteRun(JobRun):
    """One job on an actor: the in-process :class:`JobRun`'s messages, fed from the actor's stream."""

    future: concurrent.futures.Future[Any] | None = None
    cancel_requested: bool = False
    written: dict[str, list[Path]] = field(default_factory=dict)

    def start(self) -> None:
        self.send("execution_start", {"timestamp": _ms()}, record=True)
        self.future = self.worker.pool.submit(self.job.workflow, {}, outputs=self.job.outputs_to_execute or None,
                                              on_event=self.on_item)
        self.future.add_done_callback(self._done)

    def cancel(self) -> bool:
        self.cancel_requested = True
        return self.future is not None and self.worker.pool.cancel(self.future)

    def on_item(self, item: tuple[Any, ...]) -> None:
        """An item of the actor's stream: a node's files (written here), or an executor event."""
        if item[0] == "files":
            for name, data in item[2]:
                if data is not None:
                    self.written.setdefault(str(item[1]), []).append(self._write(name, data))
        elif item[0] == "event":
            self.on_event(item[1])

    def _write(self, name: str, data: bytes) -> Path:
        """A file from the actor, under its name, or numbered on from the files already here; a PNG
        gets the job's ComfyUI text chunks (the actor does not have them)."""
        if data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END):
            data = with_png_text(data, comfyui_png_text(self.job))
        numbered = COUNTED.match(name)
        if numbered:
            return atomic_write_new(self.folder, numbered[1], numbered[2], data)
        return atomic_write_bytes(safe_join(self.folder, name), data)

    def _files_of(self, event: Any) -> tuple[Any, ...]:
        return tuple(self.written.pop(event.node_id, ()))

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            if not (self.worker.stopping and _shut_down(future)):
                self._record(future)  # else it stays running in the store: the next start marks it interrupted
        finally:
            self.worker.finished(self)

    def _record(self, future: concurrent.futures.Future[Any]) -> None:
        from ldmgraph.batch.ray_pool import RowFailed

        job = self.job
        status, extra = "success", {}
        error: dict[str, Any] | None = None
        try:
            out = future.result()
            extra = {"attempts": out.attempts, "retried": out.retried, "worker": out.worker}
            self.send("execution_success", {"timestamp": _ms()}, record=True)
        except (RowFailed, concurrent.futures.CancelledError) as exc:
            detail = getattr(exc, "detail", None)
            errors = getattr(exc, "errors", [])
            extra = {"attempts": len(errors), "retried": errors[:-1], "worker": getattr(exc, "worker", "")}
            if self.cancel_requested and (detail is None or detail["kind"] == "cancelled"):
                status = "interrupted"
                error = {"exception_type": "Cancelled", "exception_message": "interrupted",
                         "node_id": self.current, "traceback": []}
                self.send("execution_interrupted", {"node_id": self.current, "node_type": self._type(self.current),
                                                    "executed": self.executed, "timestamp": _ms()}, record=True)
            else:
                status, error = "error", self._remote_error(detail, errors)
                self.send("execution_error", {**error, "executed": self.executed, "timestamp": _ms()}, record=True)
        started = job.started or time.time()
        timings = {"queued_s": round(started - job.created, 6), "run_s": round(time.time() - started, 6),
                   "nodes": self.timings, **extra}
        self.worker.store.finish(job.id, status, outputs=self.outputs, messages=self.messages, timings=timings,
                                 error=error)
        self.send("executing", {"node": None, "display_node": None})

    def _remote_error(self, detail: dict[str, Any] | None, errors: list[str]) -> dict[str, Any]:
        if detail is None:  # the actor died on every attempt, or no actor was left
            return {"node_id": self.current, "node_type": self._type(self.current), "exception_type": "WorkerDied",
                    "exception_message": "; ".join(errors) or "the worker died running this job",
                    "traceback": [], "current_inputs": {}, "current_outputs": {}}
        node_id = detail["node_id"] or (self.current if detail["kind"] != "validation" else None)
        return self.worker.redact({
            "node_id": node_id, "node_type": detail["node_type"] or self._type(node_id),
            "exception_type": detail["exception_type"], "exception_message": detail["exception_message"],
            "traceback": detail["traceback"], "current_inputs": {}, "current_outputs": {}})


def _shut_down(future: concurrent.futures.Future[Any]) -> bool:
    """True when the pool ended the job by shutting down (not by running it)."""
    from ldmgraph.batch.ray_pool import RowFailed

    if future.cancelled():
        return False
    exc = future.exception()
    return exc is not None and not isinstance(exc, RowFailed)


def with_png_text(data: bytes, chunks: tuple[tuple[str, str], ...]) -> bytes:
    """A PNG with ``tEXt`` chunks added before its end (the pixels are not re-encoded)."""
    import struct
    import zlib

    extra = b""
    for key, text in chunks:
        body = key.encode("latin-1") + b"\x00" + text.encode("latin-1", "replace")
        extra += struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return data[: -len(PNG_END)] + extra + PNG_END
