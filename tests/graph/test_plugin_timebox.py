"""A third-party plugin that hangs, at import or inside a hook, is time-boxed: `plugins`, `nodes` and
`validate` return, report it as hung and skipped, and still work with everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLEEPY_IMPORT = "import time\ntime.sleep(600)\n"
SLEEPY_HOOK = ("import time\nfrom ldmgraph.plugins import hookimpl\n\n\n@hookimpl\ndef ldmgraph_samplers():\n"
               "    time.sleep(600)\n    return {}\n")


@pytest.fixture
def hung_plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "sleepy_import.py").write_text(SLEEPY_IMPORT)
    (folder / "sleepy_hook.py").write_text(SLEEPY_HOOK)
    return folder


def ldmgraph(*args: str, plugins: Path) -> tuple[int, str, float]:
    env = {**os.environ, "LDMGRAPH_PLUGIN_DIR": str(plugins), "LDMGRAPH_PLUGIN_TIMEOUT": "2"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_plugins_lists_the_hung_plugins_and_returns(hung_plugins: Path) -> None:
    code, out, seconds = ldmgraph("plugins", plugins=hung_plugins)
    assert seconds < 60, seconds
    assert "sleepy_import.py hung: its import was still running after 2 s" in out
    assert "sleepy_hook.py hung: its hook ldmgraph_samplers was still running after 2 s" in out


def test_nodes_and_validate_go_on_without_them(hung_plugins: Path) -> None:
    code, out, seconds = ldmgraph("nodes", plugins=hung_plugins)
    assert seconds < 60 and "VAEDecode" in out, out[-2000:]
    code, out, seconds = ldmgraph("validate", str(ROOT / "workflows" / "txt2img.json"), plugins=hung_plugins)
    assert seconds < 60 and code == 0, out[-2000:]


def test_the_bound_can_be_lifted_for_a_slow_but_honest_plugin(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "slow.py").write_text("import time\ntime.sleep(3)\n")
    env = {**os.environ, "LDMGRAPH_PLUGIN_DIR": str(folder), "LDMGRAPH_PLUGIN_TIMEOUT": "30"}
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "plugins"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "hung" not in proc.stdout + proc.stderr and "slow.py" in proc.stdout
