"""`ldmgraph batch --backend ray` as a user runs it, in a process of its own: without --address it
starts a private local cluster (a stale cluster address in Ray's temporary folder does not capture
it), and SIGINT (Ctrl-C, to the process group as a terminal sends it, or to the batch's process
alone) ends the batch and its cluster within 10 s, keeping the rows that finished."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = ROOT / "workflows" / "txt2img.json"


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 bytes), removed afterwards."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch_env(ray_tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmpdir), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def stale_address_file(ray_tmpdir: Path) -> str:
    """What `ray start --head` leaves when its cluster is later stopped by killing its processes."""
    (ray_tmpdir / "ray").mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{closed_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(address + "\n")
    return address


def ray_processes(ray_tmpdir: Path) -> list[int]:
    """Processes of the cluster started under this RAY_TMPDIR (their command lines name it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(ray_tmpdir).encode() in cmdline:
            found.append(int(entry.name))
    return found


def manifest(folder: Path) -> list[dict]:
    path = folder / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_a_stale_ray_cluster_address_file_does_not_capture_a_batch(ray_tmpdir: Path, tmp_path: Path) -> None:
    stale = stale_address_file(ray_tmpdir)
    done = subprocess.run(
        [sys.executable, "-m", "ldmgraph.cli", "batch", str(TXT2IMG), "--backend", "ray", "--workers", "1",
         "--sweep", "seed=1,2", "--set", "steps=2", "--output-dir", str(tmp_path / "out"), "--no-progress",
         "--json"], capture_output=True, text=True, env=batch_env(ray_tmpdir), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["succeeded"] == 2
    assert stale not in done.stderr
    deadline = time.monotonic() + 10
    while ray_processes(ray_tmpdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes(ray_tmpdir) == [], "the batch's private cluster outlived it"


@pytest.mark.parametrize("to", ["group", "process"])
def test_sigint_ends_a_ray_batch_and_its_cluster_within_10_s_keeping_finished_rows(
        to: str, ray_tmpdir: Path, tmp_path: Path) -> None:
    """`to`: Ctrl-C in a terminal (the whole process group), or `kill -INT PID` (the batch alone: Ray's
    own processes get nothing, so the batch must stop them)."""
    stale_address_file(ray_tmpdir)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "ldmgraph.cli", "batch", str(TXT2IMG), "--backend", "ray", "--workers", "1",
         "--sweep", "seed=" + ",".join(map(str, range(1, 201))), "--set", "steps=2", "--output-dir", str(out),
         "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=batch_env(ray_tmpdir),
        cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(manifest(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert len(manifest(out)) >= 2, "no row finished in time"
        if to == "group":
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        else:
            os.kill(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = process.communicate(timeout=30)
        ended = time.monotonic() - interrupted
        while ray_processes(ray_tmpdir) and time.monotonic() - interrupted < 10:
            time.sleep(0.1)
        cluster_gone = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert ended <= 10, f"the batch took {ended:.1f} s to end after SIGINT"
    assert ray_processes(ray_tmpdir) == [], f"Ray processes still there {cluster_gone:.1f} s after SIGINT"
    assert process.returncode != 0 and "interrupted" in err
    rows = manifest(out)
    assert len(rows) >= 2 and all(r["status"] == "ok" for r in rows)
    assert all((out / name).is_file() for r in rows for name in r["outputs"])
    assert len(rows) < 200
