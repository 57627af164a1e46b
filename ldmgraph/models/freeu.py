"""FreeU (Si et al. 2024, "FreeU: Free Lunch in Diffusion U-Net") as a model patch.

Where an output block of the U-Net concatenates its backbone features h with the skip connection,
FreeU scales the first half of h's channels by b (v2: by 1 + (b - 1) * the per-image min-max
normalised channel mean of h) and damps the skip's lowest frequencies: its centred 2-D spectrum is
multiplied by s inside the 2 x 2 window around the centre (`fourier_filter`, threshold 1).

Which blocks: `rule="channels"` (the authors' code and ComfyUI): backbone features 4x the base width
get (b1, s1), 2x get (b2, s2); `rule="levels"` (diffusers' `enable_freeu`): the output blocks of
the two deepest levels (diffusers' up-blocks 0 and 1) get (b1, s1) and (b2, s2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldmgraph.models.patches import BlockInfo, SkipHook

RULES = ("channels", "levels")
VERSIONS = (1, 2)


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """Multiply the centred spectrum of x [B, C, H, W] by `scale` within `threshold` of the centre."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(freq.shape[-2:], device=x.device)
    crow, ccol = freq.shape[-2] // 2, freq.shape[-1] // 2
    mask[crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


@dataclass(frozen=True)
class FreeU:
    """The FreeU factors and which blocks they go to; `hook()` is its `SkipHook`."""

    b1: float
    b2: float
    s1: float
    s2: float
    version: int = 1
    rule: str = "channels"
    model_channels: int = 320

    def factors(self, h: Tensor, info: BlockInfo) -> tuple[float, float] | None:
        """(b, s) for this output block, or None where FreeU leaves it alone."""
        if self.rule == "levels":
            return {0: (self.b1, self.s1), 1: (self.b2, self.s2)}.get(info.up_index)
        width = h.shape[1]
        return {4 * self.model_channels: (self.b1, self.s1), 2 * self.model_channels: (self.b2, self.s2)}.get(width)

    def __call__(self, h: Tensor, skip: Tensor, info: BlockInfo) -> tuple[Tensor, Tensor]:
        found = self.factors(h, info)
        if found is None:
            return h, skip
        b, s = found
        half = h.shape[1] // 2
        if self.version == 2:
            mean = h.mean(1, keepdim=True)
            flat = mean.flatten(1)
            low, high = flat.min(1).values, flat.max(1).values
            mean = (mean - low[:, None, None, None]) / (high - low)[:, None, None, None]
            gain: Tensor | float = (b - 1) * mean + 1
        else:
            gain = b
        h = torch.cat([h[:, :half] * gain, h[:, half:]], dim=1)
        return h, fourier_filter(skip, threshold=1, scale=s)

    def hook(self) -> SkipHook:
        return SkipHook(self)
