"""Helpers of the server tests: the real server as a subprocess on a free loopback port, test graphs.

One server (`server`) is shared by the protocol tests: it loads the test plugin folder
(`plugins/`: a slow interruptible node and failing ones) and the repository's saved workflows.
Tests that need their own server (restart, token) start one with `ServerProcess`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).resolve().parent / "plugins"
WORKFLOWS = ROOT / "workflows"
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`ldmgraph serve` in a subprocess; `http` is an httpx client bound to it."""

    def __init__(self, data_dir: Path, *extra: str, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.host = host
        self.token = token
        self.args = [sys.executable, "-m", "ldmgraph.cli", "serve", "--host", host, "--port", str(self.port),
                     "--data-dir", str(data_dir), "--plugin-dir", str(PLUGINS), "--workflows-dir", str(WORKFLOWS),
                     *(["--token", token] if token else []), *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, timeout=60, headers=headers)

    def start(self) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.data_dir.parent / f"server-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            try:
                if self.http.get("/api/system_stats", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start in {START_TIMEOUT} s: {self.read_log()}")

    def read_log(self) -> str:
        return (self.data_dir.parent / f"server-{self.port}.log").read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no clean-up runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.http.close()
        if getattr(self, "log", None):
            self.log.close()

    # -- helpers ----------------------------------------------------------------------------------
    def ws_url(self, client_id: str, **query: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        return f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}{extra}"

    def submit(self, prompt: dict[str, Any], client_id: str | None = None, **extra: Any) -> dict[str, Any]:
        response = self.http.post("/prompt", json={"prompt": prompt, "client_id": client_id, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    def job(self, prompt_id: str) -> dict[str, Any]:
        return self.http.get(f"/api/jobs/{prompt_id}").json()

    def wait_status(self, prompt_id: str, statuses: set[str], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(prompt_id)
            if job.get("ldmgraph", {}).get("status") in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {prompt_id} never reached {statuses}: {json.dumps(self.job(prompt_id))[:500]}")


# -- graphs -----------------------------------------------------------------------------------------
TXT2IMG = "ldmgraph-shapes-txt2img.safetensors"


def txt2img_api(seed: int = 1, steps: int = 1, size: int = 32, prefix: str = "served") -> dict[str, Any]:
    """A text-to-image graph of ldmgraph node types in ComfyUI's API shape (what the editor sends)."""
    return {
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": TXT2IMG}},
        "2": {"class_type": "TextEncode", "inputs": {"text_encoder": ["1", 1], "text": "a red circle on the left"}},
        "3": {"class_type": "TextEncode", "inputs": {"text_encoder": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatent", "inputs": {"width": size, "height": size, "batch_size": 1, "vae": ["1", 2]}},
        "5": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent": ["4", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                  "sampler": "euler", "schedule": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"vae": ["1", 2], "latent": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def wait_graph(ticks: int = 10, tick: float = 0.1) -> dict[str, Any]:
    return {"1": {"class_type": "TestWait", "inputs": {"ticks": ticks, "tick": tick}}}


def comfy_graph(seed: int = 5, output: str = "SaveImage", prefix: str = "ComfyUI") -> dict[str, Any]:
    """The graph of ComfyUI's script examples (their prompt_text, with their positive prompt and seed 5
    set as they set them), with only the checkpoint (the bundled model), the size and the steps changed."""
    graph: dict[str, Any] = {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": seed, "steps": 1}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 32, "width": 32}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality man"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }
    if output == "SaveImageWebsocket":
        graph["save_image_websocket_node"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    else:
        graph["9"] = {"class_type": output, "inputs": {"images": ["8", 0], **(
            {"filename_prefix": prefix} if output == "SaveImage" else {})}}
    return graph


def wait_history(server: ServerProcess, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.http.get(f"/history/{prompt_id}").json()
        if prompt_id in entry:
            return entry[prompt_id]  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"job {prompt_id} did not finish: {server.job(prompt_id)}")
