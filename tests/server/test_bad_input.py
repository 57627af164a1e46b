"""Bad requests get a 4xx with a clear message, never a 500; nothing escapes its folder; the token."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from server_helpers import ROOT, ServerProcess, free_port, txt2img_api
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.slow
TRAVERSALS = ["../../../etc/passwd", "..", "/etc/passwd", "a/../../b", "..\\..\\win.ini", "x\x00y", "%2e%2e/x"]


def assert_clear_4xx(response: httpx.Response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    assert body["error"]["message"], body
    return body


def test_malformed_and_invalid_requests(server: ServerProcess) -> None:
    for payload in (b"{not json", b"", b"[]", b"null", b'{"prompt": 3}', b'{"prompt": {}}', b'{"client_id": "x"}',
                    b'{"prompt": {"1": {"class_type": 5}}}', b'{"prompt": {"1": []}}'):
        assert_clear_4xx(server.http.post("/prompt", content=payload, headers={"content-type": "application/json"}))
    graph = txt2img_api()
    graph["5"]["inputs"]["model"] = ["99", 0]  # link to a missing node
    body = assert_clear_4xx(server.http.post("/prompt", json={"prompt": graph}))
    assert "5" in body["node_errors"]
    graph = txt2img_api()
    graph["5"]["inputs"]["positive"] = ["4", 0]  # LATENT into CONDITIONING
    assert assert_clear_4xx(server.http.post("/prompt", json={"prompt": graph}))["node_errors"]["5"]
    reply = server.submit({"1": {"class_type": "TestWait", "inputs": {"ticks": 1, "tick": 0.0}}}, prompt_id="fixed-id-1")
    assert reply["prompt_id"] == "fixed-id-1"
    assert_clear_4xx(server.http.post("/prompt", json={"prompt": txt2img_api(), "prompt_id": "fixed-id-1"}))
    assert_clear_4xx(server.http.post("/prompt", json={"prompt": txt2img_api(), "prompt_id": "../x"}))


def test_unknown_ids(server: ServerProcess) -> None:
    assert server.http.get("/history/no-such-id").json() == {}
    assert_clear_4xx(server.http.get("/api/jobs/no-such-id"))
    assert_clear_4xx(server.http.post("/api/jobs/no-such-id/requeue"))
    assert_clear_4xx(server.http.post("/api/jobs/no-such-id/cancel"))
    assert_clear_4xx(server.http.get("/object_info/NoSuchNode"))
    assert_clear_4xx(server.http.get("/api/workflows/no_such_workflow"))
    assert_clear_4xx(server.http.post("/api/workflows/no_such_workflow/run", json={}))
    assert_clear_4xx(server.http.get("/models/no_such_folder"))
    assert server.http.post("/queue", json={"delete": ["no-such-id"]}).json() == {"deleted": []}
    assert server.http.post("/interrupt", json={"prompt_id": "no-such-id"}).json() == {"interrupted": False}


def test_oversize_body_and_non_image_upload(server: ServerProcess) -> None:
    big = b'{"prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = server.http.post("/prompt", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]

    def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    streamed = server.http.post("/upload/image", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert streamed.status_code == 413
    for name, data in (("a.png", b"not an image"), ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50), ("a.txt", b"")):
        body = assert_clear_4xx(server.http.post("/upload/image", files={"image": (name, data, "image/png")}))
        assert body["error"]["type"] == "not_an_image"
    assert_clear_4xx(server.http.post("/upload/image", data={"type": "input"}))  # no file at all


def test_path_traversal_in_every_name_field(server: ServerProcess) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(png, format="PNG")
    secret = (ROOT / "pyproject.toml").name
    for bad in TRAVERSALS + [secret, f"../../{secret}"]:
        for params in ({"filename": bad}, {"filename": "x.png", "subfolder": bad}, {"filename": bad, "type": "input"},
                       {"filename": "x.png", "type": bad}):
            assert_clear_4xx(server.http.get("/view", params=params))
        assert_clear_4xx(server.http.post("/upload/image", data={"subfolder": bad},
                                          files={"image": ("x.png", png.getvalue(), "image/png")}))
        assert_clear_4xx(server.http.post("/upload/image", data={"type": bad},
                                          files={"image": ("x.png", png.getvalue(), "image/png")}))
        assert_clear_4xx(server.http.post("/upload/mask", data={"original_ref": json.dumps({"filename": bad})},
                                          files={"image": ("x.png", png.getvalue(), "image/png")}))
        load = {"1": {"class_type": "LoadImage", "inputs": {"image": bad}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ok"}}}
        assert assert_clear_4xx(server.http.post("/prompt", json={"prompt": load}))["node_errors"]["1"]
        if bad not in (secret, "%2e%2e/x", ".."):  # plain names inside the output folder (".._00001_.png")
            save = txt2img_api()
            save["7"]["inputs"]["filename_prefix"] = bad
            assert assert_clear_4xx(server.http.post("/prompt", json={"prompt": save}))["node_errors"]["7"]
        ckpt = txt2img_api()
        ckpt["1"]["inputs"]["ckpt_name"] = bad
        assert assert_clear_4xx(server.http.post("/prompt", json={"prompt": ckpt}))["node_errors"]["1"]
        if bad not in (secret, "%2e%2e/x"):
            assert_clear_4xx(server.http.get("/api/userdata", params={"dir": bad}))
            assert_clear_4xx(server.http.post(f"/api/userdata/{quote(bad, safe='')}", content=b"{}"))
        assert_clear_4xx(server.http.get(f"/api/workflows/{quote(bad, safe='')}"))
    assert not (server.data_dir.parent / "x.png").exists() and not Path("/etc/x.png").exists()


def post_json(server: ServerProcess, route: str, body: object) -> httpx.Response:
    """Python's JSON, NaN and Infinity included (the server must refuse them cleanly)."""
    return server.http.post(route, content=json.dumps(body), headers={"content-type": "application/json"})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                                       max_size=4), max_leaves=25),
       st.sampled_from(["1", "5", "7"]), st.sampled_from(list(txt2img_api()["5"]["inputs"])))
def test_fuzz_prompt_never_500(server: ServerProcess, junk: object, node: str, name: str) -> None:
    for body in ({"prompt": junk}, {"prompt": {"1": {"class_type": "Sampler", "inputs": junk}}}, junk):
        response = post_json(server, "/prompt", body)
        assert response.status_code < 500, response.text[:300]
        if response.status_code == 200:
            server.http.post("/queue", json={"delete": [response.json()["prompt_id"]]})
    graph = txt2img_api()
    graph[node]["inputs"][name] = junk
    response = post_json(server, "/prompt", {"prompt": graph, "prompt_id": None})
    assert response.status_code < 500, response.text[:300]
    if response.status_code == 200:
        server.http.post("/queue", json={"delete": [response.json()["prompt_id"]]})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2048), st.text(max_size=30), st.text(max_size=30))
def test_fuzz_uploads_never_500(server: ServerProcess, data: bytes, name: str, subfolder: str) -> None:
    for route in ("/upload/image", "/upload/mask"):
        response = server.http.post(route, data={"subfolder": subfolder, "original_ref": name},
                                    files={"image": (name or "x", data, "image/png")})
        assert response.status_code < 500, response.text[:300]


def test_token_required_off_loopback(tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "serve", "--host", "0.0.0.0", "--port",
                              str(free_port()), "--data-dir", str(tmp_path / "refused")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "--token" in refused.stderr
    guarded = ServerProcess(tmp_path / "data", host="0.0.0.0", token="s3cret-token").start()
    try:
        bare = httpx.Client(base_url=guarded.base, timeout=30)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            for route in ("/prompt", "/api/queue", "/object_info", "/", "/docs"):
                response = bare.get(route, headers=headers)
                assert response.status_code == 401 and "token" in response.json()["error"]["message"]
        assert bare.post("/prompt", json={"prompt": txt2img_api()}).status_code == 401
        assert bare.get("/api/queue", params={"token": "wrong"}).status_code == 401
        assert bare.get("/api/queue", params={"token": "s3cret-token"}).status_code == 200
        assert guarded.http.get("/api/queue").status_code == 200  # bearer header
        with pytest.raises(InvalidStatus):
            connect(f"ws://127.0.0.1:{guarded.port}/ws?clientId=a").close()
        with connect(f"ws://127.0.0.1:{guarded.port}/ws?clientId=a&token=s3cret-token") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "status"
        foreign = guarded.http.post("/prompt", json={"prompt": txt2img_api()}, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        bare.close()
    finally:
        guarded.stop()
