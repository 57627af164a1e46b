"""Websocket clients and the messages sent to them, from any thread.

ComfyUI's websocket protocol: JSON text frames ``{"type", "data"}``, and binary frames for preview
images laid out as a 4-byte big-endian event number (1 = preview image), a 4-byte big-endian image
format (1 = JPEG, 2 = PNG), then the encoded image. Execution messages go to the client that
queued the job (all clients when it gave no id, as ComfyUI sends them); ``status`` goes to everyone;
image frames go only to the job's own client (the worker sends none for a job without one, so a
client collecting frames never receives another job's images). A client that asked
for ``previews=json`` on connecting gets each preview as a JSON message with a base64 PNG instead
of a binary frame.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

PREVIEW_IMAGE = 1
IMAGE_FORMATS = {"JPEG": 1, "PNG": 2}
QUEUE_LIMIT = 4096


@dataclass
class Client:
    """One websocket connection: its id and its outgoing queue."""

    sid: str
    json_previews: bool
    queue: asyncio.Queue[str | bytes] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))


class Hub:
    """Connected websocket clients; ``publish`` and ``preview`` are safe to call from any thread."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def add(self, sid: str, json_previews: bool) -> Client:
        client = self.clients[sid] = Client(sid, json_previews)
        return client

    def remove(self, client: Client) -> None:
        if self.clients.get(client.sid) is client:
            del self.clients[client.sid]

    def publish(self, kind: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send ``{"type": kind, "data": data}`` to ``sid`` (everyone when None)."""
        if not self.clients:
            return
        text = json.dumps({"type": kind, "data": data}, default=str)
        self._call(self._deliver, text, sid, None)

    def preview(self, image_format: str, payload: bytes, meta: dict[str, Any], sid: str | None = None) -> None:
        """Send a preview image as ComfyUI's binary frame, or as JSON to clients that asked for it."""
        if not self.clients:
            return
        frame = struct.pack(">II", PREVIEW_IMAGE, IMAGE_FORMATS.get(image_format, 2)) + payload
        mime = "image/jpeg" if image_format == "JPEG" else "image/png"
        text = json.dumps({"type": "preview", "data": {
            **meta, "mime_type": mime, "image": base64.b64encode(payload).decode("ascii")}})
        self._call(self._deliver, frame, sid, text)

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
                loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, message: str | bytes, sid: str | None, json_form: str | None) -> None:
        targets = list(self.clients.values()) if sid is None else [c for c in (self.clients.get(sid),) if c]
        for client in targets:
            item = json_form if (json_form is not None and client.json_previews) else message
            with contextlib.suppress(asyncio.QueueFull):  # a client that stopped reading loses messages
                client.queue.put_nowait(item)
