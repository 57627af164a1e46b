"""Example ldmgraph plugin: one sampler, registered through the `ldmgraph_samplers` hook.

The entry is a lazy "module:function" string, so `ldmgraph nodes` lists "midpoint" among the
sampler node's choices without importing torch; the function is imported on first use.
"""

from __future__ import annotations

from ldmgraph.plugins import hookimpl


@hookimpl
def ldmgraph_samplers() -> dict[str, str]:
    """Samplers this plugin adds, by name."""
    return {"midpoint": "ldmgraph_example_sampler.midpoint:sample_midpoint"}
