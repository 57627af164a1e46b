"""The built-in samplers and sigma schedules, registered through the plugin hooks.

Entries are lazy "module:function" strings: loading plugins, listing nodes and validating a
workflow never import torch (docs/INTERFACES.md). Keep this module free of torch imports.
"""

from __future__ import annotations

from ldmgraph.plugins import hookimpl

SAMPLER_NAMES = (
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_sde",
    "ddim",
    "ddpm",
    "plms",
    "uni_pc",
    "uni_pc_bh2",
)
SCHEDULE_NAMES = ("normal", "karras", "exponential", "simple", "sgm_uniform", "ddim_uniform", "beta")

BUILTIN_SAMPLERS: dict[str, str] = {name: f"ldmgraph.diffusion.samplers:{name}" for name in SAMPLER_NAMES}
BUILTIN_SCHEDULES: dict[str, str] = {name: f"ldmgraph.diffusion.schedules:{name}" for name in SCHEDULE_NAMES}


@hookimpl
def ldmgraph_samplers() -> dict[str, str]:
    """The built-in samplers by name (ComfyUI's names)."""
    return dict(BUILTIN_SAMPLERS)


@hookimpl
def ldmgraph_schedules() -> dict[str, str]:
    """The built-in sigma schedules by name (ComfyUI's names)."""
    return dict(BUILTIN_SCHEDULES)
