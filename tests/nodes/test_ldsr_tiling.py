"""LDSR tiling: a 96x96 input upscaled x4 in overlapping tiles matches the untiled result away from the
seams and shows no seam; cutting the same tiles without overlap does show one (so the test can fail).

The denoiser here is a small local network with a per-tile normalisation (GroupNorm over the whole
tile, as the U-Net's), wrapped in the ordinary MODEL handle, so tiles differ only through their
statistics and their borders; the first stage is a VQ-f4 without attention (the LDSR family).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ldmgraph.models.handles import DiffusionModelHandle, VAEHandle
from ldmgraph.models.vq import VQModel
from ldmgraph.nodes.paper import LDSRUpscale


class LocalDenoiser(nn.Module):
    """eps from [x, low-res image] (6 channels): conv 3x3, GroupNorm over the tile, SiLU, conv 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels, self.out_channels = 6, 3
        self.conv1 = nn.Conv2d(6, 32, 3, padding=1)
        self.norm = nn.GroupNorm(1, 32)
        self.conv2 = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Any = None, y: Any = None) -> torch.Tensor:
        return self.conv2(torch.nn.functional.silu(self.norm(self.conv1(x))))


@pytest.fixture(scope="module")
def handles() -> tuple[Any, Any]:
    torch.manual_seed(0)
    unet = DiffusionModelHandle(LocalDenoiser().eval(), schedule={"linear_start": 0.0015, "linear_end": 0.0155})
    vq = VQModel({"double_z": False, "z_channels": 3, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 8, "norm_groups": 4,
                  "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "attn_type": "none"},
                 embed_dim=3, n_embed=256, force_not_quantize=True).eval()
    return unet, VAEHandle(vq, scale_factor=1.0)


def upscale(handles: tuple[Any, Any], image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    from ldmgraph.plugins import load_registry

    unet, vae = handles
    ctx = SimpleNamespace(progress=lambda k, n, preview=None: None, wants_preview=lambda k, n: False, registry=load_registry(), device="cpu")
    inputs = LDSRUpscale.Inputs.model_construct(model=unet, vae=vae, image=image, steps=4, eta=1.0, seed=5,
                                                tile=tile, overlap=overlap, device="cpu")
    return LDSRUpscale().run(inputs, ctx).image[0]  # type: ignore[arg-type]


def seam_step(image: np.ndarray, reference: np.ndarray, column: int) -> tuple[float, float]:
    """Mean |horizontal step| of (image - reference) across `column` and over all columns, in 1/255."""
    steps = np.abs(np.diff(image - reference, axis=1)).mean(axis=(0, 2)) * 255
    return float(steps[column]), float(steps.mean())


def test_tiled_ldsr_matches_untiled_away_from_seams_and_shows_no_seam(handles: tuple[Any, Any]) -> None:
    rng = np.random.default_rng(0)
    small = rng.random((1, 12, 12, 3), dtype=np.float32)
    image = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=(96, 96),
                                                       mode="bicubic").clamp(0, 1).permute(0, 2, 3, 1))
    whole = upscale(handles, image, tile=128, overlap=0)
    tiled = upscale(handles, image, tile=48, overlap=16)
    hard = upscale(handles, image, tile=48, overlap=0)
    assert whole.shape == tiled.shape == (384, 384, 3)
    # tiles of 48 overlapping by 16 start at 0, 32, 48 (latent = input pixels); x4 in the output
    blend = np.zeros(384, bool)
    for start, end in ((32, 48), (48, 80)):
        blend[4 * start - 8 : 4 * end + 8] = True
    away = ~blend
    assert np.abs(tiled - whole)[away][:, away].mean() < 2 / 255
    # no seam: the step of the deviation from the untiled image across a tile border is no larger than
    # elsewhere; hard cuts at 48 (x4 = 192) without overlap do make one there (the check can fail)
    for column in (4 * 32 - 1, 4 * 48 - 1, 4 * 80 - 1):  # where tiles begin and end
        assert seam_step(tiled, whole, column)[0] < 1.0  # below one grey level: invisible
    assert seam_step(hard, whole, 4 * 48 - 1)[0] > 4.0
