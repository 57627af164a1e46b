"""Fixtures of the server tests: one shared server (see server_helpers.ServerProcess).

It loads the test plugin folder (`plugins/`: a slow interruptible node and failing ones) and the
repository's saved workflows. Tests that need their own server (restart, token) start one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:  # the server needs its extra: pip install -e ".[server]" (or ".[ui]")
    import fastapi  # noqa: F401
    import websockets  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]

from server_helpers import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("server") / "data"
    process = ServerProcess(data, "--max-body-mb", "2").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server started with non-default flags: the default body limit (32 MiB), the Host name
    studio.example allowed, and latent previews on for every job (--preview-method latent2rgb)."""
    data = tmp_path_factory.mktemp("roomy") / "data"
    process = ServerProcess(data, "--allow-host", "studio.example", "--preview-method", "latent2rgb").start()
    yield process
    process.stop()
