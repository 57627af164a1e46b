"""ComfyUI's protocol against the real server: submit, websocket events, history, files, queue control."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image
from server_helpers import ROOT, ServerProcess, txt2img_api, wait_graph
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def collect(ws: Any, prompt_id: str, timeout: float = 120.0) -> list[Any]:
    """Messages for one job until ComfyUI's end marker (`executing` with node null); binary frames as bytes."""
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(raw, bytes):
            messages.append(raw)
            continue
        message = json.loads(raw)
        if message["data"].get("prompt_id") not in (None, prompt_id):
            continue
        messages.append(message)
        if message["type"] == "executing" and message["data"]["node"] is None \
                and message["data"].get("prompt_id") == prompt_id:
            return messages
    raise AssertionError(f"no end of job {prompt_id}: {[m if isinstance(m, bytes) else m['type'] for m in messages]}")


def kinds(messages: list[Any]) -> list[str]:
    return ["<binary>" if isinstance(m, bytes) else m["type"] for m in messages]


def test_submit_events_history_and_output(server: ServerProcess) -> None:
    client = uuid.uuid4().hex
    with connect(server.ws_url(client)) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "status" and hello["data"]["sid"] == client
        # latent previews are off unless asked for: the job asks, as the editor does with its setting
        reply = server.submit(txt2img_api(seed=11, steps=2), client, extra_data={"preview_method": "auto"})
        assert set(reply) == {"prompt_id", "number", "node_errors"} and reply["node_errors"] == {}
        messages = collect(ws, reply["prompt_id"])
    order = [k for k in kinds(messages) if k not in ("status", "progress_state", "execution_cached")]
    assert order[0] == "execution_start"
    assert order.index("progress") < order.index("executed") < order.index("execution_success")
    assert order[-1] == "executing"
    progress = [m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "progress"]
    # (the checkpoint loader reports its parts too when this job is the first to load the model)
    assert [(p["value"], p["max"], p["node"]) for p in progress if p["node"] != "1"] == [(1, 2, "5"), (2, 2, "5")]
    executing = [m["data"]["node"] for m in messages if not isinstance(m, bytes) and m["type"] == "executing"]
    assert executing[:-1] and set(executing[:-1]) <= set(txt2img_api()) and executing[-1] is None
    frames = [m for m in messages if isinstance(m, bytes)]
    assert frames and all(f[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02" for f in frames)  # preview image, PNG
    # a latent preview per sampler step (at latent size: 32 px / 4), each after its progress message; the
    # saved image is not sent again as a preview (clients collecting frames would take it for another image)
    assert [Image.open(io.BytesIO(f[8:])).size for f in frames] == [(8, 8), (8, 8)]
    order = kinds(messages)
    assert order.index("progress") < order.index("<binary>") < order.index("executed")
    assert order.count("execution_cached") == 1  # one message listing every cache hit, as ComfyUI
    executed = next(m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "executed")
    image = executed["output"]["images"][0]
    assert executed["node"] == "7" and image["type"] == "output" and image["subfolder"] == ""

    history = server.http.get(f"/history/{reply['prompt_id']}").json()[reply["prompt_id"]]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert history["prompt"][1] == reply["prompt_id"] and history["prompt"][4] == ["7"]
    assert history["outputs"]["7"]["images"] == [image]
    assert [m[0] for m in history["status"]["messages"]][::len(history["status"]["messages"]) - 1] == [
        "execution_start", "execution_success"]
    # the same history under /api, and in the full listing
    assert reply["prompt_id"] in server.http.get("/api/history").json()

    view = server.http.get("/view", params=image)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(view.content)))
    on_disk = server.data_dir / "output" / image["subfolder"] / image["filename"]
    assert pixels.shape == (32, 32, 3) and view.content == on_disk.read_bytes()
    assert pixels.std() > 1.0  # a picture, not a constant

    job = server.job(reply["prompt_id"])
    assert job["status"] == "completed" and job["outputs_count"] == 1
    timings = job["ldmgraph"]["timings"]
    assert timings["run_s"] > 0 and timings["nodes"]["5"] > 0
    assert job["ldmgraph"]["files"][0]["filename"] == image["filename"]


def test_ldmgraph_document_and_comfyui_core_graph(server: ServerProcess) -> None:
    doc = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    doc["nodes"]["sampler"]["inputs"].update(steps=1, seed=5)
    doc["nodes"]["latent"]["inputs"].update(width=32, height=32)
    first = server.submit(doc)
    comfy = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ldmgraph-shapes-txt2img.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy", "images": ["8", 0]}},
    }
    second = server.submit(comfy)
    for reply in (first, second):
        job = server.wait_status(reply["prompt_id"], {"success", "error"})
        assert job["ldmgraph"]["status"] == "success", job["ldmgraph"]["error"]
    assert server.job(second["prompt_id"])["ldmgraph"]["source"] == "comfyui"
    assert list(server.job(second["prompt_id"])["outputs"]) == ["9"]


def test_validation_error_in_node_errors_shape(server: ServerProcess) -> None:
    graph = txt2img_api()
    graph["5"]["inputs"]["steps"] = 0
    graph["5"]["inputs"]["sampler"] = "no_such_sampler"
    response = server.http.post("/prompt", json={"prompt": graph})
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error", "node_errors"} and set(body["error"]) == {"type", "message", "details", "extra_info"}
    node = body["node_errors"]["5"]
    assert node["class_type"] == "Sampler" and node["dependent_outputs"] == []
    errors = {e["extra_info"]["input_name"]: e for e in node["errors"]}
    assert errors["steps"]["type"] == "out_of_bounds" and "minimum" in errors["steps"]["message"]
    assert errors["sampler"]["type"] == "not_in_choices"
    unknown = server.http.post("/api/prompt", json={"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert unknown.status_code == 400
    assert unknown.json()["node_errors"]["1"]["errors"][0]["type"] == "unknown_node_type"


def test_object_info_describes_every_node(server: ServerProcess) -> None:
    from server_helpers import PLUGINS

    from ldmgraph.plugins import PluginManager

    registry = PluginManager(plugin_dirs=[PLUGINS]).registry
    from ldmgraph.server.protocol import served_name

    info = server.http.get("/object_info").json()
    ours = {served_name(name): name for name in registry.nodes}  # ldmgraph.VAEDecode beside ComfyUI's VAEDecode
    assert set(ours) <= set(info)
    sampler = info["Sampler"]
    spec = registry.nodes["Sampler"].spec
    steps = sampler["input"]["required"]["steps"]
    assert steps[0] == "INT" and steps[1]["min"] == spec.inputs["steps"].ge and steps[1]["max"] == spec.inputs["steps"].le
    assert steps[1]["default"] == spec.inputs["steps"].default
    assert sampler["input"]["required"]["sampler"][0] == registry.choices("samplers")
    assert sampler["output"] == ["LATENT"] and sampler["output_name"] == ["latent"]
    assert sampler["output_is_list"] == [False] and sampler["output_node"] is False
    assert sampler["category"].startswith("ldmgraph/") and sampler["python_module"] == "nodes"
    assert info["SaveImage"]["output_node"] is True
    for served, name in ours.items():
        entry, declared = info[served], registry.nodes[name].spec.inputs
        listed = entry["input_order"]["required"] + entry["input_order"]["optional"]
        assert sorted(listed) == sorted(declared), name
    one = server.http.get("/api/object_info/LoadImage").json()
    assert one["LoadImage"]["input"]["required"]["image"][1]["image_upload"] is True


def test_cancel_a_queued_job_and_interrupt_a_running_one(server: ServerProcess) -> None:
    client = uuid.uuid4().hex
    with connect(server.ws_url(client)) as ws:
        ws.recv(timeout=10)
        running = server.submit(wait_graph(ticks=200, tick=0.05), client)
        queued = server.submit(wait_graph(ticks=1, tick=0.0), client)
        server.wait_status(running["prompt_id"], {"running"})
        pending = server.http.get("/queue").json()["queue_pending"]
        assert queued["prompt_id"] in [item[1] for item in pending]
        assert server.http.post("/queue", json={"delete": [queued["prompt_id"]]}).status_code == 200
        assert queued["prompt_id"] not in [item[1] for item in server.http.get("/queue").json()["queue_pending"]]
        while True:  # interrupt once the node is really running
            raw = ws.recv(timeout=30)
            if not isinstance(raw, bytes) and json.loads(raw)["type"] == "progress":
                break
        other = server.http.post("/interrupt", json={"prompt_id": "not-this-one"}).json()
        assert other == {"interrupted": False}
        assert server.http.post("/interrupt", json={"prompt_id": running["prompt_id"]}).json() == {"interrupted": True}
        messages = collect(ws, running["prompt_id"])
    assert "execution_interrupted" in kinds(messages) and "execution_success" not in kinds(messages)
    job = server.wait_status(running["prompt_id"], {"interrupted"})
    assert job["ldmgraph"]["requeueable"] is True
    assert server.job(queued["prompt_id"])["ldmgraph"]["status"] == "cancelled"
    assert server.job(queued["prompt_id"])["ldmgraph"]["runs"] == 0  # never ran
    history = server.http.get(f"/history/{running['prompt_id']}").json()[running["prompt_id"]]
    assert history["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in history["status"]["messages"]]


def test_failing_job_is_recorded_and_a_dead_worker_is_restarted(server: ServerProcess) -> None:
    before = server.http.get("/system_stats").json()["worker"]["restarts"]
    failing = server.submit({"1": {"class_type": "TestFail", "inputs": {}}})
    job = server.wait_status(failing["prompt_id"], {"error"})
    assert job["execution_error"]["exception_message"] == "this node always fails"
    assert job["execution_error"]["node_id"] == "1" and job["status"] == "failed"
    killer = server.submit({"1": {"class_type": "TestKillWorker", "inputs": {}}})
    after_kill = server.submit(wait_graph(ticks=1, tick=0.0))
    dead = server.wait_status(killer["prompt_id"], {"error"})
    assert dead["ldmgraph"]["error"]["exception_type"] == "WorkerDied"
    assert server.wait_status(after_kill["prompt_id"], {"success"})["ldmgraph"]["runs"] == 1
    stats = server.http.get("/system_stats").json()["worker"]
    assert stats["restarts"] == before + 1 and stats["alive"] is True and "SystemExit" in stats["last_death"]


def test_saved_workflows_listed_with_parameter_schema_and_run(server: ServerProcess) -> None:
    listing = {w["name"]: w for w in server.http.get("/api/workflows").json()}
    assert {"txt2img", "img2img", "inpaint", "superres"} <= set(listing)
    steps = listing["txt2img"]["parameters"]["properties"]["steps"]
    assert steps["type"] == "integer" and steps["minimum"] == 1 and steps["default"] == 25
    assert "dpmpp_2m" in listing["txt2img"]["parameters"]["properties"]["sampler"]["enum"]
    bad = server.http.post("/api/workflows/txt2img/run", json={"parameters": {"steps": -3}})
    assert bad.status_code == 400 and bad.json()["node_errors"]
    unknown = server.http.post("/api/workflows/txt2img/run", json={"parameters": {"no_such": 1}})
    assert unknown.status_code == 400
    run = server.http.post("/api/workflows/img2img/run",
                           json={"parameters": {"steps": 1, "seed": 9, "prompt": "a green triangle"}})
    assert run.status_code == 200, run.text
    job = server.wait_status(run.json()["prompt_id"], {"success", "error"})
    assert job["ldmgraph"]["status"] == "success", job["ldmgraph"]["error"]
    url = job["ldmgraph"]["files"][0]["url"]
    assert server.http.get(url).status_code == 200


def test_previews_as_json_for_clients_without_binary_frames(server: ServerProcess) -> None:
    client = uuid.uuid4().hex
    with connect(server.ws_url(client, previews="json")) as ws:
        ws.recv(timeout=10)
        reply = server.submit(txt2img_api(seed=21), client, extra_data={"preview_method": "latent2rgb"})
        messages = collect(ws, reply["prompt_id"])
    assert not any(isinstance(m, bytes) for m in messages)
    previews = [m["data"] for m in messages if m["type"] == "preview"]
    assert all(p["mime_type"] == "image/png" and p["prompt_id"] == reply["prompt_id"] for p in previews)
    sizes = [(p["node"], Image.open(io.BytesIO(base64.b64decode(p["image"]))).size) for p in previews]
    assert sizes == [("5", (8, 8))]  # the sampler's step (latent size); never the saved image


def test_upload_then_load_image_in_a_graph(server: ServerProcess) -> None:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    escaping = server.http.post("/upload/image", files={"image": ("../../evil.png", buffer.getvalue(), "image/png")})
    assert escaping.status_code == 400 and escaping.json()["error"]["type"] == "invalid_filename"
    upload = server.http.post("/upload/image", files={"image": ("my picture.png", buffer.getvalue(), "image/png")})
    assert upload.status_code == 200
    name = upload.json()["name"]
    assert name == "my picture.png" and upload.json() == {"name": name, "subfolder": "", "type": "input"}
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}}}
    job = server.wait_status(server.submit(graph)["prompt_id"], {"success", "error"})
    out = job["ldmgraph"]["files"][0]
    saved = np.asarray(Image.open(io.BytesIO(server.http.get(out["url"]).content)))
    assert np.array_equal(saved, 255 - np.asarray(picture))
    assert server.http.get("/view", params={"filename": name, "type": "input"}).status_code == 200
    assert name in server.http.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]


def test_requeue_interrupted_job_runs_it_again(server: ServerProcess) -> None:
    reply = server.submit(wait_graph(ticks=100, tick=0.05))
    server.wait_status(reply["prompt_id"], {"running"})
    time.sleep(0.2)
    assert server.http.post("/api/interrupt").json() == {"interrupted": True}
    server.wait_status(reply["prompt_id"], {"interrupted"})
    again = server.http.post(f"/api/jobs/{reply['prompt_id']}/requeue")
    assert again.status_code == 200
    assert server.http.post(f"/api/jobs/{reply['prompt_id']}/requeue").status_code == 409  # pending now
    job = server.wait_status(reply["prompt_id"], {"success"}, timeout=60)
    assert job["ldmgraph"]["runs"] == 2


def test_queue_front_and_status_endpoints(server: ServerProcess) -> None:
    blocker = server.submit(wait_graph(ticks=40, tick=0.05))
    server.wait_status(blocker["prompt_id"], {"running"})
    back = server.submit(wait_graph(ticks=1, tick=0.0))
    front = server.submit(wait_graph(ticks=1, tick=0.0), front=True)
    pending = [item[1] for item in server.http.get("/queue").json()["queue_pending"]]
    assert pending.index(front["prompt_id"]) < pending.index(back["prompt_id"])
    assert server.http.get("/prompt").json()["exec_info"]["queue_remaining"] >= 2
    jobs = server.http.get("/api/jobs", params={"status": "in_progress,pending"}).json()
    assert {j["id"] for j in jobs["jobs"]} >= {front["prompt_id"], back["prompt_id"]}
    assert jobs["pagination"]["total"] >= 2
    for reply in (blocker, back, front):
        server.wait_status(reply["prompt_id"], {"success"}, timeout=60)
    assert server.job(front["prompt_id"])["ldmgraph"]["finished"] <= server.job(back["prompt_id"])["ldmgraph"]["finished"]
    assert server.http.get("/embeddings").json() == []
    assert "ldmgraph-shapes-txt2img.safetensors" in server.http.get("/models/checkpoints").json()
    assert server.http.post("/free", json={"unload_models": False, "free_memory": True}).status_code == 200
    openapi = server.http.get("/openapi.json").json()
    assert "/api/prompt" in openapi["paths"] and "/api/workflows/{name}/run" in openapi["paths"]


def test_mask_upload_applies_its_alpha_to_the_original(server: ServerProcess) -> None:
    original = Image.fromarray(np.full((16, 16, 3), (200, 100, 50), np.uint8))
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    ref = server.http.post("/upload/image", files={"image": ("o.png", buffer.getvalue(), "image/png")}).json()
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[:, 8:, 3] = 255  # right half opaque: kept; left half transparent: to repaint
    buffer = io.BytesIO()
    Image.fromarray(mask, "RGBA").save(buffer, format="PNG")
    original_ref = {"filename": ref["name"], "subfolder": ref["subfolder"], "type": ref["type"]}  # as the editor
    reply = server.http.post("/upload/mask", data={"original_ref": json.dumps(original_ref)},
                             files={"image": ("m.png", buffer.getvalue(), "image/png")})
    assert reply.status_code == 200, reply.text
    combined = np.asarray(Image.open(io.BytesIO(server.http.get("/view", params={
        "filename": reply.json()["name"], "type": "input"}).content)))
    assert combined.shape == (16, 16, 4)
    assert (combined[..., :3] == (200, 100, 50)).all()
    assert (combined[:, :8, 3] == 0).all() and (combined[:, 8:, 3] == 255).all()


def test_settings_user_data_and_saved_workflows_in_the_editors_format(server: ServerProcess) -> None:
    assert server.http.post("/api/settings/Comfy.Test.Value", json={"a": [1, 2]}).status_code == 200
    assert server.http.get("/api/settings/Comfy.Test.Value").json() == {"a": [1, 2]}
    assert server.http.get("/api/settings").json()["Comfy.Test.Value"] == {"a": [1, 2]}
    body = b'{"nodes": [], "links": [], "version": 0.4}'
    assert server.http.post("/api/userdata/workflows%2Fmine.json", content=body).status_code == 200
    assert server.http.get("/api/userdata/workflows%2Fmine.json").content == body
    listing = server.http.get("/api/userdata", params={"dir": "workflows", "recurse": "true"}).json()
    assert "mine.json" in listing and "txt2img.json" in listing  # a user file and a saved workflow
    moved = server.http.post("/api/userdata/workflows%2Fmine.json/move/workflows%2Fours.json")
    assert moved.status_code == 200 and server.http.get("/api/userdata/workflows%2Fmine.json").status_code == 404
    assert server.http.delete("/api/userdata/workflows%2Fours.json").status_code == 204

    doc = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    ui = server.http.get("/api/userdata/workflows%2Ftxt2img.json").json()
    by_title = {n["title"]: n for n in ui["nodes"]}
    assert {n.get("title") or k for k, n in doc["nodes"].items()} == set(by_title)
    linked = sum(isinstance(v, dict) for n in doc["nodes"].values() for v in n["inputs"].values())
    assert len(ui["links"]) == linked
    ids = {n["id"]: n for n in ui["nodes"]}
    for _link, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert ids[src]["outputs"][src_slot]["type"] == kind == ids[dst]["inputs"][dst_slot]["type"]
        assert ids[src]["pos"][0] < ids[dst]["pos"][0]  # data flows left to right
    sampler = by_title["sampler"]
    assert sampler["widgets_values"][:3] == [42, "fixed", 25]  # seed, its "control after generate", steps
