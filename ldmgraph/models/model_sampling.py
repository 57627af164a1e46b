"""How a model's prediction becomes x0, changed by a patch: the Latent Consistency Model's boundary
condition (Luo et al. 2023, "Latent Consistency Models", Sec. 4.1; ComfyUI's `ModelSamplingDiscrete`
with sampling "lcm", diffusers' `LCMScheduler`).

A consistency model's x0 is c_skip(t) x_t + c_out(t) x0_eps, where x0_eps = (x_t - sqrt(1 - a_t) eps)
/ sqrt(a_t) is the usual eps-prediction estimate and, with s = 10 t (the timestep scaling) and
sigma_data = 0.5, c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2).
The patch returns the eps that makes the denoiser's x0 = x - sigma eps equal that x0, so every
sampler (the `lcm` sampler above all) sees the consistency model's estimate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ldmgraph.models.patches import OutputPatch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def lcm_scalings(t: Tensor) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at timesteps t."""
    scaled = t.to(torch.float64) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def lcm_eps(out: Tensor, x_in: Tensor, t: Tensor, model: Any) -> Tensor:
    """The eps whose x0 is the consistency model's, for an eps-predicting network."""
    if getattr(model, "prediction_type", "eps") != "eps":
        raise ValueError("LCM sampling needs an eps-predicting model (this one predicts "
                         f"{getattr(model, 'prediction_type', '?')!r})")
    sigma = model.noise_schedule.t_to_sigma(t.detach().float().cpu()).to(torch.float64)
    shape = (-1, *([1] * (out.dim() - 1)))
    sigma = sigma.to(out.device).view(shape)
    alpha_bar = 1.0 / (1.0 + sigma**2)
    x_t, eps = x_in.to(torch.float64), out.to(torch.float64)
    x0 = (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    c_skip, c_out = (c.to(out.device).view(shape) for c in lcm_scalings(t.detach().cpu()))
    x0 = c_out * x0 + c_skip * x_t
    x = x_t / alpha_bar.sqrt()  # the sampler's x (x_t without its sqrt(alpha_bar) scaling)
    return ((x - x0) / sigma).to(out.dtype)


def lcm_patch() -> OutputPatch:
    """The patch a `ModelSamplingDiscrete` node with sampling "lcm" adds."""
    return OutputPatch(lcm_eps)
