"""Latent previews: a cheap picture of the sampler's current x0 prediction, without the VAE.

A latent pixel of a KL or VQ autoencoder is close to a linear function of the colour of the
image patch it decodes to, so ``rgb = z^T W + b`` (W: ``C x 3``, b: 3, in the decoder's -1..1
range) gives a recognisable thumbnail at latent resolution (one pixel per latent pixel: 1/8 of
the image's side for SD, 1/4 for the bundled models) for a few hundred multiply-adds per pixel.
The factors of each latent space are in ``ldmgraph/assets/data/preview_factors.json``, fitted by
least squares on pairs of latents and decoded images (``benchmarks/fit_preview_factors.py``,
which also records where each entry comes from). A model's latent space is recognised by its
latent channels and scale factor (the bundled models' autoencoder has its own scale, SD 1.x and
2.x share the KL-f8 autoencoder's 0.18215); a latent space with no entry is shown with its first
three channels, each stretched to its own range in the frame: structure, not colour.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FACTORS_FILE = Path(__file__).resolve().parents[1] / "assets" / "data" / "preview_factors.json"
SCALE_TOLERANCE = 1e-3  # relative: a recomputed scale factor agrees to far better than this

__all__ = ["FACTORS_FILE", "LatentPreviewer", "LatentSpace", "latent_space_for", "preview_table"]


@dataclass(frozen=True)
class LatentSpace:
    """One entry of the factor table: ``rgb = z^T factors + bias`` in -1..1 for latents of
    ``channels`` channels at ``scale_factor`` (the sampler's scaled latent)."""

    name: str
    channels: int
    scale_factor: float
    factors: tuple[tuple[float, ...], ...]  # channels rows of (R, G, B)
    bias: tuple[float, float, float]
    models: str = ""
    source: str = ""

    def matches(self, channels: int, scale_factor: float | None) -> bool:
        """Whether a model with this many latent channels and this scale factor samples in this space."""
        if channels != self.channels or scale_factor is None:
            return False
        return math.isclose(scale_factor, self.scale_factor, rel_tol=SCALE_TOLERANCE)


@functools.cache
def preview_table(path: Path = FACTORS_FILE) -> tuple[LatentSpace, ...]:
    """The latent spaces with fitted factors, read once from the table file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    spaces = []
    for name, entry in data["spaces"].items():
        factors = tuple(tuple(float(v) for v in row) for row in entry["factors"])
        bias = tuple(float(v) for v in entry["bias"])
        if len(factors) != int(entry["channels"]) or any(len(row) != 3 for row in factors) or len(bias) != 3:
            raise ValueError(f"{path}: entry {name!r} must have channels rows of 3 factors and 3 biases")
        spaces.append(LatentSpace(name, int(entry["channels"]), float(entry["scale_factor"]), factors,
                                  bias, str(entry.get("models", "")), str(entry.get("source", ""))))  # type: ignore[arg-type]
    return tuple(spaces)


def latent_space_for(model: Any) -> LatentSpace | None:
    """The table entry for the latent space a MODEL samples in, or None when there is none.

    Read from the model handle: its latent channels and the scale factor of its checkpoint.
    """
    channels = getattr(model, "latent_channels", None)
    scale = getattr(getattr(model, "info", None), "scale_factor", None)
    if channels is None:
        return None
    for space in preview_table():
        if space.matches(int(channels), None if scale is None else float(scale)):
            return space
    return None


class LatentPreviewer:
    """Latent ``[B, C, h, w]`` -> preview of its first image, ``uint8`` ``[h, w, 3]`` (a numpy array).

    With a latent space: its linear factors. Without one: the first three channels (repeated when
    there are fewer), each stretched from its 1st to its 99th percentile in the frame.
    """

    def __init__(self, space: LatentSpace | None) -> None:
        self.space = space
        self._weights: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def for_model(cls, model: Any) -> LatentPreviewer:
        """The previewer for the latent space a MODEL samples in."""
        return cls(latent_space_for(model))

    def _linear(self, device: torch.device) -> tuple[Tensor, Tensor]:
        hit = self._weights.get(device)
        if hit is None:
            assert self.space is not None
            weights = torch.tensor(self.space.factors, dtype=torch.float32, device=device)
            bias = torch.tensor(self.space.bias, dtype=torch.float32, device=device)
            hit = self._weights[device] = (weights, bias)
        return hit

    @torch.no_grad()
    def __call__(self, latent: Tensor) -> np.ndarray:
        z = latent[0].detach().float()  # [C, h, w]
        if self.space is not None and z.shape[0] == self.space.channels:
            weights, bias = self._linear(z.device)
            rgb = torch.einsum("chw,cr->hwr", z, weights) + bias
            rgb = (rgb + 1.0) * 0.5
        else:
            rgb = _stretched(z)
        return (rgb.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def _stretched(z: Tensor) -> Tensor:
    """The first three channels as RGB, each mapped from its 1st..99th percentile to 0..1."""
    index = [min(i, z.shape[0] - 1) for i in range(3)]
    channels = z[index].reshape(3, -1)
    low = torch.quantile(channels, 0.01, dim=1, keepdim=True)
    high = torch.quantile(channels, 0.99, dim=1, keepdim=True)
    scaled = (channels - low) / (high - low).clamp_min(1e-6)
    return scaled.reshape(3, *z.shape[1:]).permute(1, 2, 0)
