"""The queue under load (200 jobs, 4 clients) and across a SIGKILL of the server."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image
from server_helpers import ServerProcess, txt2img_api, wait_graph

pytestmark = pytest.mark.slow
JOBS, CLIENTS = 200, 4


def test_200_jobs_from_4_clients_all_complete_once(server: ServerProcess) -> None:
    ids: list[list[str]] = [[] for _ in range(CLIENTS)]
    errors: list[str] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=server.base, timeout=60) as http:
            for j in range(JOBS // CLIENTS):
                seed = 1000 + k * JOBS + j
                response = http.post("/prompt", json={"prompt": txt2img_api(seed=seed, size=32, prefix=f"load{k}"),
                                                      "client_id": f"load-{k}"})
                if response.status_code != 200:
                    errors.append(response.text)
                    continue
                ids[k].append(response.json()["prompt_id"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    submitted = [i for chunk in ids for i in chunk]
    assert len(set(submitted)) == JOBS
    deadline = time.monotonic() + 600
    while server.http.get("/prompt").json()["exec_info"]["queue_remaining"] and time.monotonic() < deadline:
        time.sleep(0.5)
    history = server.http.get("/history").json()
    files: Counter[tuple[str, str]] = Counter()
    loads = 0
    for prompt_id in submitted:
        entry = history[prompt_id]  # none lost
        assert entry["status"]["status_str"] == "success"
        job = server.job(prompt_id)
        assert job["ldmgraph"]["runs"] == 1  # none run twice
        loads += "1" in job["ldmgraph"]["timings"]["nodes"]  # node "1" is the CheckpointLoader
        images = entry["outputs"]["7"]["images"]
        assert len(images) == 1
        files[(images[0]["subfolder"], images[0]["filename"])] += 1
    assert len(files) == JOBS and set(files.values()) == {1}  # each job its own file
    assert loads <= 1  # the executor and its caches outlive jobs: the checkpoint loads once at most
    for subfolder, filename in list(files)[:: JOBS // 10]:
        response = server.http.get("/view", params={"filename": filename, "subfolder": subfolder})
        assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    written = sorted(p for p in (server.data_dir / "output").rglob("load*.png"))
    assert len(written) == JOBS


def test_restart_after_sigkill_keeps_queue_and_history(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        first.http.post("/api/settings/Comfy.Test.Kept", json="yes")
        done = first.submit(wait_graph(ticks=1, tick=0.0))
        first.wait_status(done["prompt_id"], {"success"})
        running = first.submit(wait_graph(ticks=400, tick=0.05))
        queued = [first.submit(wait_graph(ticks=2, tick=0.01)) for _ in range(3)]
        first.wait_status(running["prompt_id"], {"running"})
        first.kill()
    finally:
        first.stop()
    second = ServerProcess(data).start()
    try:
        for reply in queued:
            assert second.wait_status(reply["prompt_id"], {"success"}, timeout=60)["ldmgraph"]["runs"] == 1
        cut = second.job(running["prompt_id"])
        assert cut["ldmgraph"]["status"] == "interrupted" and cut["ldmgraph"]["requeueable"]
        assert cut["execution_error"]["exception_type"] == "ServerRestart"
        history = second.http.get("/history").json()
        assert history[done["prompt_id"]]["status"]["status_str"] == "success"
        assert running["prompt_id"] in history
        assert second.http.get("/api/settings/Comfy.Test.Kept").json() == "yes"
        assert second.http.post(f"/api/jobs/{running['prompt_id']}/requeue").status_code == 200
        assert second.wait_status(running["prompt_id"], {"running"})["ldmgraph"]["runs"] == 2
        assert second.http.post("/interrupt").json() == {"interrupted": True}
    finally:
        second.stop()
