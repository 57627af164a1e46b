"""Errors raised by the diffusion layer.

`Cancelled` is the framework's own class when `ldmgraph.graph.errors` provides one, so a callback
that raises the executor's `Cancelled` stops a sampler and is reported the same way.
"""

from __future__ import annotations

try:  # the framework layer owns cancellation; reuse its class when it exists
    from ldmgraph.graph.errors import Cancelled
except ImportError:  # pragma: no cover - only before the graph layer exists

    class Cancelled(Exception):  # type: ignore[no-redef]
        """The run was cancelled (raised from a progress callback between sampler steps)."""


class DiffusionError(ValueError):
    """A bad argument to the diffusion layer (unknown sampler or schedule, bad shapes)."""


__all__ = ["Cancelled", "DiffusionError"]
