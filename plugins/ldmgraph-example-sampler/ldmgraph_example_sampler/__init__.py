"""Example ldmgraph plugin: one sampler with an option of its own, registered through the
`ldmgraph_samplers` hook.

The entry is a `LazySampler`: the function's "module:function" name plus its declared options,
so `ldmgraph nodes` lists "midpoint" among the sampler choices, and shows the node
`SamplerSelect.midpoint` with its `alpha` input (bounds checked by validation), without
importing torch; the function is imported on first use.
"""

from __future__ import annotations

from ldmgraph.diffusion.registry import LazySampler, SamplerOption
from ldmgraph.plugins import hookimpl

ALPHA = SamplerOption(
    "float",
    0.5,
    ge=0.1,
    le=1.0,
    description="where the second slope is taken, as a fraction of the step "
    "(0.5 = midpoint rule, 2/3 = Ralston's method, 1 = Heun's)",
)


@hookimpl
def ldmgraph_samplers() -> dict[str, LazySampler]:
    """Samplers this plugin adds, by name."""
    return {"midpoint": LazySampler("ldmgraph_example_sampler.midpoint:sample_midpoint", alpha=ALPHA)}
