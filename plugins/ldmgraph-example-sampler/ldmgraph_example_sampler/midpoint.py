"""The explicit midpoint method (2nd-order Runge-Kutta) on the probability-flow ODE.

dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4 with the denoiser D). One
step from sigma to sigma_next evaluates the slope at x, moves half the step to
sigma_mid = (sigma + sigma_next) / 2, and uses the slope there for the full step (the midpoint
rule, e.g. Hairer, Norsett & Wanner, "Solving ODEs I", II.1). The step to sigma = 0 is Euler's,
because the slope is undefined at sigma = 0. Written to ldmgraph's sampler contract
(docs/INTERFACES.md): the same signature as the built-in samplers.
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
    generator: torch.Generator | None = None,
) -> Tensor:
    """Explicit midpoint rule over `sigmas` (two denoiser calls per step, one for the last)."""
    extra = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
            continue
        sigma_mid = (sigma + sigma_next) / 2
        x_mid = x + slope * (sigma_mid - sigma)
        slope_mid = (x_mid - model(x_mid, sigma_mid * s_in, **extra)) / sigma_mid
        x = x + slope_mid * (sigma_next - sigma)
    return x
