"""Sigma schedules for sampling: `fn(n, noise_schedule) -> decreasing sigmas ending in 0`.

Each ComfyUI-named schedule (normal, karras, exponential, simple, sgm_uniform, ddim_uniform,
beta) gives ComfyUI's sigmas for the same model and step count (its `comfy/samplers.py`
schedulers, restated in each docstring); `leading` and `trailing` are diffusers' timestep
spacings for its DDIM-family schedulers, `linspace_rounded` its "linspace" spacing for its
multistep solvers (DPM-Solver++, UniPC). Each is registered by name through the
`ldmgraph_schedules` hook (ldmgraph/diffusion/registry.py). Most return n + 1 sigmas; ComfyUI's
ddim_uniform and beta may return a different count, as ComfyUI's do.
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


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: n sigmas evenly spaced in sigma^(1/rho) from sigma_max to
    sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def karras(n: int, noise_schedule: NoiseSchedule, rho: float = 7.0) -> Tensor:
    """Karras sigmas between the model's smallest and largest training sigma, rho = 7."""
    return karras_sigmas(n, noise_schedule.sigma_min, noise_schedule.sigma_max, rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas evenly spaced in log-sigma from sigma_max to sigma_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def exponential(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """Exponential sigmas between the model's smallest and largest training sigma."""
    return exponential_sigmas(n, noise_schedule.sigma_min, noise_schedule.sigma_max)


def simple(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """Every (T/n)-th training sigma counted from the top (ComfyUI's "simple")."""
    sigmas = noise_schedule.sigmas
    stride = sigmas.shape[0] / n
    return _append_zero(torch.stack([sigmas[-(1 + int(k * stride))] for k in range(n)]))


def ddim_uniform(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """ComfyUI's ddim_uniform: every timestep 1 + k * max(T // n, 1) below T, high to low, then 0.
    With T = 1000 that is one more than n steps when T // n does not divide 999 (n = 6: seven
    steps from t = 997); when sigma(t=1) is 0 (zero-terminal-SNR schedules) the last one is
    dropped by ComfyUI's step count instead."""
    stride = max(noise_schedule.timesteps // n, 1)
    timesteps = torch.arange(1, noise_schedule.timesteps, stride).flip(0)
    return _append_zero(noise_schedule.sigmas[timesteps])


def leading(n: int, noise_schedule: NoiseSchedule, steps_offset: int = 1) -> Tensor:
    """diffusers' "leading" timestep spacing: timesteps k * (T // n) + steps_offset, k = n-1..0
    (DDIM's "uniform" discretisation, Song et al. 2021; with steps_offset = 1, SD's scheduler
    configuration), then 0."""
    stride = max(noise_schedule.timesteps // n, 1)
    timesteps = (torch.arange(n) * stride + steps_offset).clamp(max=noise_schedule.timesteps - 1).flip(0)
    return _append_zero(noise_schedule.sigmas[timesteps])


def lcm(n: int, noise_schedule: NoiseSchedule, original_steps: int = 50) -> Tensor:
    """The Latent Consistency Model's timesteps (Luo et al. 2023; diffusers' `LCMScheduler`): of the
    distillation schedule k * (T // original_steps) - 1, k = original_steps..1, the entries at
    floor(i * original_steps / n), i = 0..n-1 (999, 759, 499, 259 for 4 steps), then 0."""
    skip = noise_schedule.timesteps // original_steps
    origin = (torch.arange(original_steps, 0, -1) * skip - 1).long()
    picks = torch.floor(torch.arange(n, dtype=torch.float64) * (original_steps / n)).long()
    return _append_zero(noise_schedule.sigmas[origin[picks.clamp(max=original_steps - 1)]])


def trailing(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """diffusers' "trailing" timestep spacing: round(T - k * T / n) - 1, k = 0..n-1, then 0."""
    T = noise_schedule.timesteps
    timesteps = (torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1).long()[:n]
    return _append_zero(noise_schedule.sigmas[timesteps])


def linspace_rounded(n: int, noise_schedule: NoiseSchedule) -> Tensor:
    """diffusers' "linspace" timestep spacing of its multistep solvers (DPMSolverMultistepScheduler,
    UniPCMultistepScheduler): n + 1 timesteps evenly spaced from 0 to T - 1, rounded to integers
    (half to even, numpy's rule), high to low, the last (0) dropped; then 0. The network then sees
    integer timesteps. sgm_uniform is the same spacing unrounded: with T = 1000 the two agree when n
    divides 999 (n = 9: 999, 888, ...) and differ otherwise (n = 8: 999, 874, 749, 624, 500, ...
    here; 999, 874.125, 749.25, 624.375, 499.5, ... there)."""
    import numpy as np

    T = noise_schedule.timesteps
    timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return _append_zero(noise_schedule.sigmas[torch.from_numpy(timesteps.copy())])


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
