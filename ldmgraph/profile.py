"""`ldmgraph run --profile`: where the command's time goes, phase by phase (torch-free).

Each phase gets wall seconds, CPU seconds of the process (all threads) and the seconds spent
importing modules inside it, so that a lazy import (torch in the first node that needs it) shows
as import time and not as the node's work. Interpreter start is the time from the process's birth
(Linux: /proc/self/stat) to the first line of the `ldmgraph` package; start-up imports run from
there to the command's entry point.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from .graph.events import Event


def process_age() -> float | None:
    """Seconds since this process started (Linux), else None."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class ImportClock:
    """Total seconds spent in (outermost) module imports since `install`, in any thread.

    Wraps `importlib._bootstrap._load_unlocked`, the one step every import (source, extension,
    namespace) goes through when it executes a module; nested imports count once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = threading.local()
        self._original: Any = None

    def install(self) -> None:
        bootstrap = sys.modules["importlib._bootstrap"]
        self._original = original = bootstrap._load_unlocked

        def timed(spec: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            started = time.perf_counter()
            try:
                return original(spec)
            finally:
                self._depth.n = depth
                if depth == 0:
                    self.seconds += time.perf_counter() - started

        bootstrap._load_unlocked = timed

    def uninstall(self) -> None:
        if self._original is not None:
            sys.modules["importlib._bootstrap"]._load_unlocked = self._original
            self._original = None


@dataclass
class Phase:
    name: str
    wall_s: float
    cpu_s: float | None
    import_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "wall_s": round(self.wall_s, 4),
                "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 4),
                "import_s": None if self.import_s is None else round(self.import_s, 4)}


@dataclass
class Profile:
    """Phases of one command, measured from process start to `finish`."""

    started_wall: float
    started_cpu: float
    phases: list[Phase] = field(default_factory=list)
    clock: ImportClock = field(default_factory=ImportClock)
    _mark: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _nodes: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    @classmethod
    def start(cls, module_wall: float, module_cpu: float) -> Profile:
        """Open a profile at the command's entry: the interpreter-start and start-up-import phases
        end here (`module_wall` / `module_cpu`: the clocks when the package's first line ran)."""
        profile = cls(started_wall=time.perf_counter(), started_cpu=time.process_time())
        age = process_age()
        if age is not None:
            interpreter = max(0.0, age - (profile.started_wall - module_wall))
            profile.phases.append(Phase("interpreter start", interpreter, module_cpu, None))
        imports = profile.started_wall - module_wall
        profile.phases.append(Phase("start-up imports", imports, profile.started_cpu - module_cpu, imports))
        profile.clock.install()
        profile._mark = profile._now()
        return profile

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), self.clock.seconds

    def _since(self, name: str, mark: tuple[float, float, float]) -> Phase:
        wall, cpu, imports = self._now()
        return Phase(name, wall - mark[0], cpu - mark[1], imports - mark[2])

    def lap(self, name: str) -> None:
        """Close the phase that began at the previous lap (or at `start`)."""
        self.phases.append(self._since(name, self._mark))
        self._mark = self._now()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.lap("other")
        try:
            yield
        finally:
            self.lap(name)

    def on_event(self, event: Event) -> None:
        """Time each node from its start event to its done / cached / failed event."""
        key = event.node_id
        if event.kind == "start":
            self.lap("other")
            self._nodes[key] = self._mark
        elif event.kind in ("done", "cached", "failed") and key in self._nodes:
            self.phases.append(self._since(f"node {key} ({event.node_type})", self._nodes.pop(key)))
            self._mark = self._now()

    def finish(self) -> dict[str, Any]:
        """The profile as a JSON-ready dict (phases of one name summed; the gaps between them last,
        as "other")."""
        self.lap("other")
        self.clock.uninstall()
        merged: dict[str, Phase] = {}
        for p in sorted(self.phases, key=lambda p: p.name == "other"):
            if p.name in merged:
                q = merged[p.name]
                merged[p.name] = Phase(p.name, q.wall_s + p.wall_s, _add(q.cpu_s, p.cpu_s), _add(q.import_s, p.import_s))
            else:
                merged[p.name] = p
        rows = list(merged.values())
        total_wall = sum(p.wall_s for p in rows)
        return {"kind": "profile", "phases": [p.to_dict() for p in rows], "total_s": round(total_wall, 4),
                "cpu_s": round(time.process_time(), 4),
                "import_s": round(sum(p.import_s or 0.0 for p in rows), 4)}


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


def print_profile(report: dict[str, Any], stream: TextIO) -> None:
    """The profile as a small table: phase, wall s, CPU s, of which imports s."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    width = max(len(p["name"]) for p in report["phases"]) + 2
    print(f"{'phase':<{width}}{'wall s':>8}{'cpu s':>8}{'imports s':>11}", file=stream)
    for p in report["phases"]:
        print(f"{p['name']:<{width}}{cell(p['wall_s']):>8}{cell(p['cpu_s']):>8}{cell(p['import_s']):>11}",
              file=stream)
    print(f"{'total':<{width}}{cell(report['total_s']):>8}{cell(report['cpu_s']):>8}"
          f"{cell(report['import_s']):>11}", file=stream)
