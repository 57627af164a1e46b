"""Samplers: plain functions `(model, x, sigmas, extra_args, callback, generator, ...) -> x`.

`model(x, sigma, **extra_args)` is a denoiser returning x0 (see denoiser.py); x lives in the
variance-exploding parameterisation x = x0 + sigma * eps, starting at x = noise * sigmas[0]
(or noise * sqrt(1 + sigmas[0]^2) from pure noise) and ending at sigmas[-1] = 0. Stochastic
samplers draw their per-step noise from `noise_sampler(sigma, sigma_next)`; by default it draws
from `generator` on the CPU. After each network evaluation `callback({"i", "sigma", "x",
"denoised"})` runs; it may raise `Cancelled` to stop.

Agreement with diffusers (tests/diffusion/test_reference.py, same network, same starting
noise, same per-step noise; "T" = num_train_timesteps, SD's scaled_linear betas):

| ldmgraph sampler + schedule  | diffusers scheduler and settings                                              |
|------------------------------|-------------------------------------------------------------------------------|
| euler + normal               | EulerDiscreteScheduler(timestep_spacing="linspace")                            |
| euler + karras               | EulerDiscreteScheduler(use_karras_sigmas=True)                                 |
| euler_ancestral + normal     | EulerAncestralDiscreteScheduler(timestep_spacing="linspace"), same generator   |
| heun + normal / karras       | HeunDiscreteScheduler(timestep_spacing="linspace" / use_karras_sigmas=True)    |
| lms + normal / karras        | LMSDiscreteScheduler(timestep_spacing="linspace" / use_karras_sigmas=True)     |
| dpmpp_2m + sgm_uniform       | DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,      |
|                              |   timestep_spacing="linspace")                                                 |
| dpmpp_2m + karras            | the same with use_karras_sigmas=True (diffusers rounds the network's t)       |
| dpmpp_2m_sde + karras        | DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,  |
|                              |   use_karras_sigmas=True), per-step noise passed as variance_noise             |
| dpmpp_sde + normal           | DPMSolverSDEScheduler(timestep_spacing="linspace"), its noise_sampler replaced |
| ddim (eta 0 or 1) + ddim_uniform | DDIMScheduler(steps_offset=1, timestep_spacing="leading",                  |
|                              |   set_alpha_to_one=True, clip_sample=False), start x = noise*sqrt(1+sigma0^2) |
| ddpm + ddim_uniform          | DDPMScheduler(steps_offset=1, timestep_spacing="leading", clip_sample=False,   |
|                              |   variance_type="fixed_small")                                                 |
| dpm_2 + normal               | KDPM2DiscreteScheduler(timestep_spacing="linspace")                            |
| dpm_2_ancestral + normal     | KDPM2AncestralDiscreteScheduler(timestep_spacing="linspace"), same generator   |
| plms + ddim_uniform          | PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=True)      |

Notes: DDIMScheduler with SD's set_alpha_to_one=False stops at sigma(t=0) = 0.029 instead of 0,
so its last latent still holds that much noise; ours ends at sigma 0 (its x0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

Denoise = Callable[..., Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None] | None


# ---------------------------------------------------------------- helpers


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Gaussian noise shaped like x, drawn on the CPU (stable across devices) and moved to x's device."""

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu")
        return noise.to(device=x.device, dtype=x.dtype)

    return draw


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise
    (k-diffusion; Karras et al. 2022, ancestral sampling of Ho et al. 2020 in sigma form)."""
    if not eta or sigma_next == 0:
        return sigma_next, sigma_next * 0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4 with D = denoised)."""
    return (x - denoised) / sigma


def _report(callback: Callback, i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


def _setup(x: Tensor, extra_args: dict | None) -> tuple[dict, Tensor]:
    return (extra_args or {}), x.new_ones([x.shape[0]])


# ---------------------------------------------------------------- ODE samplers


@torch.no_grad()
def euler(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2, no churn)."""
    extra, s_in = _setup(x, extra_args)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        _report(callback, i, sigmas[i], x, denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def heun(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler for the step to sigma 0."""
    extra, s_in = _setup(x, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        d = _to_d(x, sigma, denoised)
        x_next = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_next
            continue
        d_next = _to_d(x_next, sigma_next, model(x_next, sigma_next * s_in, **extra))
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def dpm_2(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) in k-diffusion's form: midpoint at the
    geometric mean of sigma and sigma_next."""
    extra, s_in = _setup(x, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        d = _to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = (sigma.log() + sigma_next.log()).div(2).exp()
        x_mid = x + d * (sigma_mid - sigma)
        d_mid = _to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in, **extra))
        x = x + d_mid * (sigma_next - sigma)
    return x


def _lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial through t_i, ..., t_{i-order+1}
    for node t_{i-j} (linear multistep coefficients, exact polynomial integration)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    integral = poly.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


@torch.no_grad()
def lms(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last `order` derivatives (k-diffusion)."""
    extra, s_in = _setup(x, extra_args)
    sigmas_np = sigmas.detach().cpu().double().numpy()
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        _report(callback, i, sigmas[i], x, denoised)
        history = [_to_d(x, sigmas[i], denoised), *history][:order]
        coeffs = [_lms_coefficient(len(history), sigmas_np, i, j) for j in range(len(history))]
        x = x + sum(c * d for c, d in zip(coeffs, history, strict=True))
    return x


@torch.no_grad()
def dpmpp_2m(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) in lambda = -log(sigma); first order at the
    first step and at the step to sigma 0."""
    extra, s_in = _setup(x, extra_args)
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        blend = denoised
        if old_denoised is not None and h_last is not None:
            r = h_last / h
            blend = denoised + (denoised - old_denoised) / (2 * r)
        x = (sigma_next / sigma) * x - torch.expm1(-h) * blend
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def ddim(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) written for x / sqrt(alpha_bar); eta 0 is deterministic
    (and equals Euler in sigma), eta 1 is DDPM-like ancestral sampling."""
    extra, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        eps = (x - denoised) / sigma
        alpha_bar, alpha_bar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        std = eta * ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)).sqrt()
        direction = ((1 - alpha_bar_next - std**2).clamp_min(0) / alpha_bar_next).sqrt()
        x = denoised + direction * eps
        if eta and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * std / alpha_bar_next.sqrt()
    return x


@torch.no_grad()
def plms(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM, eq. 12 with the 4th-order Adams-Bashforth
    combination of eps); the first step uses the pseudo improved-Euler warm-up of the original
    LDM PLMS sampler, each step a DDIM (eta 0) transfer with the combined eps."""
    extra, s_in = _setup(x, extra_args)
    history: list[Tensor] = []
    weights = {
        1: [1.0],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        eps = (x - denoised) / sigma
        if not history and sigma_next > 0:
            x_guess = denoised + sigma_next * eps
            eps_next = (x_guess - model(x_guess, sigma_next * s_in, **extra)) / sigma_next
            eps_used = (eps + eps_next) / 2
        else:
            recent = [eps, *history][:4]
            eps_used = sum(
                (w * e for w, e in zip(weights[len(recent)], recent, strict=True)), torch.zeros_like(eps)
            )
        _report(callback, i, sigma, x, x - sigma * eps_used)
        x = x + eps_used * (sigma_next - sigma)
        history = [eps, *history][:3]
    return x


# ---------------------------------------------------------------- ancestral and SDE samplers


@torch.no_grad()
def euler_ancestral(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion)."""
    extra, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def dpm_2_ancestral(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DPM-Solver-2: the dpm_2 step to sigma_down, then noise of std sigma_up (k-diffusion)."""
    extra, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = _to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = (sigma.log() + sigma_down.log()).div(2).exp()
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = _to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in, **extra))
            x = x + d_mid * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def ddpm(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DDPM: sample the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7),
    written for x / sqrt(alpha_bar) with alpha_bar = 1 / (1 + sigma^2)."""
    extra, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        alpha_bar, alpha_bar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        alpha = alpha_bar / alpha_bar_next
        beta = 1 - alpha
        x = beta / (1 - alpha_bar) * denoised + alpha * (1 - alpha_bar_next) / (1 - alpha_bar) * x
        if sigma_next > 0:
            std = (beta * (1 - alpha_bar_next) / (1 - alpha_bar) / alpha_bar_next).sqrt()
            x = x + noise_sampler(sigma, sigma_next) * std
    return x


@torch.no_grad()
def dpmpp_2m_sde(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M) with the midpoint correction (Lu et al. 2022b, Appendix; k-diffusion)."""
    extra, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        decay = -torch.expm1(-h - eta_h)
        x = sigma_next / sigma * (-eta_h).exp() * x + decay * denoised
        if old_denoised is not None and h_last is not None:
            x = x + 0.5 * decay * (h / h_last) * (denoised - old_denoised)
        if eta:
            x = (
                x
                + noise_sampler(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
            )
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def dpmpp_sde(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 stages at ratio r = 1/2; k-diffusion's DPM-Solver++(2S) SDE).

    k-diffusion and diffusers feed it Brownian-tree noise (torchsde); our default noise sampler
    draws independent Gaussians per sub-step, and any Brownian sampler can be passed instead."""
    extra, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        lam, lam_next = -sigma.log(), -sigma_next.log()
        sigma_mid = (-(lam + (lam_next - lam) * r)).exp()
        down, up = ancestral_step(sigma, sigma_mid, eta)
        x_mid = (down / sigma) * x - torch.expm1(lam + down.log()) * denoised
        x_mid = x_mid + noise_sampler(sigma, sigma_mid) * s_noise * up
        denoised_mid = model(x_mid, sigma_mid * s_in, **extra)
        down, up = ancestral_step(sigma, sigma_next, eta)
        blend = (1 - fac) * denoised + fac * denoised_mid
        x = (down / sigma) * x - torch.expm1(lam + down.log()) * blend
        x = x + noise_sampler(sigma, sigma_next) * s_noise * up
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_sde": dpmpp_sde,
    "plms": plms,
}
