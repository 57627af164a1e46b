"""`sample(...)`: the one call the sampler nodes make."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldmgraph.diffusion.values import CondEntry, DiffusionModel, Latent


def sample(
    model: DiffusionModel,
    latent: Latent,
    positive: Sequence[CondEntry],
    negative: Sequence[CondEntry],
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler: str,
    schedule: str,
    denoise: float = 1.0,
    start_step: int | None = None,
    end_step: int | None = None,
    add_noise: bool = True,
    return_with_leftover_noise: bool = False,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    registry: Any = None,
    sampler_options: dict[str, Any] | None = None,
) -> Latent:
    """Sample latents (work in progress: signature is final)."""
    raise NotImplementedError
