"""ComfyUI's protocol details its clients and editor rely on, against the real server.

File names counted across jobs in the output folder (ComfyUI's ``folder_paths.get_save_image_path``),
``PreviewImage`` in ``temp``, one ``execution_cached`` message, previews only when asked and only to
the job's own client, ``/view``'s ``preview=`` and ``channel=``, uploads under the client's name,
the endpoints its editor calls, ComfyUI's PNG text chunks, and ``ldmgraph run`` of a ComfyUI PNG.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from server_helpers import ROOT, TXT2IMG, ServerProcess, comfy_graph, wait_history
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def frames_and_messages(ws: Any, prompt_id: str | None, quiet_for: float = 1.0, timeout: float = 120.0) -> list[Any]:
    """Everything a websocket receives until the job ends (or, with no prompt_id, until it is quiet)."""
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            raw = ws.recv(timeout=quiet_for if prompt_id is None else max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return received
        received.append(raw if isinstance(raw, bytes) else json.loads(raw))
        last = received[-1]
        if (prompt_id is not None and isinstance(last, dict) and last["type"] == "executing"
                and last["data"]["node"] is None and last["data"].get("prompt_id") == prompt_id):
            return received
    raise AssertionError("no end of job")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# -- outputs ------------------------------------------------------------------------------------------
def test_save_image_counter_continues_across_jobs_in_the_output_folder(server: ServerProcess) -> None:
    """ComfyUI's rule: the next counter follows the highest `{prefix}_NNNNN_` already in the folder;
    no folder per job, so /view finds the file without a subfolder; a prefix may name one."""
    output = server.data_dir / "output"
    (output / "counted_00041_.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))  # left by someone else
    names = []
    for seed in (1, 2):
        reply = server.submit(comfy_graph(seed=seed, prefix="counted"))
        names.append(wait_history(server, reply["prompt_id"])["outputs"]["9"]["images"][0])
    assert [n["filename"] for n in names] == ["counted_00042_.png", "counted_00043_.png"]
    assert {n["subfolder"] for n in names} == {""}
    view = server.http.get("/view", params={"filename": "counted_00043_.png"})
    assert view.status_code == 200 and view.content == (output / "counted_00043_.png").read_bytes()
    sub = wait_history(server, server.submit(comfy_graph(seed=3, prefix="album/counted"))["prompt_id"])
    assert sub["outputs"]["9"]["images"] == [{"filename": "counted_00001_.png", "subfolder": "album", "type": "output"}]


def test_preview_image_goes_to_temp_with_type_temp(server: ServerProcess) -> None:
    client = uuid.uuid4().hex
    with connect(server.ws_url(client)) as ws:
        ws.recv(timeout=10)
        reply = server.submit(comfy_graph(seed=4, output="PreviewImage"), client)
        received = frames_and_messages(ws, reply["prompt_id"])
    executed = [m["data"] for m in received if isinstance(m, dict) and m["type"] == "executed"]
    assert len(executed) == 1 and executed[0]["node"] == "9"
    image = executed[0]["output"]["images"][0]
    assert image["type"] == "temp" and image["subfolder"] == ""
    assert wait_history(server, reply["prompt_id"])["outputs"] == {"9": {"images": [image]}}
    assert (server.data_dir / "temp" / image["filename"]).is_file()
    assert not list((server.data_dir / "output").rglob(image["filename"]))
    view = server.http.get("/view", params={"filename": image["filename"], "type": "temp"})
    assert view.status_code == 200 and Image.open(io.BytesIO(view.content)).size == (32, 32)
    assert not [m for m in received if isinstance(m, bytes)]  # previews off by default, outputs never previews
    job = server.job(reply["prompt_id"])
    assert job["preview_output"]["type"] == "temp" and "type=temp" in job["ldmgraph"]["files"][0]["url"]
    assert server.http.get(job["ldmgraph"]["files"][0]["url"]).content == view.content


def test_execution_cached_is_one_message_listing_every_hit(server: ServerProcess) -> None:
    client = uuid.uuid4().hex
    graph = comfy_graph(seed=31, prefix="cached_twice")
    with connect(server.ws_url(client)) as ws:
        ws.recv(timeout=10)
        first = server.submit(graph, client)
        frames_and_messages(ws, first["prompt_id"])
        second = server.submit(graph, client)
        received = frames_and_messages(ws, second["prompt_id"])
    cached = [m["data"] for m in received if isinstance(m, dict) and m["type"] == "execution_cached"]
    assert len(cached) == 1 and sorted(cached[0]["nodes"]) == sorted(graph)
    # the cached SaveImage still reports its file, as ComfyUI reports a cached output node's images
    executed = [m["data"] for m in received if isinstance(m, dict) and m["type"] == "executed"]
    first_images = wait_history(server, first["prompt_id"])["outputs"]["9"]["images"]
    assert [e["output"]["images"] for e in executed] == [first_images]
    assert wait_history(server, second["prompt_id"])["outputs"]["9"]["images"] == first_images


def test_previews_only_when_asked_and_only_to_the_jobs_own_client(server: ServerProcess) -> None:
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    with connect(server.ws_url(mine)) as ws, connect(server.ws_url(other)) as bystander:
        ws.recv(timeout=10)
        bystander.recv(timeout=10)
        asked = server.submit(comfy_graph(seed=41, prefix="previews"), mine, extra_data={"preview_method": "auto"})
        received = frames_and_messages(ws, asked["prompt_id"])
        anonymous = server.submit(comfy_graph(seed=42, prefix="previews"), None,
                                  extra_data={"preview_method": "auto"})
        wait_history(server, anonymous["prompt_id"])
        seen_by_other = frames_and_messages(bystander, None)
        not_asked = server.submit(comfy_graph(seed=43, prefix="previews"), mine)
        quiet = frames_and_messages(ws, not_asked["prompt_id"])
    frames = [m for m in received if isinstance(m, bytes)]
    assert len(frames) == 1 and Image.open(io.BytesIO(frames[0][8:])).size == (8, 8)  # one step: a latent preview
    assert not [m for m in seen_by_other if isinstance(m, bytes)]  # neither the other client's job nor an anonymous one
    # (an anonymous job's messages go to every client, as ComfyUI sends them; another client's never)
    assert {m["data"].get("prompt_id") for m in seen_by_other if isinstance(m, dict)} <= {None, anonymous["prompt_id"]}
    assert not [m for m in quiet if isinstance(m, bytes)]


def test_preview_method_flag_turns_previews_on_for_every_job(roomy: ServerProcess) -> None:
    """serve --preview-method latent2rgb: a job that does not ask still gets its latent previews;
    one that asks for none ("none") gets none."""
    client = uuid.uuid4().hex
    with connect(roomy.ws_url(client)) as ws:
        ws.recv(timeout=10)
        default = roomy.submit(comfy_graph(seed=61, prefix="flag"), client)
        on = frames_and_messages(ws, default["prompt_id"])
        off = roomy.submit(comfy_graph(seed=62, prefix="flag"), client, extra_data={"preview_method": "none"})
        none = frames_and_messages(ws, off["prompt_id"])
    assert [Image.open(io.BytesIO(f[8:])).size for f in on if isinstance(f, bytes)] == [(8, 8)]
    assert not [f for f in none if isinstance(f, bytes)]


# -- files ----------------------------------------------------------------------------------------------
def test_uploads_keep_the_clients_name_with_comfyuis_rename_and_overwrite(server: ServerProcess) -> None:
    first, second = (np.full((8, 8, 3), value, np.uint8) for value in (10, 200))
    name = f"clash-{uuid.uuid4().hex[:8]}.png"

    def upload(array: np.ndarray, **form: str) -> dict[str, Any]:
        reply = server.http.post("/upload/image", data=form, files={"image": (name, png_bytes(array), "image/png")})
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    stem = name[:-4]
    assert upload(first)["name"] == name
    assert upload(first)["name"] == name  # the same content: the name it already has
    assert upload(second)["name"] == f"{stem} (1).png"
    assert upload(second, overwrite="true")["name"] == name
    stored = server.http.get("/view", params={"filename": name, "type": "input"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), second)
    assert upload(first, subfolder="masks") == {"name": name, "subfolder": "masks", "type": "input"}
    listed = server.http.get("/internal/files/input").json()
    assert name in listed and f"{stem} (1).png" in listed and "masks" not in listed  # files only, newest first
    assert listed.index(name) < listed.index(f"{stem} (1).png")


def test_view_preview_and_channel(server: ServerProcess) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 250, np.arange(16, dtype=np.uint8)[None, :] * 16
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    name = server.http.post("/upload/image", files={"image": (f"rgba-{uuid.uuid4().hex[:6]}.png", buffer.getvalue(),
                                                              "image/png")}).json()["name"]
    params = {"filename": name, "type": "input"}
    webp = server.http.get("/view", params={**params, "preview": "webp;50"})
    assert webp.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    jpeg = server.http.get("/view", params={**params, "preview": "jpeg;90"})
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).mode == "RGB"
    rgb = np.asarray(Image.open(io.BytesIO(server.http.get("/view", params={**params, "channel": "rgb"}).content)))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb, rgba[..., :3])
    alpha = np.asarray(Image.open(io.BytesIO(server.http.get("/view", params={**params, "channel": "a"}).content)))
    assert alpha.shape == (16, 16, 4) and np.array_equal(alpha[..., 3], rgba[..., 3]) and not alpha[..., :3].any()
    assert server.http.get("/view", params=params).content == buffer.getvalue()  # as stored: the client's bytes


def test_endpoints_the_editor_and_clients_call(server: ServerProcess) -> None:
    assert server.http.get("/models/loras").json() == ["ldmgraph-shapes-outlined.safetensors"]  # the bundled LoRA
    assert server.http.get("/api/models/upscale_models").json() == []
    assert TXT2IMG in server.http.get("/models/checkpoints").json()
    assert {"checkpoints", "loras", "vae", "embeddings", "controlnet"} <= set(server.http.get("/models").json())
    assert server.http.get("/models/no_such_folder").status_code == 404
    metadata = server.http.get("/view_metadata/checkpoints", params={"filename": TXT2IMG})
    assert metadata.status_code == 200 and json.loads(metadata.json()["ldmgraph"])["kind"] == "txt2img"
    assert server.http.get("/view_metadata/checkpoints", params={"filename": "nope.safetensors"}).status_code == 404
    paths = server.http.get("/internal/folder_paths").json()
    assert paths["loras"] == [] and paths["checkpoints"]
    assert str(ROOT) not in json.dumps(paths) and str(server.data_dir) not in json.dumps(paths)
    assert isinstance(server.http.get("/internal/logs").json(), str)
    assert set(server.http.get("/api/internal/logs/raw").json()) == {"entries", "size"}
    for kind in ("input", "output", "temp"):
        assert isinstance(server.http.get(f"/internal/files/{kind}").json(), list)
    assert server.http.get("/internal/files/userdata").status_code == 400


# -- PNG chunks ---------------------------------------------------------------------------------------
def test_saved_png_carries_comfyuis_prompt_and_workflow_and_ldmgraph_reruns_it(server: ServerProcess,
                                                                                tmp_path: Path) -> None:
    graph = comfy_graph(seed=51, prefix="chunks")
    ui_workflow = {"last_node_id": 9, "nodes": [{"id": 9, "type": "SaveImage"}], "links": [], "version": 0.4}
    reply = server.submit(graph, extra_data={"extra_pnginfo": {"workflow": ui_workflow}})
    image = wait_history(server, reply["prompt_id"])["outputs"]["9"]["images"][0]
    data = server.http.get("/view", params=image).content
    text = Image.open(io.BytesIO(data)).text  # type: ignore[attr-defined]
    assert json.loads(text["prompt"]) == graph and json.loads(text["workflow"]) == ui_workflow
    assert "ldmgraph:workflow" in text  # beside ldmgraph's own

    # a PNG as ComfyUI writes it (only its chunks) re-runs through the importer to the same pixels
    comfy_only = PngImagePlugin.PngInfo()
    comfy_only.add_text("prompt", text["prompt"])
    comfy_only.add_text("workflow", text["workflow"])
    source = tmp_path / "from_comfyui.png"
    Image.open(io.BytesIO(data)).save(source, pnginfo=comfy_only)
    assert set(Image.open(source).text) == {"prompt", "workflow"}  # type: ignore[attr-defined]
    run = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", str(source), "--output-dir",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    [again] = list((tmp_path / "out").rglob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(io.BytesIO(data))))
