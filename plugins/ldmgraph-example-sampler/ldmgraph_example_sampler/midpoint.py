"""Explicit two-stage Runge-Kutta (the midpoint rule by default) on the probability-flow ODE.

dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4 with the denoiser D). One
step of size h = sigma_next - sigma evaluates the slope k1 at x, takes a second slope k2 at
sigma + alpha h along k1, and moves by h ((1 - 1/(2 alpha)) k1 + 1/(2 alpha) k2): the
second-order family of Hairer, Norsett & Wanner, "Solving ODEs I", II.1 (alpha 1/2 = midpoint,
2/3 = Ralston, 1 = Heun). The step to sigma = 0 is Euler's, because the slope is undefined there.
Written to ldmgraph's sampler contract (ldmgraph/diffusion/samplers.py): the same signature as
the built-in samplers, with its one option `alpha` declared in the plugin's entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def sample_midpoint(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    noise_sampler: Callable[[float, float], Tensor] | None = None,
    alpha: float = 0.5,
) -> Tensor:
    """Two-stage explicit Runge-Kutta over `sigmas` (two denoiser calls per step, one for the last)."""
    extra = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})
        slope = (x - denoised) / sigma
        h = sigma_next - sigma
        if sigma_next == 0:
            x = x + slope * h
            continue
        sigma_mid = sigma + alpha * h
        x_mid = x + slope * (alpha * h)
        slope_mid = (x_mid - model(x_mid, sigma_mid * s_in, **extra)) / sigma_mid
        weight = 1 / (2 * alpha)
        x = x + (slope * (1 - weight) + slope_mid * weight) * h
    return x
