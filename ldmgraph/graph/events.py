"""Progress events of a run, fed to a callback (CLI progress bar, server websocket)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

EventKind = Literal["start", "cached", "progress", "done", "error"]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``kind`` for node ``node_id`` (``index`` of ``total`` in this run).

    ``progress`` events carry ``k`` of ``n`` from inside a node, and ``preview`` (an RGB image as a
    ``uint8`` array ``[h, w, 3]``) on the steps a node drew one for, when the run was asked for
    previews; ``done`` carries the node's wall time in seconds; ``error`` carries the exception.
    ``done`` and ``cached`` carry the files the node wrote (for a cached node, when it first ran),
    so a front end can tell which node wrote which file without watching folders.
    """

    kind: EventKind
    node_id: str
    node_type: str
    index: int
    total: int
    k: int = 0
    n: int = 0
    seconds: float = 0.0
    error: BaseException | None = None
    preview: Any = None
    files: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the error as its message)."""
        out: dict[str, Any] = {"kind": self.kind, "node_id": self.node_id, "node_type": self.node_type,
                               "index": self.index, "total": self.total}
        if self.kind == "progress":
            out.update(k=self.k, n=self.n)
        if self.kind == "done":
            out["seconds"] = self.seconds
        if self.error is not None:
            out["error"] = str(self.error)
        return out


EventCallback = Callable[[Event], None]
