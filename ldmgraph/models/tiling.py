"""Tiled model calls: run a diffusion model on overlapping tiles of a latent larger than it was trained on.

Used for LDSR-style upscaling of images of any size. At every sampler step the latent (and its
concat conditioning) is cut into tiles of at most `tile` latent pixels that overlap by `overlap`;
the model predicts on each tile and the predictions are blended with weights that ramp linearly
across each overlap (1 inside, falling towards a tile edge that borders another tile, full weight
at the image border). Because the blend happens at every step on one shared latent, neighbouring
tiles see the same noisy image and agree, so no seam forms (the same idea as the original
repository's `split_input_params` fold/unfold weighting, written here from scratch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering 0..size with at least `overlap` between neighbours."""
    if size <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, start: int, size: int, overlap: int) -> Tensor:
    """1-D blend weights of a tile at `start`: linear ramps over `overlap` at edges inside the image."""
    w = torch.ones(length)
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
    n = min(overlap, length)
    if start > 0:
        w[:n] = torch.minimum(w[:n], ramp[:n])
    if start + length < size:
        w[-n:] = torch.minimum(w[-n:], ramp[:n].flip(0))
    return w


class TiledModel:
    """A `DiffusionModel` that calls `model` tile by tile when the latent exceeds `tile` (latent pixels)."""

    def __init__(self, model: Any, tile: int, overlap: int) -> None:
        if tile < 8 or not 0 <= overlap < tile:
            raise ValueError(f"tiling: need tile >= 8 and 0 <= overlap < tile (tile {tile}, overlap {overlap})")
        self.model, self.tile, self.overlap = model, tile, overlap
        self.prediction_type = model.prediction_type
        self.noise_schedule = model.noise_schedule

    def __getattr__(self, name: str) -> Any:  # device, dtype, in_channels, ... of the wrapped model
        return getattr(self.model, name)

    def apply_model(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        height, width = x.shape[-2:]
        if height <= self.tile and width <= self.tile:
            return self.model.apply_model(x, t, context=context, concat=concat, y=y)
        out = torch.zeros_like(x)
        total = torch.zeros(1, 1, height, width, dtype=x.dtype, device=x.device)
        for top in tile_starts(height, self.tile, self.overlap):
            for left in tile_starts(width, self.tile, self.overlap):
                h, w = min(self.tile, height), min(self.tile, width)
                rows, cols = slice(top, top + h), slice(left, left + w)
                part = self.model.apply_model(
                    x[..., rows, cols], t, context=context,
                    concat=None if concat is None else concat[..., rows, cols], y=y,
                )
                weight = (_ramp(h, top, height, self.overlap)[:, None] * _ramp(w, left, width, self.overlap)[None])
                weight = weight.to(x)
                out[..., rows, cols] += part * weight
                total[..., rows, cols] += weight
        return out / total

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.apply_model(*args, **kwargs)
