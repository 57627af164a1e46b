"""CPU threads for a command (``run``, ``serve``, ``evaluate``, ``batch``): how many, and how they wait.

Most machines are never idle. With torch's default (one compute thread per core, spinning at every
OpenMP barrier), a run that shares the cores with other processes collapses: measured on a 2-core
machine with two busy processes, the quick start's command took 9.7 s (median of 3) against 4.7 s
with one thread, and 2.2 s against 2.4 s on the idle machine. So the default is one thread, and
threads beyond the first wait passively (``OMP_WAIT_POLICY=PASSIVE``: they sleep at a barrier
instead of spinning against the other processes). ``--threads N`` asks for more; an
``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` the user set wins over the defaults. One thread also
makes CPU results reproducible across machines with different core counts (matrix products split
their sums by thread).

Torch-free: the environment is set before torch is imported (OpenMP reads it once, when torch's
thread pool starts); if torch is already imported, its thread count is set directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_THREADS = 1
ENV_NAMES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def resolve_threads(requested: int | None) -> int:
    """``--threads`` if given, else ``$OMP_NUM_THREADS`` if set to a number, else one thread."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(from_env) if from_env.isdigit() and int(from_env) >= 1 else DEFAULT_THREADS


def configure_threads(requested: int | None) -> int:
    """Set this process's compute threads (before torch is imported, where possible); returns the count."""
    threads = resolve_threads(requested)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@contextmanager
def command_threads(requested: int | None) -> Iterator[int]:
    """`configure_threads` for one command, undone afterwards (the environment and torch's count), so
    that calling the CLI's ``main`` from Python leaves the caller's process as it was."""
    saved_env = {name: os.environ.get(name) for name in ENV_NAMES}
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch is not None else None
    try:
        yield configure_threads(requested)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch = sys.modules.get("torch")
        if torch is not None and saved_torch is not None and torch.get_num_threads() != saved_torch:
            torch.set_num_threads(saved_torch)
