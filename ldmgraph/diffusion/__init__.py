"""Diffusion: noise schedules, sigma schedules, the denoiser wrapper and samplers.

k-diffusion style (see STYLE.md): a denoiser wraps an eps- or v-predicting network into
x0 = D(x, sigma); each sampler is a plain function over a list of sigmas. Names are exported
lazily so that `import ldmgraph.diffusion.registry` (done when plugins load) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ldmgraph.diffusion.errors import Cancelled, DiffusionError
from ldmgraph.diffusion.values import CondEntry, DiffusionModel, Latent

if TYPE_CHECKING:  # pragma: no cover
    from ldmgraph.diffusion.noise_schedule import NoiseSchedule
    from ldmgraph.diffusion.sampling import sample

_LAZY = {
    "NoiseSchedule": "ldmgraph.diffusion.noise_schedule",
    "sample": "ldmgraph.diffusion.sampling",
    "Denoiser": "ldmgraph.diffusion.denoiser",
}

__all__ = [
    "Cancelled",
    "CondEntry",
    "DiffusionError",
    "DiffusionModel",
    "Latent",
    "NoiseSchedule",
    "sample",
    "Denoiser",
]


def __getattr__(name: str) -> Any:
    """Import torch-using names on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ldmgraph.diffusion' has no attribute {name!r}")
