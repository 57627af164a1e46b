"""The one worker that runs queued jobs, and the supervisor that restarts it if it dies.

The worker owns the server's :class:`Executor` (and so its output cache and model cache, which
live as long as the server: a second job on the same checkpoint loads nothing). It claims the
next pending job in one transaction, runs it, turns the executor's progress events into
ComfyUI's websocket messages, and records the outcome. As ComfyUI does: output nodes write into
the output folder itself (file names count on across jobs; no folder per job), ``PreviewImage``
into ``temp``; cache hits are announced in one ``execution_cached`` message; latent previews are
drawn only when the server was started with a preview method or the job asks for one
(``extra_data.preview_method``, the editor's setting), and go only to the job's own client, as do
``SaveImageWebsocket``'s full-size frames; saved images are not sent again as previews. A failing job is recorded with its error
and the worker goes on; anything that escapes a job (a node raising ``SystemExit``, a bug) ends
the thread, and the supervisor marks that job failed, counts the restart (``/system_stats``
shows it) and starts a new worker.
"""

from __future__ import annotations

import gc
import io
import json
import re
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
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.validate import CompiledWorkflow, recheck_environment

from .hub import Hub
from .protocol import error_body
from .store import Job, Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PREVIEW_MAX_SIDE = 512
PREVIEW_EVERY = 1  # a latent preview per sampler step, as ComfyUI sends them
PREVIEW_OFF = ("none", "")  # ComfyUI's --preview-method none; "default" means the server's setting
WEBSOCKET_IMAGE_NODE = "SaveImageWebsocket"
PREPARED_LIMIT = 4096
PNG_KEY = re.compile(r"^[\x20-\x7e]{1,79}$")  # a PNG tEXt keyword: 1-79 Latin-1 printable characters


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
                 on_queue_change: Any, *, preview_method: str = "none", redact: Any = None) -> None:
        self.executor = executor
        self.preview_method = preview_method
        self.redact = redact or (lambda value: value)
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
            self.health.last_death = self.redact(reason)
            self.store.set_meta("worker_restarts", self.health.restarts)
            self._spawn()

    def _record_death(self, job: Job, reason: str) -> None:
        reason = self.redact(reason)
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
    cached: list[str] = field(default_factory=list)  # cache hits (the executor reports them before anything runs)
    announced: bool = False
    compiled: CompiledWorkflow | None = None
    cached_files: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: str | None = None

    @property
    def folder(self) -> Path:
        """Where output nodes write: the output folder itself, as in ComfyUI (prefixes name subfolders)."""
        return self.worker.output_root

    @property
    def temp_folder(self) -> Path:
        env = self.worker.base_env
        return (env.temp_dir if env is not None else None) or self.worker.output_root.parent / "temp"

    def send(self, kind: str, data: dict[str, Any], record: bool = False) -> None:
        data = {**data, "prompt_id": self.job.id}
        if record:
            self.messages.append([kind, {**data, "timestamp": _ms()}])
        self.worker.hub.publish(kind, data, self.job.client_id)

    def execute(self, token: CancelToken) -> None:
        worker, job = self.worker, self.job
        worker.executor.env = replace(worker.base_env, output_dir=self.folder, temp_dir=self.temp_folder,
                                      png_text=comfyui_png_text(job))
        self.send("execution_start", {"timestamp": _ms()}, record=True)
        status: str = "success"
        error: dict[str, Any] | None = None
        try:
            compiled = self.compiled = self._compiled()
            worker.executor.execute(compiled, on_event=self.on_event, cancel=token, previews=self._previews())
            self._announce_cached()
            self.send("execution_success", {"timestamp": _ms()}, record=True)
        except Cancelled:
            status = "interrupted"
            error = {"exception_type": "Cancelled", "exception_message": "interrupted", "node_id": self.current,
                     "traceback": []}
            self.send("execution_interrupted", {"node_id": self.current, "node_type": self._type(self.current),
                                                "executed": self.executed, "timestamp": _ms()}, record=True)
        except ValidationError as exc:
            status, error = "error", worker.redact({"exception_type": "ValidationError", "exception_message": str(exc),
                                                    "node_id": None, "node_type": None, "traceback": [],
                                                    **error_body(exc, job.prompt)})
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
        """Sampler previews every PREVIEW_EVERY steps when previews are on for this job (the server's
        ``--preview-method``, or the job's ``extra_data.preview_method``) and its client is connected."""
        asked = self.job.extra_data.get("preview_method")
        method = self.worker.preview_method if asked in (None, "default") else str(asked)
        wanted = method not in PREVIEW_OFF and self.job.client_id in self.worker.hub.clients
        return PREVIEW_EVERY if wanted else 0

    def _compiled(self) -> CompiledWorkflow:
        executor = self.worker.executor
        hit = self.worker.prepared.pop(self.job.id, None)
        if hit is not None and hit[0] == executor.registry.version:
            return recheck_environment(hit[1], executor.env)
        return executor.validate(self.job.workflow, outputs=self.job.outputs_to_execute or None)

    def _error(self, node_id: str | None, node_type: str | None, cause: BaseException) -> dict[str, Any]:
        """ComfyUI's execution_error fields; server paths in the message and traceback are hidden."""
        return self.worker.redact({"node_id": node_id, "node_type": node_type, "exception_message": str(cause),
                                   "exception_type": type(cause).__name__,
                                   "traceback": traceback.format_exception(type(cause), cause,
                                                                           cause.__traceback__)[-8:],
                                   "current_inputs": {}, "current_outputs": {}})

    def _type(self, node_id: str | None) -> str | None:
        node = self.job.workflow.get("nodes", {}).get(node_id) if node_id else None
        return node.get("type") if isinstance(node, dict) else None

    # -- executor events -> ComfyUI messages ------------------------------------------------------
    def on_event(self, event: Event) -> None:
        node = event.node_id
        if event.kind == "cached":
            self.cached.append(node)
            self.cached_files[node] = event.files
            return
        self._announce_cached()
        if event.kind == "start":
            self.current = node
            self._state(node, "running", 0, 1)
            self.send("executing", {"node": node, "display_node": node})
        elif event.kind == "progress":
            self.send("progress", {"value": event.k, "max": event.n, "node": node})
            self._state(node, "running", event.k, event.n)
        elif event.kind == "done":
            self.timings[node] = round(event.seconds, 6)
            self.executed.append(node)
            self._state(node, "finished", 1, 1)
            self._report_files(node, self._files_of(event))
        elif event.kind != "error":
            self.send("ldmgraph.event", event.to_dict())
        preview = getattr(event, "preview", None)
        if preview is not None:
            self._send_preview(node, preview, full_size=event.node_type == WEBSOCKET_IMAGE_NODE)

    def _announce_cached(self) -> None:
        """ComfyUI's one ``execution_cached`` message listing every cache hit, then ``executed`` for
        the hits that had written files (their files, as when they first ran)."""
        if self.announced:
            return
        self.announced = True
        skipped = unneeded(self.compiled, set(self.cached)) if self.compiled is not None else []
        self.send("execution_cached", {"nodes": [*self.cached, *skipped], "timestamp": _ms()}, record=True)
        for node in self.cached:
            self._report_files(node, self.cached_files.get(node, ()))

    def _files_of(self, event: Event) -> tuple[Any, ...]:
        return event.files

    def _report_files(self, node: str, files: Any) -> None:
        images = [item for item in (self._register(Path(path), node) for path in files) if item is not None]
        if images:
            self.outputs[node] = {"images": images}
            self.send("executed", {"node": node, "display_node": node, "output": {"images": images}})

    def _state(self, node: str, state: str, value: int, maximum: int) -> None:
        """ComfyUI's ``progress_state``: per-node progress, which the editor draws on each node."""
        self.states[node] = {"value": value, "max": maximum, "state": state, "node_id": node,
                             "display_node_id": node, "prompt_id": self.job.id, "parent_node_id": None,
                             "real_node_id": node}
        self.send("progress_state", {"nodes": self.states})

    def _register(self, path: Path, node: str) -> dict[str, str] | None:
        """A file a node wrote -> ComfyUI's ``{filename, subfolder, type}``, remembered for ``/view``;
        None for a file outside the output and temp folders (nothing a client could fetch)."""
        resolved = path.resolve()
        for kind, root in (("output", self.worker.output_root.resolve()), ("temp", self.temp_folder.resolve())):
            if root in resolved.parents:
                subfolder = resolved.parent.relative_to(root).as_posix()
                subfolder = "" if subfolder == "." else subfolder
                self.worker.store.add_file(kind, subfolder, resolved.name, resolved, self.job.id, node)
                return {"filename": resolved.name, "subfolder": subfolder, "type": kind}
        return None

    def _send_preview(self, node: str, source: Any, full_size: bool = False) -> None:
        """A preview frame for the job's own client (none for a job without a client id)."""
        if self.job.client_id is None or self.job.client_id not in self.worker.hub.clients:
            return
        try:
            kind, payload = encode_preview(source, None if full_size else PREVIEW_MAX_SIDE)
        except Exception:  # noqa: BLE001 - a preview that cannot be encoded is skipped, the job goes on
            return
        self.worker.hub.preview(kind, payload, {"prompt_id": self.job.id, "node": node}, self.job.client_id)


def unneeded(compiled: CompiledWorkflow, hits: set[str]) -> list[str]:
    """Nodes that will not run because everything downstream of them was a cache hit: ComfyUI,
    whose cache holds every node's outputs, lists them as cached too."""
    needed, stack = set(), [n for n in compiled.outputs if n not in hits]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(source for _, source, _ in compiled.nodes[node].links if source not in hits)
    return [n for n in compiled.order if n not in needed and n not in hits]


def comfyui_png_text(job: Job) -> tuple[tuple[str, str], ...]:
    """ComfyUI's PNG text chunks for a job's saved images: ``prompt`` (the API-format graph as
    submitted) and each entry of ``extra_data.extra_pnginfo`` (the editor sends ``workflow``, its
    UI-format graph), so ComfyUI's editor restores the graph from an output."""
    chunks: list[tuple[str, str]] = []
    prompt = job.prompt
    if isinstance(prompt, dict) and prompt and all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        chunks.append(("prompt", json.dumps(prompt)))
    extra = job.extra_data.get("extra_pnginfo")
    if isinstance(extra, dict):
        chunks.extend((key, json.dumps(value)) for key, value in extra.items()
                      if isinstance(key, str) and PNG_KEY.match(key) and key != "prompt")
    if isinstance(prompt, dict) and isinstance(prompt.get("nodes"), list) and not any(k == "workflow" for k, _ in chunks):
        chunks.append(("workflow", json.dumps(prompt)))  # a UI-format graph queued as it is
    return tuple(chunks)


def encode_preview(source: Any, max_side: int | None = PREVIEW_MAX_SIDE) -> tuple[str, bytes]:
    """A preview image as (format, bytes): from a file path, encoded bytes, a PIL image or an array;
    shrunk to ``max_side`` pixels (None: full size)."""
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
    if max_side is not None:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "PNG", buffer.getvalue()


def _ms() -> int:
    return int(time.time() * 1000)
