"""ComfyUI's clients against the real server, sending exactly what they send.

ComfyUI's ``script_examples`` (basic_api_example.py, websockets_api_example.py,
websockets_api_example_ws_images.py) post JSON with ``urllib.request`` and its default headers (so
``Content-Type: application/x-www-form-urlencoded``), listen with the ``websocket-client`` package,
read images from ``/history`` and ``/view``, or collect the binary frames that arrive while their
``SaveImageWebsocket`` node is executing. The tests below do the same, written here (ComfyUI's
files are GPL-3.0 and not copied), on the bundled model with a small size and one step.
"""

from __future__ import annotations

import http.client
import io
import json
import urllib.parse
import urllib.request
import uuid
from typing import Any

import numpy as np
import pytest
import websocket  # the websocket-client package, as ComfyUI's examples use
from PIL import Image
from server_helpers import ServerProcess, comfy_graph, wait_history

pytestmark = pytest.mark.slow


class ExampleClient:
    """What ComfyUI's script examples do, step by step (urllib with default headers, websocket-client)."""

    def __init__(self, server: ServerProcess, api: str = "") -> None:
        self.address = f"127.0.0.1:{server.port}"
        self.api = api
        self.client_id = str(uuid.uuid4())
        self.sent_content_type: str | None = None

    def queue_prompt(self, prompt: dict[str, Any], prompt_id: str | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id is not None:
            p["prompt_id"] = prompt_id
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request(f"http://{self.address}{self.api}/prompt", data=data)
        reply = json.loads(urllib.request.urlopen(req).read())
        self.sent_content_type = req.get_header("Content-type")  # what urllib added on its own
        return reply  # type: ignore[no-any-return]

    def get_image(self, filename: str, subfolder: str, folder_type: str) -> bytes:
        url_values = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        with urllib.request.urlopen(f"http://{self.address}/view?{url_values}") as response:
            return response.read()  # type: ignore[no-any-return]

    def get_history(self, prompt_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.address}/history/{prompt_id}") as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def connect(self) -> websocket.WebSocket:
        ws = websocket.WebSocket()
        ws.connect(f"ws://{self.address}/ws?clientId={self.client_id}", timeout=120)
        return ws

    def wait_done(self, ws: websocket.WebSocket, prompt_id: str) -> None:
        """websockets_api_example.py's loop: until `executing` with node None for this prompt."""
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        return

    def ws_images(self, ws: websocket.WebSocket, prompt_id: str) -> dict[str, list[bytes]]:
        """websockets_api_example_ws_images.py's loop: binary frames while its websocket node executes."""
        output_images: dict[str, list[bytes]] = {}
        current_node = ""
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["prompt_id"] == prompt_id:
                        if data["node"] is None:
                            return output_images
                        current_node = data["node"]
            elif current_node == "save_image_websocket_node":
                output_images.setdefault(current_node, []).append(out[8:])

    def history_images(self, prompt_id: str) -> dict[str, list[bytes]]:
        history = self.get_history(prompt_id)[prompt_id]
        return {node_id: [self.get_image(i["filename"], i["subfolder"], i["type"]) for i in out["images"]]
                for node_id, out in history["outputs"].items() if "images" in out}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- ComfyUI's script examples ------------------------------------------------------------------------
def test_script_example_basic_api_posts_form_urlencoded_json(server: ServerProcess) -> None:
    """basic_api_example.py: urllib's default Content-Type, /prompt queues the graph, it runs."""
    client = ExampleClient(server)
    reply = client.queue_prompt(comfy_graph(seed=5, prefix="basic_example"))
    assert client.sent_content_type == "application/x-www-form-urlencoded"  # urllib's own default
    assert set(reply) == {"prompt_id", "number", "node_errors"} and reply["node_errors"] == {}
    entry = wait_history(server, reply["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["9"]["images"][0]
    assert image["type"] == "output" and image["subfolder"] == "" and image["filename"].startswith("basic_example_")


def test_script_example_websockets_api_reads_images_from_history(server: ServerProcess) -> None:
    """websockets_api_example.py (with and without its prompt_id): wait on the websocket, then
    /history and /view; the image is the saved file, a 32x32 picture."""
    client = ExampleClient(server)
    ws = client.connect()
    try:
        for prompt_id in (None, str(uuid.uuid4())):
            reply = client.queue_prompt(comfy_graph(seed=5, prefix="ws_example"), prompt_id)
            assert prompt_id is None or reply["prompt_id"] == prompt_id
            client.wait_done(ws, reply["prompt_id"])
            images = client.history_images(reply["prompt_id"])
            assert list(images) == ["9"] and len(images["9"]) == 1
            picture = pixels(images["9"][0])
            assert picture.shape == (32, 32, 3) and picture.std() > 1.0
    finally:
        ws.close()


def test_script_example_ws_images_receives_the_image_over_the_websocket(server: ServerProcess) -> None:
    """websockets_api_example_ws_images.py: SaveImageWebsocket's frame is the full image, the same
    pixels SaveImage writes for the same graph (both truncate as ComfyUI does), and nothing else
    arrives while that node runs (previews are off by default)."""
    client = ExampleClient(server, api="/api")
    ws = client.connect()
    try:
        reply = client.queue_prompt(comfy_graph(seed=5, output="SaveImageWebsocket"))
        frames = client.ws_images(ws, reply["prompt_id"])
    finally:
        ws.close()
    assert list(frames) == ["save_image_websocket_node"] and len(frames["save_image_websocket_node"]) == 1
    received = pixels(frames["save_image_websocket_node"][0])
    entry = wait_history(server, reply["prompt_id"])
    assert entry["status"]["status_str"] == "success" and entry["outputs"] == {}  # nothing kept, as ComfyUI
    saved = ExampleClient(server)
    saved_reply = saved.queue_prompt(comfy_graph(seed=5, prefix="ws_images_reference"))
    wait_history(server, saved_reply["prompt_id"])
    reference = pixels(saved.history_images(saved_reply["prompt_id"])["9"][0])
    assert received.shape == (32, 32, 3) and np.array_equal(received, reference)


def test_prompt_body_is_json_whatever_the_content_type(server: ServerProcess) -> None:
    """Client libraries send no Content-Type, or application/octet-stream, or text/plain."""
    body = json.dumps({"prompt": comfy_graph(seed=3, prefix="content_type")}).encode()
    for content_type in (None, "application/octet-stream", "text/plain", "application/x-www-form-urlencoded"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        headers = {"Content-Length": str(len(body))} | ({"Content-Type": content_type} if content_type else {})
        connection.request("POST", "/prompt", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200, (content_type, response.read()[:300])
        assert json.loads(response.read())["node_errors"] == {}
        connection.close()
    # other JSON endpoints too: queue deletion with urllib's default header
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/queue", data=b'{"delete": ["nothing"]}')
    assert json.loads(urllib.request.urlopen(request).read()) == {"deleted": []}


def test_prompt_id_retry_is_idempotent(server: ServerProcess) -> None:
    """A client that retries with the same prompt_id (a dropped connection) gets the same job, run once;
    another graph under a taken id is refused."""
    client = ExampleClient(server)
    prompt_id = str(uuid.uuid4())
    graph = comfy_graph(seed=21, prefix="retry")
    first = client.queue_prompt(graph, prompt_id)
    second = client.queue_prompt(graph, prompt_id)
    assert first == second and first["prompt_id"] == prompt_id
    entry = wait_history(server, prompt_id)
    assert entry["status"]["status_str"] == "success"
    assert client.queue_prompt(graph, prompt_id) == first  # after it ran, too
    job = server.job(prompt_id)
    assert job["ldmgraph"]["runs"] == 1 and len(entry["outputs"]["9"]["images"]) == 1
    conflict = server.http.post("/prompt", json={"prompt": comfy_graph(seed=22), "prompt_id": prompt_id})
    assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "prompt_id_conflict"
    assert entry["prompt"][3]["client_id"] == client.client_id  # ComfyUI's extra_data.client_id
