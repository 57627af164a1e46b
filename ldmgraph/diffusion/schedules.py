"""Sigma schedules for sampling: `fn(n, noise_schedule) -> n + 1 sigmas, decreasing, ending in 0`.

The names and definitions are the ones ComfyUI users know (see docs/REFERENCE.md); each is
registered by name through the `ldmgraph_schedules` hook (ldmgraph/diffusion/registry.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldmgraph.diffusion.noise_schedule import NoiseSchedule


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float32), sigmas.new_zeros(1, dtype=torch.float32)])


def normal(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """n timesteps evenly spaced from the last training step to the first (diffusers "linspace")."""
    t_max = noise_schedule.timesteps - 1
    return _append_zero(noise_schedule.t_to_sigma(torch.linspace(t_max, 0, n)))


def sgm_uniform(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """n + 1 evenly spaced timesteps without the last (the SGM / diffusers DPM-Solver spacing)."""
    t_max = noise_schedule.timesteps - 1
    return _append_zero(noise_schedule.t_to_sigma(torch.linspace(t_max, 0, n + 1)[:-1]))


def karras(n: int, noise_schedule: NoiseSchedule, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), rho = 7."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = noise_schedule.sigma_min ** (1 / rho), noise_schedule.sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """Sigmas evenly spaced in log-sigma from sigma_max to sigma_min."""
    log_sigmas = torch.linspace(math.log(noise_schedule.sigma_max), math.log(noise_schedule.sigma_min), n)
    return _append_zero(log_sigmas.exp())


def simple(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """Every (T/n)-th training sigma counted from the top (ComfyUI's "simple")."""
    sigmas = noise_schedule.sigmas
    stride = sigmas.shape[0] / n
    return _append_zero(torch.stack([sigmas[-(1 + int(k * stride))] for k in range(n)]))


def ddim_uniform(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """Timesteps 1 + k * (T // n), high to low: DDIM's "uniform" discretisation (Song et al. 2021,
    original code) = diffusers' "leading" spacing with steps_offset=1."""
    stride = max(noise_schedule.timesteps // n, 1)
    timesteps = torch.arange(1, noise_schedule.timesteps, stride)[:n].flip(0)
    return _append_zero(noise_schedule.sigmas[timesteps])


def beta(n: int, noise_schedule: NoiseSchedule, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at the Beta(alpha, beta) quantiles of 1 - k/n, k = 0..n-1, rounded to training steps
    (Lee et al. 2024, "Beta sampling is all you need"; ComfyUI's "beta", alpha = beta = 0.6). With
    alpha, beta < 1 the steps crowd at both ends of the schedule. A timestep that rounding repeats
    is taken once, so very long schedules may have fewer than n steps."""
    import numpy as np
    from scipy.special import betaincinv

    quantiles = 1.0 - np.arange(n) / n
    timesteps = np.rint(betaincinv(alpha, beta, quantiles) * (noise_schedule.timesteps - 1)).astype(np.int64)
    keep = np.concatenate([[True], timesteps[1:] != timesteps[:-1]])
    return _append_zero(noise_schedule.sigmas[torch.from_numpy(timesteps[keep])])
