"""The server's configuration and the long-lived objects every route shares."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.registry import Registry

from .hub import Hub
from .protocol import object_info
from .store import Store
from .worker import Worker
from .workflows import saved_workflows

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODELS = PACKAGE_ROOT / "assets" / "models"
REPO_WORKFLOWS = PACKAGE_ROOT.parent / "workflows"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Editor settings on a new data folder: no ComfyUI release notices (they fetch from api.comfy.org and
# are about ComfyUI, not this server) and no first-run template browser (there are no templates).
DEFAULT_SETTINGS = {"Comfy.Notification.ShowVersionUpdates": False, "Comfy.TutorialCompleted": True}
# User data files the editor reads at start-up, created empty on a new data folder.
DEFAULT_USERDATA = {"user.css": b"", "comfy.templates.json": b"[]", "workflows/.index.json": b'{"favorites": []}'}


@dataclass
class ServerConfig:
    """What ``ldmgraph serve`` was started with."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    workflows_dir: Path | None = None
    model_dirs: tuple[Path, ...] = ()
    plugin_dirs: tuple[str, ...] = ()
    device: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # an upload's width x height, read from its header before decoding
    max_nodes: int = 5000  # nodes in one submitted graph, counted before any other work
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides the bound address and loopback
    preview_method: str = "none"  # latent previews: none (ComfyUI's default) unless started with one
    cors_origins: tuple[str, ...] = ()
    frontend: bool = True
    precision: str | None = None  # a concrete precision written into every job's loaders (None: as sent)
    backend: str = "local"  # local: a worker thread in this process; ray: actors on a Ray cluster
    address: str | None = None  # the Ray cluster (None: start a local one)
    workers: int | None = None  # Ray actors (None: one per GPU, else one per CPU)


@dataclass
class ServerState:
    """Registry, executor, store, websocket hub and worker: built once, live as long as the server."""

    config: ServerConfig
    registry: Registry
    store: Store
    hub: Hub
    env: Environment
    worker: Any  # Worker, or remote.RemoteWorker on a Ray cluster: the same interface
    input_dir: Path
    output_dir: Path
    userdata_dir: Path
    temp_dir: Path
    redact: Any = None  # hides server paths in messages that leave the server (security.path_redactor)
    logs: Any = None  # recent log records for /internal/logs (security.LogBuffer)
    _info_cache: tuple[Any, dict[str, Any]] | None = None
    _status_pending: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _status_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, config: ServerConfig, registry: Registry) -> ServerState:
        from .security import LogBuffer, path_redactor

        data = config.data_dir.resolve()
        input_dir, output_dir, userdata_dir = data / "input", data / "output", data / "userdata"
        temp_dir = fresh_temp_folder(data / "temp")
        for folder in (input_dir, output_dir, userdata_dir / "workflows"):
            folder.mkdir(parents=True, exist_ok=True)
        store = Store(data / "server.sqlite3")
        store.recover()
        env = Environment(input_dir=input_dir, output_dir=output_dir, temp_dir=temp_dir,
                          model_dirs=(*config.model_dirs, BUNDLED_MODELS), device=config.device)
        redact = path_redactor({data: "<data>", BUNDLED_MODELS: "<bundled models>",
                                **{Path(d): f"<models {i}>" for i, d in enumerate(config.model_dirs)}})
        hub = Hub()
        state_box: list[ServerState] = []
        worker: Any
        if config.backend == "ray":
            from .remote import RemoteWorker

            worker = RemoteWorker(ray_pool(config, env), store, hub, output_dir,
                                  lambda: state_box[0].broadcast_status(), redact=redact)
        else:
            worker = Worker(Executor(registry, env), store, hub, env, output_dir,
                            lambda: state_box[0].broadcast_status(), preview_method=config.preview_method,
                            redact=redact)
        state = cls(config, registry, store, hub, env, worker, input_dir, output_dir, userdata_dir, temp_dir,
                    redact, LogBuffer.install(redact))
        state_box.append(state)
        state.receive_workflow_inputs()
        state.first_start()
        return state

    def with_precision(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with ``--precision`` written into its loaders' ``dtype`` inputs (a copy; as is without it)."""
        if self.config.precision is None:
            return doc
        from ldmgraph.models.precision import apply_precision

        copied = json.loads(json.dumps(doc))
        apply_precision(copied, self.config.precision)
        return copied  # type: ignore[no-any-return]

    def first_start(self) -> None:
        """Default settings and user data files, once per data folder (the user may change them later)."""
        if self.store.meta("initialised"):
            return
        self.store.set_settings(DEFAULT_SETTINGS)
        for name, content in DEFAULT_USERDATA.items():
            path = self.userdata_dir / name
            if not path.exists():
                path.write_bytes(content)
        self.store.set_meta("initialised", True)

    # -- queue status -----------------------------------------------------------------------------
    def queue_remaining(self) -> int:
        return self.store.count(("pending", "running"))

    def status_message(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def broadcast_status(self) -> None:
        """Tell every client the queue length; bursts of changes (a job ends, the next starts) send one."""
        loop = self.hub.loop
        if loop is None or loop.is_closed():
            return
        with self._status_lock:
            if self._status_pending:
                return
            self._status_pending = True
        try:
            loop.call_soon_threadsafe(self._send_status)
        except RuntimeError:  # the loop closed while shutting down
            pass

    def _send_status(self) -> None:
        with self._status_lock:
            self._status_pending = False
        self.hub.publish("status", self.status_message())

    # -- files ------------------------------------------------------------------------------------
    def receive_workflow_inputs(self) -> None:
        """Copy the saved workflows' input files into the input folder, so those workflows run here."""
        folder = self.config.workflows_dir
        source = folder / "inputs" if folder is not None else None
        if source is None or not source.is_dir():
            return
        for path in sorted(source.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            target = self.input_dir / path.name
            if target.is_symlink():  # planted in input/: never written through, never served
                continue
            if not target.exists():
                shutil.copyfile(path, target)
            self.store.add_file("input", "", path.name, target)

    def folder(self, kind: str) -> Path | None:
        """The data folder of a file type (ComfyUI's ``type``: input, output, temp)."""
        return {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}.get(kind)

    def workflows(self) -> dict[str, dict[str, Any]]:
        return saved_workflows(self.config.workflows_dir)

    def object_info(self) -> dict[str, Any]:
        """The node catalogue, rebuilt when the registry or the lists of files change."""
        from ldmgraph.nodes.common import available_models
        from ldmgraph.nodes.lora import lora_dirs

        files = {"input": self.store.file_names("input"), "checkpoints": available_models(self.env.model_dirs),
                 "loras": available_models(lora_dirs(self.env.model_dirs))}
        key = (self.registry.version, *(tuple(names) for names in files.values()))
        with self._lock:
            if self._info_cache is None or self._info_cache[0] != key:
                self._info_cache = (key, object_info(self.registry, files))
            return self._info_cache[1]


def fresh_temp_folder(folder: Path) -> Path:
    """The temp folder (previews), emptied at start-up as ComfyUI empties its own; a link planted
    in its place is removed, never followed."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    shutil.rmtree(folder, ignore_errors=True)  # rmtree removes links inside, never what they point to
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ray_pool(config: ServerConfig, env: Environment) -> Any:
    """The actors of ``--backend ray``, started and ready (each one CPU thread, as ``ldmgraph batch``'s)."""
    from dataclasses import replace

    from ldmgraph.batch.ray_pool import RayWorkerPool

    env = replace(env, input_dir=env.input_dir.resolve(), output_dir=env.output_dir.resolve(),
                  model_dirs=tuple(Path(d).resolve() for d in env.model_dirs))
    pool = RayWorkerPool(env, workers=config.workers, address=config.address,
                         plugin_dirs=[str(Path(p).resolve()) for p in config.plugin_dirs], threads=1, depth=1,
                         retry_errors=False, respawn=True)
    pool.wait_ready(timeout=300)
    return pool
