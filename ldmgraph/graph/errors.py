"""The one exception hierarchy of ldmgraph.

Every error the package raises on purpose derives from :class:`LdmGraphError`, so a front end can
catch one class and print a readable line. Other layers subclass it (e.g. ``ModelError``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class LdmGraphError(Exception):
    """Root of every error ldmgraph raises deliberately."""


SHOWN_PROBLEMS = 50
"""Problems listed in full (CLI lines, ``--json``, HTTP); the rest are counted."""
ECHO_CHARS = 200
"""Longest node id or input name echoed back; messages are cut at ``MESSAGE_CHARS``."""
MESSAGE_CHARS = 800


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was (hostile input can be megabytes)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters, cut)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow: where (node id, input name), a stable code, and how to fix it.

    Codes are machine-readable and stable across releases (see ``ldmgraph.graph.codes``).
    """

    node_id: str | None
    input: str | None
    code: str
    message: str

    def __post_init__(self) -> None:
        for name, limit in (("node_id", ECHO_CHARS), ("input", ECHO_CHARS), ("message", MESSAGE_CHARS)):
            value = getattr(self, name)
            if isinstance(value, str) and len(value) > limit:
                object.__setattr__(self, name, cut(value, limit))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as printed by ``ldmgraph validate --json``."""
        return asdict(self)

    def __str__(self) -> str:
        where = f"node {self.node_id!r}" if self.node_id is not None else "workflow"
        if self.input is not None:
            where += f", input {self.input!r}"
        return f"[{self.code}] {where}: {self.message}"


class ValidationError(LdmGraphError):
    """A workflow (or a document claiming to be one) is invalid; holds every problem found at once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self._summary())

    def _summary(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in the workflow:"]
        lines += [f"  {p}" for p in self.shown]
        if self.more:
            lines.append(f"  ... and {self.more} more problem(s)")
        return "\n".join(lines)

    @property
    def shown(self) -> list[Problem]:
        """The problems listed in full (the first SHOWN_PROBLEMS)."""
        return self.problems[:SHOWN_PROBLEMS]

    @property
    def more(self) -> int:
        """How many problems are counted but not listed."""
        return max(0, len(self.problems) - SHOWN_PROBLEMS)

    @property
    def codes(self) -> set[str]:
        """The distinct problem codes, handy for tests and scripts."""
        return {p.code for p in self.problems}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"ok": false, "problems": [...]}``."""
        out: dict[str, Any] = {"ok": False, "problems": [p.to_dict() for p in self.shown]}
        if self.more:
            out["more_problems"] = self.more
        return out


class ExecutionError(LdmGraphError):
    """A node failed while running: names the node id, its type and the underlying cause."""

    def __init__(self, node_id: str, node_type: str, cause: BaseException) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.cause = cause
        super().__init__(f"node {node_id!r} ({node_type}) failed: {type(cause).__name__}: {cause}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as printed by ``ldmgraph run --json``."""
        return {
            "node_id": self.node_id,
            "node_type": self.node_type,
            "error": type(self.cause).__name__,
            "message": str(self.cause),
        }


class Cancelled(LdmGraphError):
    """The run was cancelled (between nodes, or inside a long node through its context)."""


class PluginError(LdmGraphError):
    """A plugin is broken or conflicts with another (e.g. two plugins register the same node type)."""


class UnsafePathError(LdmGraphError, ValueError):
    """A file name from a workflow tried to leave its folder (absolute path, ``..``, a link out)."""


class NotAFileError(LdmGraphError, ValueError):
    """A path names a folder, device, FIFO or socket where a regular file is expected."""


class FileTooLargeError(LdmGraphError, ValueError):
    """A file is larger than the bound for its kind (read no further than the bound)."""



class InputCheckError(LdmGraphError, ValueError):
    """A node's input, known only at run time (a linked file name), failed the node's own checks."""
