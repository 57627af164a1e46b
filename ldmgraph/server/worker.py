"""What a job's run looks like to clients: executor events turned into ComfyUI's websocket messages.

The jobs themselves run in a worker process (:mod:`.process_pool`) or on Ray actors, driven by
:class:`~.remote.RemoteWorker`; a :class:`JobRun` (through its subclass
:class:`~.remote.RemoteRun`) receives the events they stream back and sends ``executing``,
``progress``, ``progress_state``, ``executed`` (for the files a node wrote) and previews, and
keeps the messages, outputs and per-node timings that go into the job's history.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldmgraph.graph.events import Event

from .store import Job

if TYPE_CHECKING:
    from .remote import RemoteWorker

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PREVIEW_MAX_SIDE = 512


@dataclass
class WorkerHealth:
    """What ``/system_stats`` reports about the worker."""

    alive: bool = False
    restarts: int = 0
    last_death: str | None = None
    jobs_done: int = 0
    current: str | None = None


@dataclass
class JobRun:
    """The messages, files and timings of one job as it runs."""

    job: Job
    worker: RemoteWorker  # its hub, store and output folder
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
