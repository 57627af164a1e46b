"""The server's security and bounds, found from outside, each against the real server.

Origin ``null`` and foreign origins may change nothing; a foreign ``Host`` (DNS rebinding) is
refused unless named with ``--allow-host``; graphs are bounded by node count before any work and
validated off the event loop; an upload's pixel count is read from its header; no path follows a
symbolic link out of the data folder; client ids with control characters are refused; error
messages name no absolute server path.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from server_helpers import ROOT, ServerProcess, txt2img_api, wait_graph, wait_history
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

NULL = {"Origin": "null"}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_origin_null_changes_nothing(server: ServerProcess) -> None:
    """A sandboxed iframe or a file:// page sends Origin: null; it may not interrupt, upload, store
    settings, overwrite the editor's user.css, queue, or open the websocket."""
    before = server.http.get("/api/userdata/user.css")
    attempts = [
        server.http.post("/interrupt", json={}, headers=NULL),
        server.http.post("/api/settings/Comfy.Evil", json="yes", headers=NULL),
        server.http.post("/api/userdata/user.css", content=b"body{display:none}", headers=NULL),
        server.http.post("/upload/image", files={"image": ("null.png", png(4, 4), "image/png")}, headers=NULL),
        server.http.post("/prompt", json={"prompt": wait_graph(1, 0.0)}, headers=NULL),
        server.http.post("/queue", json={"clear": True}, headers=NULL),
    ]
    for response in attempts:
        assert response.status_code == 403 and response.json()["error"]["type"] == "forbidden_origin", response.text
    assert server.http.get("/api/settings/Comfy.Evil").json() is None
    assert server.http.get("/api/userdata/user.css").content == before.content
    with pytest.raises(InvalidStatus):
        connect(server.ws_url("nullpage"), additional_headers=NULL).close()
    assert server.http.get("/prompt", headers=NULL).status_code == 200  # reading is not changing


def test_foreign_host_refused_dns_rebinding(server: ServerProcess, roomy: ServerProcess) -> None:
    """A page on rebind.example (resolving to 127.0.0.1) sends its own Host and a matching Origin."""
    port = server.port
    rebinding = {"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"}
    response = server.http.post("/prompt", json={"prompt": wait_graph(1, 0.0)}, headers=rebinding)
    assert response.status_code == 403 and response.json()["error"]["type"] == "forbidden_host"
    assert server.http.get("/api/queue", headers={"Host": f"rebind.example:{port}"}).status_code == 403
    with pytest.raises(InvalidStatus):
        connect(server.ws_url("rebound"), additional_headers={"Host": f"rebind.example:{port}"}).close()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert server.http.get("/api/queue", headers={"Host": host}).status_code == 200
    allowed = roomy.http.post("/prompt", json={"prompt": wait_graph(1, 0.0)},
                              headers={"Host": "studio.example", "Origin": "http://studio.example"})
    assert allowed.status_code == 200, allowed.text
    assert roomy.http.get("/api/queue", headers={"Host": "other.example"}).status_code == 403


def test_graph_size_is_bounded_before_any_work(roomy: ServerProcess) -> None:
    server = roomy
    huge = {str(i): {"class_type": "TestWait", "inputs": {"ticks": 1, "tick": 0.0}} for i in range(100_000)}
    before = rss_bytes(server.proc.pid)  # type: ignore[union-attr]
    started = time.perf_counter()
    response = server.http.post("/prompt", json={"prompt": huge})
    took = time.perf_counter() - started
    assert response.status_code == 400 and response.json()["error"]["type"] == "graph_too_large"
    assert "100000 nodes" in response.json()["error"]["message"] and "--max-nodes" in response.json()["error"]["message"]
    assert took < 5.0, took
    assert rss_bytes(server.proc.pid) - before < 300 * 1024 * 1024  # type: ignore[union-attr]


def test_validation_runs_off_the_event_loop(server: ServerProcess) -> None:
    """While a large graph (4,999 nodes, each invalid, so all of it is checked and nothing queued) is
    being validated, the server keeps answering other requests."""
    graph = {str(i): {"class_type": "TestWait", "inputs": {"ticks": 0, "tick": 0.0}} for i in range(4_999)}
    body = json.dumps({"prompt": graph}).encode()
    result: dict[str, float] = {}

    def post() -> None:
        with httpx.Client(base_url=server.base, timeout=120) as client:
            result["start"] = time.perf_counter()
            reply = client.post("/prompt", content=body, headers={"Content-Type": "application/json"})
            result["end"] = time.perf_counter()
            result["status"] = reply.status_code

    thread = threading.Thread(target=post)
    thread.start()
    answered: list[tuple[float, float]] = []
    with httpx.Client(base_url=server.base, timeout=120) as client:
        while thread.is_alive():
            sent = time.perf_counter()
            client.get("/prompt")
            answered.append((sent, time.perf_counter()))
    thread.join()
    assert result["status"] == 400
    during = [a for a in answered if a[0] > result["start"] + 0.05 and a[1] < result["end"]]
    assert len(during) >= 5, (len(answered), result["end"] - result["start"])


def test_upload_pixel_count_read_from_the_header(server: ServerProcess) -> None:
    data = png(8192, 8192)  # a few tens of kilobytes that would decode to 67 megapixels
    assert len(data) < 200_000
    before = rss_bytes(server.proc.pid)  # type: ignore[union-attr]
    response = server.http.post("/upload/image", files={"image": ("bomb.png", data, "image/png")})
    assert response.status_code == 413 and response.json()["error"]["type"] == "image_too_large"
    assert rss_bytes(server.proc.pid) - before < 100 * 1024 * 1024  # type: ignore[union-attr]
    assert not (server.data_dir / "input" / "bomb.png").exists()


def test_no_symlink_is_followed_out_of_the_data_folder(server: ServerProcess, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(4, 4))
    planted = server.data_dir / "input" / f"planted-{uuid.uuid4().hex[:6]}"
    planted.symlink_to(outside, target_is_directory=True)
    linked_file = server.data_dir / "input" / f"linked-{uuid.uuid4().hex[:6]}.png"
    linked_file.symlink_to(outside / "secret.png")
    image = ("x.png", png(8, 8), "image/png")
    into_dir = server.http.post("/upload/image", data={"subfolder": planted.name}, files={"image": image})
    assert into_dir.status_code == 400 and into_dir.json()["error"]["type"] == "unsafe_path"
    over_file = server.http.post("/upload/image", data={"overwrite": "true"},
                                 files={"image": (linked_file.name, png(8, 8), "image/png")})
    assert over_file.status_code == 400 and over_file.json()["error"]["type"] == "unsafe_path"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"] and Image.open(outside / "secret.png").size == (4, 4)
    for params in ({"filename": "secret.png", "subfolder": planted.name, "type": "input"},
                   {"filename": linked_file.name, "type": "input"}):
        assert server.http.get("/view", params=params).status_code == 404
    assert linked_file.name not in server.http.get("/internal/files/input").json()


def test_client_ids_with_control_characters_are_refused(server: ServerProcess) -> None:
    for bad in ("a\nb", "tab\there", "esc\x1b[31m", "bell\x07"):
        response = server.http.post("/prompt", json={"prompt": wait_graph(1, 0.0), "client_id": bad})
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_client_id"
    with pytest.raises(Exception):  # noqa: B017, PT011 - refused before the handshake completes
        with connect(server.ws_url("evil%0D%0Aid")) as ws:
            ws.recv(timeout=5)
    with connect(server.ws_url("fine-id_1.2")) as ws:
        assert json.loads(ws.recv(timeout=10))["data"]["sid"] == "fine-id_1.2"


def test_error_messages_show_no_absolute_server_paths(server: ServerProcess) -> None:
    roots = {str(ROOT), str(server.data_dir.resolve()), str(Path.home()), os.path.dirname(os.__file__)}
    missing = server.http.post("/prompt", json={"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "no-such-file.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}})
    assert missing.status_code == 400
    failing = server.submit({"1": {"class_type": "TestFail", "inputs": {}}})
    entry = wait_history(server, failing["prompt_id"])
    error = server.job(failing["prompt_id"])["execution_error"]
    assert error["traceback"] and "this node always fails" in error["exception_message"]
    bad_model = server.http.post("/prompt", json={"prompt": {**txt2img_api(), "1": {
        "class_type": "CheckpointLoader", "inputs": {"ckpt_name": "missing.safetensors"}}}})
    assert bad_model.status_code == 400
    for text in (missing.text, json.dumps(entry), json.dumps(error), bad_model.text,
                 server.http.get("/internal/logs").text):
        assert not [root for root in roots if root in text], text[:600]
    assert "server_test_nodes.py" in json.dumps(error["traceback"])  # the file's name stays: it helps


def test_start_up_never_writes_through_a_link_planted_in_input(tmp_path: Path) -> None:
    """The saved workflows' inputs are copied into input/ at start-up; a dangling link planted under
    one of their names must not be written through."""
    from server_helpers import WORKFLOWS

    name = sorted(p.name for p in (WORKFLOWS / "inputs").iterdir() if p.is_file())[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data" / "input").mkdir(parents=True)
    (tmp_path / "data" / "input" / name).symlink_to(outside / name)
    process = ServerProcess(tmp_path / "data").start()
    try:
        assert not (outside / name).exists()
        assert process.http.get("/view", params={"filename": name, "type": "input"}).status_code == 404
    finally:
        process.stop()
