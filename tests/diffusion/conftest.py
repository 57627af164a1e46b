"""Shared fixtures: a closed-form toy eps model and a tiny random diffusers U-Net."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldmgraph.diffusion import NoiseSchedule  # noqa: E402


class ToyEpsModel:
    """eps(x_t, t) = a(t) * x_t + mean(context): smooth in x, t and context, cheap, and counts calls."""

    prediction_type = "eps"

    def __init__(self, prediction_type: str = "eps") -> None:
        self.prediction_type = prediction_type
        self.noise_schedule = NoiseSchedule.from_config("linear", 0.00085, 0.012, 1000)
        self.calls = 0
        self.batch_sizes: list[int] = []

    def apply_model(self, x, t, context=None, concat=None, y=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        if concat is not None:
            x = torch.cat([x, concat], dim=1)[:, : x.shape[1]] + concat.mean(dim=1, keepdim=True)
        scale = 0.5 * torch.cos(t.float() / 1000).view(-1, 1, 1, 1)
        shift = 0.0 if context is None else context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return scale * x + shift


class DiffusersUNetModel:
    """A diffusers UNet2DConditionModel seen through our DiffusionModel protocol.

    `round_t` rounds the network's timestep as diffusers' DPMSolverMultistep does with karras
    sigmas, so that a comparison tests the solver and not that rounding."""

    prediction_type = "eps"

    def __init__(self, unet, round_t: bool = False) -> None:
        self.unet = unet
        self.noise_schedule = NoiseSchedule.from_config("linear", 0.00085, 0.012, 1000)
        self.round_t = round_t

    def apply_model(self, x, t, context=None, concat=None, y=None):
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        if self.round_t:
            t = t.round()
        return self.unet(x, t, encoder_hidden_states=context).sample


@pytest.fixture
def toy_model() -> ToyEpsModel:
    return ToyEpsModel()


@pytest.fixture(scope="session")
def tiny_unet():
    """A tiny SD-like conditional U-Net with random weights (seeded), in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


@pytest.fixture(scope="session")
def as_model():
    """Wrap a diffusers U-Net as our DiffusionModel: `as_model(unet, round_t=False)`."""
    return DiffusersUNetModel


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models here run fastest single-threaded (and the CI machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
