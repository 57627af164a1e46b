"""`ldmgraph serve --backend ray` on a local 2-CPU Ray cluster started by the test session.

The server is the real subprocess, connected to the cluster by address. What a client sees must be
what the in-process worker gives: the websocket events in order, the output downloadable and
byte-identical to the local backend's (each actor runs torch with one thread, as the local server of
these tests does), interrupts that reach the actor, failures recorded, and an actor killed mid-job
costing a retry on the other actor, not the job.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from server_helpers import ServerProcess, txt2img_api, wait_graph
from test_protocol import collect, kinds
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_server(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    address = ray_cluster.get_runtime_context().gcs_address
    data = tmp_path_factory.mktemp("ray-server") / "data"
    process = ServerProcess(data, "--backend", "ray", "--address", address, "--workers", "2").start()
    yield process
    process.stop()


def _workers(server: ServerProcess) -> list[dict[str, Any]]:
    stats = server.http.get("/system_stats").json()["worker"]
    assert stats["backend"] == "ray"
    return stats["workers"]  # type: ignore[no-any-return]


def test_events_in_order_and_the_same_png_as_the_local_backend(ray_server: ServerProcess,
                                                                server: ServerProcess) -> None:
    graph = txt2img_api(seed=23, steps=2, prefix="onray")
    client = uuid.uuid4().hex
    with connect(ray_server.ws_url(client)) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "status"
        reply = ray_server.submit(graph, client)
        messages = collect(ws, reply["prompt_id"])
    order = [k for k in kinds(messages) if k not in ("status", "progress_state", "execution_cached", "<binary>")]
    assert order[0] == "execution_start" and order[-2:] == ["execution_success", "executing"]
    assert order.index("progress") < order.index("executed") < order.index("execution_success")
    progress = [m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "progress"]
    assert [(p["value"], p["max"]) for p in progress if p["node"] == "5"] == [(1, 2), (2, 2)]  # the sampler's
    executing = [m["data"]["node"] for m in messages if not isinstance(m, bytes) and m["type"] == "executing"]
    assert executing[:3] == ["1", "2", "3"] and executing[-1] is None
    assert not any(isinstance(m, bytes) for m in messages)  # previews off by default; saved images are no previews
    executed = next(m["data"] for m in messages if not isinstance(m, bytes) and m["type"] == "executed")
    image = executed["output"]["images"][0]
    on_ray = ray_server.http.get("/view", params=image)
    assert on_ray.status_code == 200 and on_ray.headers["content-type"] == "image/png"

    history = ray_server.http.get(f"/history/{reply['prompt_id']}").json()[reply["prompt_id"]]
    assert history["status"]["status_str"] == "success" and history["outputs"]["7"]["images"] == [image]
    timings = ray_server.job(reply["prompt_id"])["ldmgraph"]["timings"]
    assert timings["attempts"] == 1 and timings["worker"].startswith("w") and timings["nodes"]["5"] > 0

    local = server.submit(graph)
    done = server.wait_status(local["prompt_id"], {"success", "error"})
    local_png = server.http.get("/view", params=done["outputs"]["7"]["images"][0]).content
    ray_image, local_image = Image.open(io.BytesIO(on_ray.content)), Image.open(io.BytesIO(local_png))
    assert np.array_equal(np.asarray(ray_image), np.asarray(local_image))
    assert ray_image.text == local_image.text  # ldmgraph's chunks, and ComfyUI's prompt (added by the server)
    assert json.loads(ray_image.text["prompt"]) == graph


def test_interrupt_reaches_the_actor_and_failures_are_recorded(ray_server: ServerProcess) -> None:
    client = uuid.uuid4().hex
    with connect(ray_server.ws_url(client)) as ws:
        ws.recv(timeout=10)
        waiting = ray_server.submit(wait_graph(ticks=400, tick=0.05), client)["prompt_id"]
        while True:  # wait until it runs on an actor
            message = json.loads(ws.recv(timeout=120))
            if message["type"] == "progress" and message["data"]["prompt_id"] == waiting:
                break
        assert ray_server.http.post("/interrupt", json={"prompt_id": waiting}).json() == {"interrupted": True}
        messages = collect(ws, waiting, timeout=30)
    assert "execution_interrupted" in kinds(messages)
    job = ray_server.job(waiting)["ldmgraph"]
    assert job["status"] == "interrupted" and job["requeueable"] and job["timings"]["run_s"] < 15

    failing = ray_server.submit({"1": {"class_type": "TestFail", "inputs": {}}})["prompt_id"]
    job = ray_server.wait_status(failing, {"error", "success"}, timeout=60)["ldmgraph"]
    assert job["status"] == "error" and job["timings"]["attempts"] == 1  # a job's own error is not retried
    assert job["error"]["exception_type"] == "ValueError" and "always fails" in job["error"]["exception_message"]
    assert job["error"]["node_id"] == "1"


def test_an_actor_killed_mid_job_costs_a_retry_not_the_job(ray_server: ServerProcess) -> None:
    restarts = ray_server.http.get("/system_stats").json()["worker"]["restarts"]
    job_id = ray_server.submit(wait_graph(ticks=30, tick=0.05))["prompt_id"]
    deadline = time.monotonic() + 60
    while not (busy := [w for w in _workers(ray_server) if w["running"] and w["alive"]]):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    os.kill(int(busy[0]["worker"].rsplit(":", 1)[1]), signal.SIGKILL)  # the actor's process crashes

    job = ray_server.wait_status(job_id, {"success", "error"}, timeout=120)["ldmgraph"]
    assert job["status"] == "success", job["error"]
    assert job["timings"]["attempts"] == 2 and "died" in job["timings"]["retried"][0]
    assert not job["timings"]["worker"].startswith(busy[0]["name"] + "@")
    deadline = time.monotonic() + 60
    while (stats := ray_server.http.get("/system_stats").json()["worker"])["restarts"] != restarts + 1:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert sum(w["alive"] for w in stats["workers"]) == 2  # the dead actor was replaced



def test_sigkill_of_the_server_keeps_the_queue_and_marks_the_running_jobs(ray_server: ServerProcess,
                                                                         ray_cluster: Any) -> None:
    """Last in this module: it kills the module's server and restarts it on the same data folder."""
    running = [ray_server.submit(wait_graph(ticks=400, tick=0.05))["prompt_id"] for _ in range(2)]  # one per actor
    queued = [ray_server.submit(wait_graph(ticks=2, tick=0.01))["prompt_id"] for _ in range(2)]
    for job_id in running:
        ray_server.wait_status(job_id, {"running"})
    ray_server.kill()
    address = ray_cluster.get_runtime_context().gcs_address
    second = ServerProcess(ray_server.data_dir, "--backend", "ray", "--address", address, "--workers", "2").start()
    try:
        for job_id in queued:
            assert second.wait_status(job_id, {"success"}, timeout=120)["ldmgraph"]["runs"] == 1
        for job_id in running:
            cut = second.job(job_id)
            assert cut["ldmgraph"]["status"] == "interrupted" and cut["ldmgraph"]["requeueable"]
            assert cut["execution_error"]["exception_type"] == "ServerRestart"
        assert second.http.post(f"/api/jobs/{running[0]}/requeue").status_code == 200
        assert second.wait_status(running[0], {"running"})["ldmgraph"]["runs"] == 2
        assert second.http.post("/interrupt", json={"prompt_id": running[0]}).json() == {"interrupted": True}
        assert second.wait_status(running[0], {"interrupted"}, timeout=60)["ldmgraph"]["runs"] == 2
    finally:
        second.stop()
