"""Seeded noise: drawn on the CPU with one torch.Generator per image.

torch's CPU generator (Philox-free Mersenne Twister) gives the same sequence on every machine,
so the same seed gives the same image whatever device the network runs on. Image k of a batch
draws from seed + k (or seed + batch_index[k]), first its starting noise, then the per-step noise
of ancestral / SDE samplers, so it equals a single run with that seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def image_generators(
    seed: int, batch: int, batch_index: Sequence[int] | None = None
) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed + batch_index[k] (default seed + k)."""
    offsets = list(batch_index) if batch_index is not None else list(range(batch))
    if len(offsets) != batch:
        raise ValueError(f"batch_index has {len(offsets)} entries but the latent batch is {batch}")
    return [torch.Generator(device="cpu").manual_seed((seed + k) % 2**64) for k in offsets]


def draw(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """Standard normal noise `[len(generators), *shape]` in float32 on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])


class BatchNoiseSampler:
    """The per-step noise source of stochastic samplers: `(sigma, sigma_next) -> noise like x`."""

    def __init__(
        self, generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device
    ) -> None:
        self.generators = list(generators)
        self.shape = tuple(shape)
        self.device = device

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return draw(self.generators, self.shape).to(self.device)
