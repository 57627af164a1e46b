"""ComfyUI's HTTP protocol (0.3.x) and ldmgraph's additions: jobs by id and saved workflows.

Every route here is served both at its ComfyUI path and under ``/api``. Shapes restated from
ComfyUI's ``server.py``: ``POST /prompt`` answers ``{prompt_id, number, node_errors}``; a queue
item is ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``; a history entry is
``{prompt, outputs: {node_id: {images: [{filename, subfolder, type}]}}, status: {status_str,
completed, messages}, meta}``. Bodies are JSON whatever their Content-Type (see
:class:`ldmgraph.server.app.JsonBodies`). A client's ``prompt_id`` is the job's id, and sending
the same one again (a retry after a dropped connection) answers with the job already queued
instead of queueing a second one. Graphs are counted before anything else is done with them
and validated on a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlencode

import pydantic
from fastapi import APIRouter, File, Form, Query, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ldmgraph.graph.errors import ValidationError
from ldmgraph.graph.validate import validate_workflow

from .protocol import error_body, plain_json, request_error, to_document
from .security import client_id_ok
from .state import ServerState
from .store import Job
from .uploads import MODEL_FOLDERS, file_path, receive_image, view_response
from .workflows import NAME, summary

PROMPT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
JOB_STATUS = {"pending": "pending", "running": "in_progress", "success": "completed", "error": "failed",
              "interrupted": "cancelled", "cancelled": "cancelled"}
NOT_PLAIN = "the request holds NaN or Infinity, which JSON does not allow"
BAD_CLIENT_ID = "client_id must be 1-200 printable ASCII characters (no spaces or control characters)"


# -- request bodies (their JSON Schema is the OpenAPI document) -------------------------------------
class PromptRequest(BaseModel):
    """A job: a graph (API format, UI format or ldmgraph/1) and who to tell about it."""

    model_config = ConfigDict(extra="allow")
    prompt: Any = Field(description="{node_id: {class_type, inputs}} (ComfyUI API format) or an ldmgraph/1 "
                                    "document")
    client_id: str | None = Field(None, max_length=200, description="websocket clientId to send progress to")
    prompt_id: str | None = Field(None, description="job id (default: a new UUID)")
    number: float | None = Field(None, description="queue position (ComfyUI's number)")
    front: bool = Field(False, description="queue before every pending job")
    extra_data: dict[str, Any] = Field(default_factory=dict, description="stored with the job (ComfyUI's)")
    partial_execution_targets: list[str] | None = Field(None, description="run only these output nodes")


class QueueRequest(BaseModel):
    clear: bool = False
    delete: list[str] = Field(default_factory=list)


class InterruptRequest(BaseModel):
    prompt_id: str | None = None


class FreeRequest(BaseModel):
    unload_models: bool = False
    free_memory: bool = False


class RunRequest(BaseModel):
    """Run a saved workflow with parameter values (names and types in GET /api/workflows)."""

    parameters: dict[str, Any] = Field(default_factory=dict)
    client_id: str | None = Field(None, max_length=200)
    front: bool = False


class CancelRequest(BaseModel):
    job_ids: list[str] = Field(default_factory=list)



INLINE_BODY_BYTES = 16 * 1024
"""POST /prompt bodies up to this size (a few dozen nodes) are validated on the event loop."""

def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(request_error(kind, message), status_code=status)


def build_router(state: ServerState) -> APIRouter:
    """All protocol routes, bound to one server state."""
    router = APIRouter()
    store, worker = state.store, state.worker

    # -- queueing ---------------------------------------------------------------------------------
    def enqueue(prompt: Any, doc: dict[str, Any], *, kind: str, client_id: str | None, prompt_id: str | None,
                front: bool, extra_data: dict[str, Any], outputs: list[str] | None,
                overrides: dict[str, Any] | None = None, number: float | None = None) -> JSONResponse:
        job_id = prompt_id or str(uuid.uuid4())
        if not PROMPT_ID.match(job_id):
            return error(400, "invalid_prompt_id", "prompt_id must be 1-100 letters, digits, '_', '.', ':' or '-'")
        again = same_job(job_id, prompt)
        if again is not None:
            return again
        doc = state.with_precision(doc)
        try:
            compiled = validate_workflow(doc, state.registry, state.env, overrides, outputs)
        except ValidationError as exc:
            return JSONResponse(state.redact(error_body(exc, prompt)), status_code=400)
        # with components expanded, the stored workflow needs no component folder (Ray actors, restarts)
        resolved = compiled.resolved_document() if overrides or compiled.expanded else doc
        if client_id is not None:
            extra_data = {**extra_data, "client_id": client_id}  # ComfyUI's history shows who queued it
        worker.prepare(job_id, compiled)  # before the job is visible to the worker
        try:
            position = store.add_job(job_id, prompt=prompt, workflow=resolved, extra_data=extra_data,
                                     outputs=list(compiled.outputs), client_id=client_id, source=kind, front=front,
                                     number=int(number) if number is not None and abs(number) < 2**62 else None)
        except KeyError:  # the same id queued by a concurrent request
            return same_job(job_id, prompt) or error(409, "prompt_id_conflict", f"prompt_id {job_id!r} is taken")
        worker.wake.set()
        state.broadcast_status()
        return JSONResponse({"prompt_id": job_id, "number": position, "node_errors": {}})

    def same_job(job_id: str, prompt: Any) -> JSONResponse | None:
        """The reply for a prompt_id already queued: the same answer for the same graph (a retry),
        409 for another graph; None when the id is new."""
        job = store.job(job_id)
        if job is None:
            return None
        if job.prompt != prompt:
            return error(409, "prompt_id_conflict", f"another graph was already queued with prompt_id {job_id!r}; "
                                                    "send a new id (a retry must send the same graph)")
        return JSONResponse({"prompt_id": job.id, "number": job.number, "node_errors": {}})

    @router.post("/prompt", summary="Queue a graph (ComfyUI's POST /prompt)",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": PromptRequest.model_json_schema()}}}})
    async def post_prompt(request: Request) -> JSONResponse:
        started = time.perf_counter()
        raw = await request.body()
        # parsing and validation: a small graph (most jobs; about 1 ms) on the event loop, since handing it to
        # a thread costs more (it waits for the interpreter lock while the worker runs a job: 15-30 ms at
        # p95); a large one off the loop, so that it never stalls other clients
        if len(raw) <= INLINE_BODY_BYTES:
            response = submit_raw(raw)
        else:
            response = await run_in_threadpool(submit_raw, raw)
        # how long the server spent on it (JSON, validation, the queue's transaction), as browsers show it
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response

    def submit_raw(raw: bytes) -> JSONResponse:
        """``POST /prompt``'s body, checked in order of cost: JSON, graph size, shape, then the graph."""
        try:
            data = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            return error(400, "invalid_json", f"the body is not JSON ({str(exc)[:120]})")
        if not isinstance(data, dict):
            return error(400, "invalid_request", "the body must be a JSON object {prompt, client_id, prompt_id, ...}")
        size = graph_size(data.get("prompt"))
        if size > state.config.max_nodes:
            return error(400, "graph_too_large", f"the graph has {size} nodes; this server accepts at most "
                                                 f"{state.config.max_nodes} (ldmgraph serve --max-nodes)")
        try:
            body = PromptRequest.model_validate(data)
        except pydantic.ValidationError as exc:
            return error(400, "invalid_request", _pydantic_message(exc))
        if not client_id_ok(body.client_id):
            return error(400, "invalid_client_id", BAD_CLIENT_ID)
        return submit(body)

    def submit(body: PromptRequest) -> JSONResponse:
        if not plain_json([body.prompt, body.extra_data]):
            return error(400, "invalid_json", NOT_PLAIN)
        try:
            doc, kind = to_document(body.prompt, state.registry)
        except ValidationError as exc:
            return JSONResponse(state.redact(error_body(exc, body.prompt)), status_code=400)
        return enqueue(body.prompt, doc, kind=kind, client_id=body.client_id, prompt_id=body.prompt_id,
                       front=body.front, extra_data=body.extra_data, outputs=body.partial_execution_targets,
                       number=body.number)

    @router.get("/prompt", summary="Queue length")
    async def get_prompt() -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": state.queue_remaining()}}

    @router.get("/queue", summary="Running and pending jobs as ComfyUI's 5-lists")
    def get_queue() -> dict[str, Any]:
        return {"queue_running": [j.queue_item() for j in store.jobs(("running",))],
                "queue_pending": [j.queue_item() for j in store.jobs(("pending",))]}

    @router.post("/queue", summary="Delete pending jobs, or clear the queue")
    def post_queue(body: QueueRequest) -> dict[str, Any]:
        removed = store.cancel_pending(None if body.clear else body.delete)
        state.broadcast_status()
        return {"deleted": removed}

    @router.post("/interrupt", summary="Stop the running job (only if it is prompt_id, when given)")
    def post_interrupt(body: InterruptRequest | None = None) -> dict[str, Any]:
        return {"interrupted": worker.interrupt(body.prompt_id if body else None)}

    @router.post("/free", summary="Drop cached outputs and/or loaded models")
    def post_free(body: FreeRequest) -> dict[str, Any]:
        worker.request_free(body.unload_models, body.free_memory)
        return {}

    # -- history ----------------------------------------------------------------------------------
    @router.get("/history", summary="Finished jobs, oldest first")
    def get_history(max_items: int | None = Query(None, ge=0, le=100000),
                    offset: int = Query(0, ge=0, le=2**31)) -> dict[str, Any]:
        return {j.id: history_item(j) for j in store.history(max_items, offset)}

    @router.get("/history/{prompt_id}", summary="One finished job ({} if unknown, as ComfyUI)")
    def get_history_one(prompt_id: str) -> dict[str, Any]:
        job = store.job(prompt_id)
        return {job.id: history_item(job)} if job is not None and job.status in ("success", "error",
                                                                                 "interrupted") else {}

    @router.post("/history", summary="Delete history entries, or clear the history")
    def post_history(body: QueueRequest) -> dict[str, Any]:
        return {"deleted": store.delete_history(None if body.clear else body.delete)}

    # -- the catalogue ----------------------------------------------------------------------------
    @router.get("/object_info", summary="Every node type in ComfyUI's format")
    def get_object_info() -> dict[str, Any]:
        return state.object_info()

    @router.get("/object_info/{node_class}", summary="One node type in ComfyUI's format")
    def get_object_info_one(node_class: str) -> Any:
        info = state.object_info()
        if node_class not in info:
            return error(404, "unknown_node_type", f"no node type named {node_class[:100]!r}")
        return {node_class: info[node_class]}

    @router.get("/embeddings", summary="Textual-inversion embeddings a prompt can name as embedding:<name>")
    def get_embeddings() -> list[str]:
        from ldmgraph.models.embeddings import available_embeddings  # torch-free: a folder listing

        return available_embeddings(state.env.model_dirs)

    @router.get("/models", summary="Model folder kinds (ComfyUI's names)")
    def get_models() -> list[str]:
        return list(MODEL_FOLDERS)

    @router.get("/models/{folder}", summary="Model files of a kind ([] for kinds ldmgraph has no files of)")
    def get_models_folder(folder: str) -> Any:
        if folder not in MODEL_FOLDERS:
            return error(404, "unknown_folder", f"no model folder {folder[:60]!r}; known: {', '.join(MODEL_FOLDERS)}")
        return model_files(state, folder)

    @router.get("/view_metadata/{folder}", summary="A safetensors model's __metadata__ (404 when it has none)")
    def get_view_metadata(folder: str, filename: str = Query("", max_length=400)) -> Any:
        if folder not in MODEL_FOLDERS or filename not in model_files(state, folder):
            return error(404, "not_found", f"no model {filename[:100]!r} in {folder[:60]!r}")
        from ldmgraph.nodes.common import find_model

        dirs = state.env.model_dirs
        if folder == "loras":
            from ldmgraph.nodes.lora import lora_dirs

            dirs = lora_dirs(dirs)
        metadata = safetensors_metadata(find_model(filename, dirs))
        if metadata is None:
            return error(404, "no_metadata", f"{filename[:100]!r} is not a safetensors file with __metadata__")
        return metadata

    # -- ComfyUI's /internal routes (its editor's file lists, folders and log panel) ----------------
    @router.get("/internal/files/{directory_type}", summary="Files of input, output or temp, newest first")
    def get_internal_files(directory_type: str) -> Any:
        folder = state.folder(directory_type)
        if folder is None:
            return error(400, "invalid_type", "directory_type is input, output or temp")
        entries = [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
        return [e.name for e in sorted(entries, key=lambda e: -e.stat(follow_symlinks=False).st_mtime)]

    @router.get("/internal/folder_paths", summary="Model folder kinds -> folders (server paths hidden)")
    def get_folder_paths() -> dict[str, list[str]]:
        shown = [state.redact(str(d)) for d in state.env.model_dirs]
        return {name: shown if name in ("checkpoints", "vae") else [] for name in MODEL_FOLDERS}

    @router.get("/internal/logs", summary="Recent server log lines as one text")
    def get_logs() -> str:
        return "".join(f"{e['t']} - {e['m']}" for e in list(state.logs.entries))

    @router.get("/internal/logs/raw", summary="Recent server log entries")
    def get_logs_raw() -> dict[str, Any]:
        return {"entries": list(state.logs.entries), "size": {"cols": 80, "rows": 24}}

    @router.patch("/internal/logs/subscribe", summary="Live log subscription (accepted; logs are not pushed)")
    def subscribe_logs() -> Response:
        return Response(status_code=200)

    @router.get("/system_stats", summary="Versions, memory, device, and the worker's health")
    def get_system_stats() -> dict[str, Any]:
        return system_stats(state)

    # -- files ------------------------------------------------------------------------------------
    @router.get("/view", summary="A file of input, output or temp (preview=webp;90 or jpeg;90, channel=rgb|a)")
    def get_view(filename: str = Query(..., max_length=255), type: str = Query("output", max_length=16),
                 subfolder: str = Query("", max_length=255), preview: str | None = Query(None, max_length=32),
                 channel: str | None = Query(None, max_length=8)) -> Any:
        path = file_path(state, type, subfolder, filename)
        if path is None:
            return error(404, "not_found", "no such file in the input, output or temp folder")
        return view_response(path, preview, channel)

    @router.post("/upload/image", summary="Upload an image under its own name (ComfyUI's overwrite / rename rules)")
    def upload_image(image: UploadFile = File(...), type: str = Form("input"), subfolder: str = Form(""),
                     overwrite: str = Form("false")) -> Any:
        return receive_image(state, image, type, subfolder, None, overwrite in ("true", "1"))

    @router.post("/upload/mask", summary="Upload a mask; with original_ref, its alpha is applied to that image")
    def upload_mask(image: UploadFile = File(...), type: str = Form("input"), subfolder: str = Form(""),
                    original_ref: str = Form(""), overwrite: str = Form("false")) -> Any:
        return receive_image(state, image, type, subfolder, original_ref or None, overwrite in ("true", "1"))

    # -- jobs by id (beyond ComfyUI; also what the editor's queue panel reads) -------------------
    @router.get("/jobs", summary="Jobs by status, as the editor's queue panel reads them")
    def get_jobs(status: str = Query("pending,in_progress,completed,failed,cancelled", max_length=200),
                 limit: int = Query(200, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31)) -> dict[str, Any]:
        wanted = {s.strip() for s in status.split(",")}
        ours = tuple(k for k, v in JOB_STATUS.items() if v in wanted)
        if not ours:
            return {"jobs": [], "pagination": {"offset": offset, "limit": limit, "total": 0, "has_more": False}}
        finished = not ({"pending", "in_progress"} & wanted)
        jobs = store.jobs(ours, newest_first=finished, limit=limit, offset=offset)
        total = store.count(ours)
        return {"jobs": [job_summary(j) for j in jobs],
                "pagination": {"offset": offset, "limit": limit, "total": total,
                               "has_more": offset + len(jobs) < total}}

    @router.get("/jobs/{job_id}", summary="One job: status, timings, files, error")
    def get_job(job_id: str) -> Any:
        job = store.job(job_id)
        if job is None:
            return error(404, "unknown_job", f"no job with id {job_id[:100]!r}")
        return job_detail(job)

    @router.post("/jobs/{job_id}/requeue", summary="Queue an interrupted or failed job again")
    def requeue_job(job_id: str) -> Any:
        number = store.requeue(job_id)
        if number is None:
            job = store.job(job_id)
            if job is None:
                return error(404, "unknown_job", f"no job with id {job_id[:100]!r}")
            return error(409, "not_requeueable", f"job {job_id!r} is {job.status}; only interrupted, failed or "
                                                  "cancelled jobs can be queued again")
        worker.wake.set()
        state.broadcast_status()
        return {"prompt_id": job_id, "number": number, "node_errors": {}}

    @router.post("/jobs/{job_id}/cancel", summary="Cancel a job: remove it if pending, interrupt it if running")
    def cancel_job(job_id: str) -> Any:
        if store.job(job_id) is None:
            return error(404, "unknown_job", f"no job with id {job_id[:100]!r}")
        return cancel([job_id])

    @router.post("/jobs/cancel", summary="Cancel several jobs")
    def cancel_jobs(body: CancelRequest) -> Any:
        return cancel(body.job_ids)

    def cancel(ids: list[str]) -> dict[str, Any]:
        removed = store.cancel_pending(ids)
        interrupted = [i for i in ids if i not in removed and worker.interrupt(i)]
        state.broadcast_status()
        return {"cancelled": removed, "interrupted": interrupted}

    # -- saved workflows --------------------------------------------------------------------------
    @router.get("/workflows", summary="Saved workflows with a JSON Schema of their parameters")
    def get_workflows() -> list[dict[str, Any]]:
        return [summary(name, doc, state.registry) for name, doc in state.workflows().items()]

    @router.get("/workflows/{name}", summary="One saved workflow (ldmgraph/1)")
    def get_workflow(name: str) -> Any:
        doc = state.workflows().get(name) if NAME.match(name) else None
        if doc is None:
            return error(404, "unknown_workflow", f"no saved workflow named {name[:100]!r}")
        return doc

    @router.post("/workflows/{name}/run", summary="Queue a saved workflow with parameter values")
    def run_workflow(name: str, body: RunRequest) -> Any:
        doc = state.workflows().get(name) if NAME.match(name) else None
        if doc is None:
            return error(404, "unknown_workflow", f"no saved workflow named {name[:100]!r}")
        if not plain_json(body.parameters):
            return error(400, "invalid_json", NOT_PLAIN)
        return enqueue({"workflow": name, "parameters": body.parameters}, doc, kind=f"workflow:{name}",
                       client_id=body.client_id, prompt_id=None, front=body.front, extra_data={},
                       outputs=None, overrides=body.parameters)

    # -- websocket --------------------------------------------------------------------------------
    @router.websocket("/ws")
    async def websocket(ws: WebSocket, clientId: str | None = None, previews: str | None = None) -> None:  # noqa: N803
        if clientId and not client_id_ok(clientId):
            await ws.close(code=1008, reason=BAD_CLIENT_ID[:120])
            return
        sid = clientId or uuid.uuid4().hex
        await ws.accept()
        client = state.hub.add(sid, json_previews=previews == "json")
        await ws.send_text(json.dumps({"type": "status", "data": {**state.status_message(), "sid": sid}}))
        import asyncio

        async def pump() -> None:
            while True:
                item = await client.queue.get()
                if isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    await ws.send_text(item)

        sender = asyncio.ensure_future(pump())
        try:
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass  # clients may send feature flags (text or binary); nothing to do with them
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            sender.cancel()
            state.hub.remove(client)

    return router


# -- shapes -----------------------------------------------------------------------------------------
def history_item(job: Job) -> dict[str, Any]:
    ok = job.status == "success"
    return {"prompt": job.queue_item(), "outputs": job.outputs,
            "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": job.messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                     for n in job.outputs}}


def _images(job: Job) -> list[dict[str, Any]]:
    return [{**image, "nodeId": node} for node, out in job.outputs.items() for image in out.get("images", [])]


def job_summary(job: Job) -> dict[str, Any]:
    """A job as the editor's queue panel reads it (``/api/jobs``)."""
    images = _images(job)
    preview = ({"filename": images[-1]["filename"], "subfolder": images[-1]["subfolder"],
                "type": images[-1].get("type", "output"),
                "nodeId": images[-1]["nodeId"], "mediaType": "images"} if images else None)
    item: dict[str, Any] = {
        "id": job.id, "status": JOB_STATUS[job.status], "create_time": int(job.created * 1000),
        "execution_start_time": int(job.started * 1000) if job.started else None,
        "execution_end_time": int(job.finished * 1000) if job.finished and job.started else None,
        "preview_output": preview, "outputs_count": len(images), "previewable_outputs_count": len(images),
        "workflow_id": None, "priority": job.number,
    }
    if job.status in ("error", "interrupted") and job.error:
        err = job.error
        item["execution_error"] = {
            "prompt_id": job.id, "node_id": str(err.get("node_id") or ""), "node_type": str(err.get("node_type") or ""),
            "exception_message": str(err.get("exception_message", "")),
            "exception_type": str(err.get("exception_type", "")),
            "traceback": [str(t) for t in err.get("traceback") or []]}
    return item


def job_detail(job: Job) -> dict[str, Any]:
    """One job, with its outputs, timings and files (``GET /api/jobs/{id}``)."""
    ok = job.status == "success"
    workflow = (job.extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(
        job.extra_data.get("extra_pnginfo"), dict) else None
    files = [{**i, "url": "/api/view?" + urlencode({"filename": i["filename"], "subfolder": i["subfolder"],
                                                    "type": i.get("type", "output")})} for i in _images(job)]
    return {**job_summary(job), "outputs": job.outputs, "update_time": int((job.finished or job.created) * 1000),
            "workflow": {"prompt": job.prompt, "extra_data": {"extra_pnginfo": {"workflow": workflow}}},
            "execution_status": {"status_str": "success" if ok else "error", "completed": ok,
                                 "messages": job.messages},
            "ldmgraph": {"status": job.status, "number": job.number, "source": job.source, "runs": job.runs,
                         "created": job.created, "started": job.started, "finished": job.finished,
                         "timings": job.timings, "files": files, "error": job.error,
                         "requeueable": job.status in ("interrupted", "error", "cancelled")}}


def system_stats(state: ServerState) -> dict[str, Any]:
    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    avail = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    health = state.worker.health
    return {
        "system": {"os": platform.system().lower(), "python_version": sys.version, "embedded_python": False,
                   "comfyui_version": f"ldmgraph {package('ldmgraph')}", "ldmgraph_version": package("ldmgraph"),
                   "pytorch_version": package("torch"), "argv": sys.argv, "ram_total": pages * page,
                   "ram_free": avail * page},
        "devices": [{"name": state.env.device or "cpu", "type": "cpu", "index": 0, "vram_total": 0, "vram_free": 0,
                     "torch_vram_total": 0, "torch_vram_free": 0}],
        "worker": {"alive": health.alive, "restarts": health.restarts, "last_death": health.last_death,
                   "jobs_done": health.jobs_done, "current": health.current,
                   "queue_remaining": state.queue_remaining(), "backend": state.config.backend,
                   **({"workers": state.worker.workers()} if state.config.backend == "ray" else {})},
    }


# -- helpers ----------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(NOT_PLAIN)


def _pydantic_message(exc: pydantic.ValidationError) -> str:
    problems = exc.errors()[:10]
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in problems)


def graph_size(prompt: Any) -> int:
    """Nodes in a submitted graph (API format, UI format with its subgraphs, or ldmgraph/1), counted
    without looking inside them: what bounds the work and memory a request can cause."""
    if not isinstance(prompt, dict):
        return 0
    nodes = prompt.get("nodes")
    if not isinstance(nodes, list | dict) or not ("links" in prompt or "format" in prompt):
        return len(prompt)
    definitions = prompt.get("definitions")
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    inner = sum(len(g.get("nodes") or ()) for g in subgraphs if isinstance(g, dict)) if isinstance(
        subgraphs, list) else 0
    return len(nodes) + inner


def model_files(state: ServerState, folder: str) -> list[str]:
    """The files of a model folder kind: checkpoints (which also hold VAEs here) and loras (the
    loras/ folder of each model folder); none of the others."""
    from ldmgraph.nodes.common import available_models

    if folder == "loras":
        from ldmgraph.nodes.lora import lora_dirs

        return available_models(lora_dirs(state.env.model_dirs))
    if folder not in ("checkpoints", "vae"):
        return []
    return available_models(state.env.model_dirs)


def safetensors_metadata(path: Any) -> dict[str, Any] | None:
    """The ``__metadata__`` of a safetensors file's header (read with a bound), or None."""
    import struct

    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 64 * 1024 * 1024:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error, IsADirectoryError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None
