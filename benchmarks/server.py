"""The server's cost per job: submit latency with 4 clients, throughput, and CPU overhead per job.

`ldmgraph serve` runs in a subprocess as a user starts it (one torch thread). Four client processes (so that clients do not share one interpreter lock)
each hold a websocket, reading every message as a ComfyUI client does, and one `httpx.Client`
(one keep-alive connection, as any real client library keeps), and submit their share of the jobs
one after another with `POST /prompt`, timing each request from before the call until the parsed
answer is back. The worker runs jobs while submissions arrive. Each job is a small image workflow
(LoadImage -> ImageScale to a width of its own, so nothing is served from the cache and every
submission is validated afresh -> SaveImage), so the server's own work is not hidden under model time.

Method: the server is warmed up first (2 jobs per client, run to completion, not measured); then
`--jobs` submissions (200 by default: the 95th percentile is the 190th of 200, read by nearest
rank) are timed. Overhead per job is measured in CPU time, since the machine is shared: the CPU
seconds of the server's whole process tree (the server and any process it starts, from /proc) over the measured
jobs, minus the CPU seconds of the same workflows run directly through an Executor in this
process, divided by the number of jobs. Throughput is wall-clock (first submission to the last
job's `executing: null`). Submit latency is wall-clock as each client sees it; the server's own
share (its `Server-Timing` header) is printed beside it.

Usage: ``python benchmarks/server.py [--jobs 200]``. The last line is
``submit_p50_ms=.. submit_p95_ms=.. jobs_per_s=.. overhead_ms_per_job=..``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 4


def graph(width: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "shapes.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "width": width, "height": 48,
                                                     "upscale_method": "bilinear", "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}},
    }


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and every process under it (the server's job worker)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for member in tree:
        try:
            fields = _stat(member)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldmgraph.cli", "serve", "--port", str(port), "--data-dir",
                             str(data), "--workflows-dir", str(ROOT / "workflows"), "--no-editor"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/prompt", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def client(port: int, widths: list[int], results: Any, done: Any) -> None:
    """One client process: a websocket reader thread and sequential submissions."""
    import httpx
    from websockets.sync.client import connect

    latencies: list[tuple[float, float]] = []

    name = f"bench-{widths[0]}"
    with connect(f"ws://127.0.0.1:{port}/ws?clientId={name}") as ws, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        ws.recv(timeout=10)
        finished: set[str] = set()
        reader = threading.Thread(target=read_until_done, args=(ws, finished, len(widths)))
        reader.start()
        done.wait()
        for width in widths:
            started = time.perf_counter()
            reply = http.post("/prompt", json={"prompt": graph(width), "client_id": name})
            server_ms = float(reply.headers["server-timing"].split("dur=")[1])
            latencies.append((time.perf_counter() - started, server_ms / 1000))
            assert reply.status_code == 200, reply.text
        reader.join()
    results.put(latencies)


def read_until_done(ws: Any, finished: set[str], count: int) -> None:
    """Read every message (as a ComfyUI client does) until ``count`` jobs have ended."""
    while len(finished) < count:
        message = ws.recv(timeout=120)
        if isinstance(message, str):
            data = json.loads(message)
            if data["type"] == "executing" and data["data"]["node"] is None:
                finished.add(data["data"]["prompt_id"])


def run_server(jobs: int, data: Path) -> tuple[list[tuple[float, float]], float, float]:
    port = free_port()
    proc = start_server(data, port)
    try:
        warm = list(range(8, 8 + 2 * CLIENTS))
        run_clients(port, warm, [])
        widths = list(range(100, 100 + jobs))
        latencies: list[tuple[float, float]] = []
        cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
        run_clients(port, widths, latencies)
        return latencies, time.perf_counter() - wall0, cpu_seconds(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def run_clients(port: int, widths: list[int], latencies: list[tuple[float, float]]) -> None:
    """Four client processes (so that clients do not share one interpreter lock)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(CLIENTS), context.Queue()
    shares = [widths[k::CLIENTS] for k in range(CLIENTS)]
    processes = [context.Process(target=client, args=(port, share, results, barrier)) for share in shares]
    for process in processes:
        process.start()
    for _ in processes:
        latencies.extend(results.get(timeout=600))
    for process in processes:
        process.join()


def run_direct(jobs: int, out: Path) -> float:
    """CPU seconds of the same workflows through one Executor in this process."""
    import torch

    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import PluginManager
    from ldmgraph.server.protocol import native_to_document

    torch.set_num_threads(1)
    registry = PluginManager().registry
    executor = Executor(registry, Environment(input_dir=ROOT / "workflows" / "inputs", output_dir=out))
    for width in range(8, 8 + 2 * CLIENTS):
        executor.run(native_to_document(graph(width), registry))
    started = time.process_time()
    for width in range(100, 100 + jobs):
        executor.run(native_to_document(graph(width), registry))
    return time.process_time() - started


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """Median and 95th percentile (nearest rank), in milliseconds."""
    ordered = sorted(seconds)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return statistics.median(ordered) * 1000, ordered[rank - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ldmgraph-server-bench-"))
    try:
        latencies, wall, server_cpu = run_server(args.jobs, folder / "data")
        direct_cpu = run_direct(args.jobs, folder / "direct")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    p50, p95 = percentiles([wall for wall, _ in latencies])
    server_p50, server_p95 = percentiles([inside for _, inside in latencies])
    overhead = (server_cpu - direct_cpu) / args.jobs * 1000
    print(f"load_average={os.getloadavg()[0]:.1f} cpus={os.cpu_count()} jobs={args.jobs} clients={CLIENTS} wall_s={wall:.2f} server_cpu_s={server_cpu:.3f} "
          f"direct_cpu_s={direct_cpu:.3f} direct_ms_per_job={direct_cpu / args.jobs * 1000:.2f} "
          f"server_side_submit_p50_ms={server_p50:.2f} server_side_submit_p95_ms={server_p95:.2f}")
    print(f"submit_p50_ms={p50:.2f} submit_p95_ms={p95:.2f} jobs_per_s={args.jobs / wall:.1f} "
          f"overhead_ms_per_job={overhead:.2f}")


if __name__ == "__main__":
    main()
