"""Errors raised by the diffusion layer.

`Cancelled` is the framework's own class (`ldmgraph.graph.errors`), so a callback that raises the
executor's `Cancelled` stops a sampler and is reported the same way.
"""

from __future__ import annotations

from ldmgraph.graph.errors import Cancelled, LdmGraphError


class DiffusionError(LdmGraphError, ValueError):
    """A bad argument to the diffusion layer (unknown sampler or schedule, bad shapes)."""


__all__ = ["Cancelled", "DiffusionError"]
