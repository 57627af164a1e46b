"""The one worker that runs queued jobs, and the supervisor that restarts it if it dies.

The worker owns the server's :class:`Executor` (and so its output cache and model cache, which
live as long as the server: a second job on the same checkpoint loads nothing). It claims the
next pending job in one transaction, runs it, turns the executor's progress events into
ComfyUI's websocket messages (asking for a latent preview per sampler step while a client is
connected to receive it), and records the outcome. A failing job is recorded with its error
and the worker goes on; anything that escapes a job (a node raising ``SystemExit``, a bug) ends
the thread, and the supervisor marks that job failed, counts the restart (``/system_stats``
shows it) and starts a new worker.
"""

from __future__ import annotations

import gc
import io
import os
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ldmgraph.graph.context import CancelToken, Environment
from ldmgraph.graph.errors import Cancelled, ExecutionError, ValidationError
from ldmgraph.graph.events import Event
from ldmgraph.graph.executor import Executor, RunResult
from ldmgraph.graph.validate import CompiledWorkflow, recheck_environment

from .hub import Hub
from .protocol import error_body
from .store import Job, Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PREVIEW_MAX_SIDE = 512
PREVIEW_EVERY = 1  # a latent preview per sampler step, as ComfyUI sends them
PREPARED_LIMIT = 4096


@dataclass
class WorkerHealth:
    """What ``/system_stats`` reports about the worker."""

    alive: bool = False
    restarts: int = 0
    last_death: str | None = None
    jobs_done: int = 0
    current: str | None = None


class Worker:
    """Runs jobs one at a time on a thread; see the module docstring."""

    def __init__(self, executor: Executor, store: Store, hub: Hub, base_env: Environment, output_root: Path,
                 on_queue_change: Any) -> None:
        self.executor = executor
        self.store = store
        self.hub = hub
        self.base_env = base_env
        self.output_root = output_root
        self.on_queue_change = on_queue_change
        self.health = WorkerHealth(restarts=int(store.meta("worker_restarts", 0)))
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._current: tuple[Job, CancelToken] | None = None
        self._free: tuple[bool, bool] | None = None
        self._thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._death: BaseException | None = None
        # job id -> (registry version, compiled workflow) validated at submission, so the worker does
        # not validate it again (only its files are re-checked); jobs from before a restart are not here
        self.prepared: OrderedDict[str, tuple[int, CompiledWorkflow]] = OrderedDict()

    def prepare(self, job_id: str, compiled: CompiledWorkflow) -> None:
        """Remember a job's validated workflow until the worker takes it."""
        self.prepared[job_id] = (self.executor.registry.version, compiled)
        while len(self.prepared) > PREPARED_LIMIT:
            self.prepared.popitem(last=False)

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="ldmgraph-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake.set()
        self.interrupt()
        for thread in (self._thread, self._supervisor):
            if thread is not None:
                thread.join(timeout)

    def _spawn(self) -> None:
        self._death = None
        self._thread = threading.Thread(target=self._main, name="ldmgraph-worker", daemon=True)
        self._thread.start()
        self.health.alive = True

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                self._serve_free_request()
                job = self.store.claim_next()
                if job is None:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                self.run_job(job)
        except BaseException as exc:  # noqa: BLE001 - recorded for the supervisor, which restarts us
            self._death = exc

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            thread = self._thread
            if thread is None or thread.is_alive():
                continue
            self.health.alive = False
            death = self._death
            reason = f"{type(death).__name__}: {death}" if death is not None else "the worker thread ended"
            current = self._current
            if current is not None:
                self._record_death(current[0], reason)
            self._current = None
            self.health.restarts += 1
            self.health.last_death = reason
            self.store.set_meta("worker_restarts", self.health.restarts)
            self._spawn()

    def _record_death(self, job: Job, reason: str) -> None:
        error: dict[str, Any] = {"exception_type": "WorkerDied", "exception_message": f"the worker died running this job: {reason}",
                 "node_id": None, "node_type": None, "traceback": []}
        self.store.finish(job.id, "error", outputs={}, messages=[["execution_error", {"prompt_id": job.id, **error}]],
                          timings={}, error=error)
        self.hub.publish("execution_error", {"prompt_id": job.id, **error}, job.client_id)
        self.hub.publish("executing", {"node": None, "display_node": None, "prompt_id": job.id}, job.client_id)
        self.on_queue_change()

    # -- requests from the HTTP side ----------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel the running job (only if it is ``prompt_id`` when given); True if one was cancelled."""
        current = self._current
        if current is None or (prompt_id is not None and current[0].id != prompt_id):
            return False
        current[1].cancel()
        return True

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """Drop cached outputs and/or loaded models between jobs (ComfyUI's ``POST /free``)."""
        self._free = (unload_models, free_memory)
        self.wake.set()

    def _serve_free_request(self) -> None:
        request, self._free = self._free, None
        if request is None:
            return
        unload_models, free_memory = request
        if unload_models or free_memory:
            self.executor.cache.clear()
        if unload_models:
            self.executor.resources.clear()
        gc.collect()

    @property
    def running(self) -> Job | None:
        current = self._current
        return current[0] if current is not None else None

    # -- one job ------------------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        token = CancelToken()
        self._current = (job, token)
        self.health.current = job.id
        self.on_queue_change()
        JobRun(job, self).execute(token)  # anything escaping a job kills the thread, job still current
        self._current = None
        self.health.current = None
        self.health.jobs_done += 1
        self.on_queue_change()


@dataclass
class JobRun:
    """The messages, files and timings of one job as it runs."""

    job: Job
    worker: Worker
    messages: list[Any] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: str | None = None

    @property
    def folder(self) -> Path:
        return self.worker.output_root / self.job.folder

    def send(self, kind: str, data: dict[str, Any], record: bool = False) -> None:
        data = {**data, "prompt_id": self.job.id}
        if record:
            self.messages.append([kind, {**data, "timestamp": _ms()}])
        self.worker.hub.publish(kind, data, self.job.client_id)

    def execute(self, token: CancelToken) -> None:
        worker, job = self.worker, self.job
        worker.executor.env = replace(worker.base_env, output_dir=self.folder)
        self.send("execution_start", {"timestamp": _ms()}, record=True)
        status: str = "success"
        error: dict[str, Any] | None = None
        try:
            compiled = self._compiled()
            result = worker.executor.execute(compiled, on_event=self.on_event, cancel=token, previews=self._previews())
            self._attribute_cached(result)
            self.send("execution_success", {"timestamp": _ms()}, record=True)
        except Cancelled:
            status = "interrupted"
            error = {"exception_type": "Cancelled", "exception_message": "interrupted", "node_id": self.current,
                     "traceback": []}
            self.send("execution_interrupted", {"node_id": self.current, "node_type": self._type(self.current),
                                                "executed": self.executed, "timestamp": _ms()}, record=True)
        except ValidationError as exc:
            status, error = "error", {"exception_type": "ValidationError", "exception_message": str(exc),
                                      "node_id": None, "node_type": None, "traceback": [],
                                      **error_body(exc, job.prompt)}
            self.send("execution_error", {**error, "executed": self.executed, "timestamp": _ms()}, record=True)
        except ExecutionError as exc:
            status, error = "error", self._error(exc.node_id, exc.node_type, exc.cause)
            self.send("execution_error", {**error, "executed": self.executed, "timestamp": _ms()}, record=True)
        except Exception as exc:  # noqa: BLE001 - a failing job is recorded and the worker goes on
            status, error = "error", self._error(self.current, self._type(self.current), exc)
            self.send("execution_error", {**error, "executed": self.executed, "timestamp": _ms()}, record=True)
        started = job.started or time.time()
        timings = {"queued_s": round(started - job.created, 6), "run_s": round(time.time() - started, 6),
                   "nodes": self.timings}
        worker.store.finish(job.id, status, outputs=self.outputs, messages=self.messages, timings=timings,
                            error=error)
        self.send("executing", {"node": None, "display_node": None})

    def _previews(self) -> int:
        """Sampler previews every PREVIEW_EVERY steps while a websocket client would receive them, else none."""
        clients = self.worker.hub.clients
        wanted = bool(clients) if self.job.client_id is None else self.job.client_id in clients
        return PREVIEW_EVERY if wanted else 0

    def _compiled(self) -> CompiledWorkflow:
        executor = self.worker.executor
        hit = self.worker.prepared.pop(self.job.id, None)
        if hit is not None and hit[0] == executor.registry.version:
            return recheck_environment(hit[1], executor.env)
        return executor.validate(self.job.workflow, outputs=self.job.outputs_to_execute or None)

    def _error(self, node_id: str | None, node_type: str | None, cause: BaseException) -> dict[str, Any]:
        return {"node_id": node_id, "node_type": node_type, "exception_message": str(cause),
                "exception_type": type(cause).__name__,
                "traceback": traceback.format_exception(type(cause), cause, cause.__traceback__)[-8:],
                "current_inputs": {}, "current_outputs": {}}

    def _type(self, node_id: str | None) -> str | None:
        node = self.job.workflow.get("nodes", {}).get(node_id) if node_id else None
        return node.get("type") if isinstance(node, dict) else None

    # -- executor events -> ComfyUI messages ------------------------------------------------------
    def on_event(self, event: Event) -> None:
        node = event.node_id
        if event.kind == "start":
            self.current = node
            self._state(node, "running", 0, 1)
            self.send("executing", {"node": node, "display_node": node})
        elif event.kind == "cached":
            self.send("execution_cached", {"nodes": [node], "timestamp": _ms()}, record=True)
        elif event.kind == "progress":
            self.send("progress", {"value": event.k, "max": event.n, "node": node})
            self._state(node, "running", event.k, event.n)
        elif event.kind == "done":
            self.timings[node] = round(event.seconds, 6)
            self.executed.append(node)
            self._state(node, "finished", 1, 1)
            images = self._new_files(node)
            if images:
                self.outputs[node] = {"images": images}
                self.send("executed", {"node": node, "display_node": node, "output": {"images": images}})
        elif event.kind != "error":
            self.send("ldmgraph.event", event.to_dict())
        preview = getattr(event, "preview", None)
        if preview is not None:
            self._send_preview(node, preview)

    def _state(self, node: str, state: str, value: int, maximum: int) -> None:
        """ComfyUI's ``progress_state``: per-node progress, which the editor draws on each node."""
        self.states[node] = {"value": value, "max": maximum, "state": state, "node_id": node,
                             "display_node_id": node, "prompt_id": self.job.id, "parent_node_id": None,
                             "real_node_id": node}
        self.send("progress_state", {"nodes": self.states})

    def _new_files(self, node: str) -> list[dict[str, str]]:
        """Files that appeared in the job's folder since the last node: this node wrote them."""
        if not self.folder.is_dir():
            return []
        found = []
        for root, _dirs, names in os.walk(self.folder):
            for name in sorted(names):
                path = Path(root) / name
                key = str(path)
                if key in self.seen or name.startswith("."):
                    continue
                self.seen.add(key)
                found.append(self._register(path, node))
        for item in found:
            if item["filename"].lower().endswith(IMAGE_SUFFIXES):
                self._send_preview(node, Path(self.worker.output_root, item["subfolder"], item["filename"]))
                break
        return found

    def _register(self, path: Path, node: str) -> dict[str, str]:
        relative = path.relative_to(self.worker.output_root)
        subfolder = relative.parent.as_posix()
        self.worker.store.add_file("output", subfolder, path.name, path, self.job.id, node)
        return {"filename": path.name, "subfolder": subfolder, "type": "output"}

    def _attribute_cached(self, result: RunResult) -> None:
        """Files of output nodes served from the cache (written by an earlier job) go to those nodes."""
        root = self.worker.output_root.resolve()
        leftover = [f for f in result.files if str(f) not in self.seen and root in f.resolve().parents]
        owners = [n for n in result.cached if n in result.outputs]
        if not leftover or not owners:
            return
        images = []
        for path in leftover:
            relative = path.resolve().relative_to(root)
            images.append({"filename": path.name, "subfolder": relative.parent.as_posix(), "type": "output"})
        self.outputs[owners[0]] = {"images": images}
        self.send("executed", {"node": owners[0], "display_node": owners[0], "output": {"images": images}})

    def _send_preview(self, node: str, source: Any) -> None:
        try:
            kind, payload = encode_preview(source)
        except Exception:  # noqa: BLE001 - a preview that cannot be encoded is skipped, the job goes on
            return
        self.worker.hub.preview(kind, payload, {"prompt_id": self.job.id, "node": node}, self.job.client_id)


def encode_preview(source: Any) -> tuple[str, bytes]:
    """A preview image as (format, bytes): from a file path, encoded bytes, a PIL image or an array."""
    from PIL import Image

    if isinstance(source, bytes):
        return ("PNG" if source.startswith(b"\x89PNG") else "JPEG"), source
    if isinstance(source, Path):
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    elif isinstance(source, Image.Image):
        image = source.convert("RGB")
    else:
        import numpy as np

        array = np.asarray(source)
        if array.ndim == 4:
            array = array[0]
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        image = Image.fromarray(array)
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "PNG", buffer.getvalue()


def _ms() -> int:
    return int(time.time() * 1000)
