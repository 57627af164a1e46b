"""A batch interrupted with SIGINT and started again runs only the rows it had not finished."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_helpers import PROMPTS, ROOT, TXT2IMG, manifest_lines, prompt_csv

pytestmark = pytest.mark.slow


def test_sigint_then_the_same_command_finishes_only_the_missing_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = prompt_csv(tmp_path / "prompts.csv", PROMPTS, steps=3)
    command = [sys.executable, "-m", "ldmgraph.cli", "batch", str(TXT2IMG), "--params", str(table),
               "--sweep", "seed=1,2,3", "--output-dir", str(out), "--threads", "1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(manifest_lines(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "interrupted" in err and "run the same command again" in err
    first = manifest_lines(out)
    finished = {r["row"] for r in first}
    assert 2 <= len(finished) < 12 and all(r["status"] == "ok" for r in first)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(stamps) == sorted(name for r in first for name in r["outputs"])  # nothing half-written

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    second = manifest_lines(out)[len(first):]
    assert sorted(r["row"] for r in second) == sorted(set(range(1, 13)) - finished)
    assert sorted(p.name for p in out.glob("*.png")) == [f"row{n:05d}_txt2img_00001_.png" for n in range(1, 13)]
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # finished rows untouched
    assert f"{len(finished)} done before" in again.stderr
