"""Samplers: plain functions `(model, x, sigmas, extra_args, callback, noise_sampler, **options) -> x`.

One contract for built-in and plugin samplers. `model(x, sigma, **extra_args)` is a denoiser
returning x0 (see denoiser.py; sigma is a CPU tensor `[B]`). x lives in the variance-exploding
parameterisation x = x0 + sigma * eps, starts at the noised latent (sampling.py chooses the start
noise scale) and ends at sigmas[-1] (0 for a full run). Stochastic samplers draw their per-step
noise from `noise_sampler(sigma, sigma_next)` (floats), which the caller builds from the run's
noise source and convention (noise.py); without one they draw unseeded noise. After each network
evaluation `callback({"i", "sigma", "x", "denoised"})` runs; it may raise `Cancelled` to stop.
A sampler's own options (eta, s_noise, order, ...) are keyword arguments declared with types,
bounds and defaults in registry.py (`SamplerOption`), which is what the graph shows and checks.

Agreement with diffusers (tests/diffusion/test_reference.py, same network, same starting
noise, same per-step noise; tests/workflows/test_diffusers_equivalence.py, whole workflows against
`StableDiffusionPipeline`; "T" = num_train_timesteps, SD's scaled_linear betas):

| ldmgraph sampler + schedule  | diffusers scheduler and settings                                              |
|------------------------------|-------------------------------------------------------------------------------|
| euler + normal               | EulerDiscreteScheduler(timestep_spacing="linspace")                            |
| euler + karras               | EulerDiscreteScheduler(use_karras_sigmas=True)                                 |
| euler_ancestral + normal     | EulerAncestralDiscreteScheduler(timestep_spacing="linspace"), same generator   |
| heun + normal / karras       | HeunDiscreteScheduler(timestep_spacing="linspace" / use_karras_sigmas=True)    |
| lms + normal / karras        | LMSDiscreteScheduler(timestep_spacing="linspace" / use_karras_sigmas=True)     |
| dpmpp_2m + linspace_rounded  | DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,      |
|                              |   timestep_spacing="linspace"): diffusers rounds these timesteps; sgm_uniform  |
|                              |   is the same unrounded (equal when steps divide 999)                          |
| dpmpp_2m + karras            | the same with use_karras_sigmas=True (diffusers rounds the network's t)       |
| dpmpp_2m_sde + karras        | DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,  |
|                              |   use_karras_sigmas=True), per-step noise passed as variance_noise             |
| dpmpp_sde + normal           | DPMSolverSDEScheduler(timestep_spacing="linspace"), its noise_sampler replaced |
| ddim (eta 0 or 1) + leading  | DDIMScheduler(steps_offset=1, timestep_spacing="leading", clip_sample=False,   |
|                              |   set_alpha_to_one=True; False with final_alpha="first"), start_noise "vp"    |
| ddpm + leading               | DDPMScheduler(steps_offset=1, timestep_spacing="leading", clip_sample=False,   |
|                              |   variance_type="fixed_small")                                                 |
| dpm_2 + normal               | KDPM2DiscreteScheduler(timestep_spacing="linspace")                            |
| dpm_2_ancestral + normal     | KDPM2AncestralDiscreteScheduler(timestep_spacing="linspace"), same generator   |
| plms + leading               | PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=True;      |
|                              |   False with final_alpha="first")                                              |
| uni_pc_bh2 (order 2, 3) + linspace_rounded / karras | UniPCMultistepScheduler(solver_type="bh2", solver_order=2 / 3) |
| uni_pc (order 2, 3)          | UniPCMultistepScheduler(solver_type="bh1", final_sigmas_type="sigma_min")      |

With convention "diffusers" (noise.py) one generator serves the whole run, as a pipeline given one
`torch.Generator`; a latent straight from VAEEncode is then sampled from its posterior first, as
`StableDiffusionImg2ImgPipeline` does (tests/workflows/test_diffusers_conventions.py; img2img there
runs the last int(steps * strength) steps: SplitSigmas at steps - int(steps * strength)).

Start noise ("start_noise" of the noise source, noise.py): diffusers' Euler, Heun and LMS with
"linspace" spacing start at noise * sigma_max ("sigma"); its DDIM, PNDM, DDPM, DPM-Solver and UniPC
at noise in VP space, noise * sqrt(1 + sigma0^2) here ("vp"); "auto" is ComfyUI's rule.

Notes: DDIMScheduler and PNDMScheduler with SD's set_alpha_to_one=False stop at sigma(t=0) = 0.029
instead of 0, so their last latent still holds that much noise: the option final_alpha="first"
does the same (and returns that latent as the network saw it, x / sqrt(1 + sigma^2)); the default
"one" ends at sigma 0 (the x0 prediction). diffusers' UniPC with bh1 returns NaN on a step to sigma 0 (it divides by B(h) = h = infinity); ours takes the x0
prediction there, as every order-1 step to sigma 0 does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

Denoise = Callable[..., Tensor]
NoiseSampler = Callable[[float, float], Tensor]
Callback = Callable[[dict[str, Any]], None] | None

# The step arithmetic uses Python floats for the noise levels (read once with `tolist()`): no
# device sync per step and a few fused kernels, which keeps the loop's own cost far below the
# network's even for small models on a GPU.


# ---------------------------------------------------------------- helpers


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Gaussian noise shaped like x, drawn on the CPU (stable across devices) and moved to x's
    device; unseeded unless a generator is given (runs through the graph always pass their own)."""

    def draw(sigma: float, sigma_next: float) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu")
        return noise.to(device=x.device, dtype=x.dtype)

    return draw


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise
    (k-diffusion; Karras et al. 2022, ancestral sampling of Ho et al. 2020 in sigma form)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _levels(sigmas: Tensor) -> list[float]:
    return [float(v) for v in sigmas.tolist()]


def _at(x: Tensor, sigma: float) -> Tensor:
    """The noise level as the denoiser takes it: a CPU tensor [B]."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float32)


def _euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """x + (sigma_next - sigma) * (x - denoised) / sigma: Euler on dx/dsigma = (x - D) / sigma
    (Karras et al. 2022, eq. 4), as one lerp towards D."""
    return torch.lerp(x, denoised, 1.0 - sigma_next / sigma)


def _final_levels(model: Denoise, sigmas: Tensor, final_alpha: str) -> list[float]:
    """The noise levels, with a last 0 replaced by sigma(t=0) when final_alpha is "first"
    (the model's smallest training sigma, read from its noise schedule)."""
    levels = _levels(sigmas)
    if final_alpha == "first" and len(levels) > 1 and levels[-1] == 0:
        levels[-1] = float(model.noise_schedule.sigma_min)
    return levels


def _final_output(x: Tensor, levels: list[float], sigmas: Tensor, final_alpha: str) -> Tensor:
    """With final_alpha "first", the last latent as the network sees it, x * sqrt(alpha_bar(0))."""
    if final_alpha == "first" and len(levels) > 1 and float(sigmas[-1]) == 0:
        return x / math.sqrt(1 + levels[-1] ** 2)
    return x


def _report(callback: Callback, i: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


# ---------------------------------------------------------------- ODE samplers


@torch.no_grad()
def euler(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2, no churn)."""
    extra, levels = extra_args or {}, _levels(sigmas)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        x = _euler_step(x, denoised, sigma, sigma_next)
    return x


@torch.no_grad()
def heun(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler for the step to sigma 0."""
    extra, levels = extra_args or {}, _levels(sigmas)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        x_next = _euler_step(x, denoised, sigma, sigma_next)
        if sigma_next == 0:
            x = x_next
            continue
        denoised_next = model(x_next, _at(x, sigma_next), **extra)
        slope = (x - denoised) / sigma + (x_next - denoised_next) / sigma_next
        x = x + slope * ((sigma_next - sigma) / 2)
    return x


@torch.no_grad()
def dpm_2(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) in k-diffusion's form: midpoint at the
    geometric mean of sigma and sigma_next."""
    extra, levels = extra_args or {}, _levels(sigmas)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        x = _dpm_2_step(model, extra, x, denoised, sigma, sigma_next)
    return x


def _dpm_2_step(
    model: Denoise, extra: dict, x: Tensor, denoised: Tensor, sigma: float, target: float
) -> Tensor:
    """One DPM-Solver-2 step from sigma to target (Euler when target is 0)."""
    if target == 0:
        return _euler_step(x, denoised, sigma, target)
    sigma_mid = math.sqrt(sigma * target)
    x_mid = _euler_step(x, denoised, sigma, sigma_mid)
    denoised_mid = model(x_mid, _at(x, sigma_mid), **extra)
    return x + (x_mid - denoised_mid) * ((target - sigma) / sigma_mid)


def _lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
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
    noise_sampler: NoiseSampler | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last `order` derivatives (k-diffusion)."""
    extra, levels = extra_args or {}, _levels(sigmas)
    history: list[Tensor] = []
    for i in range(len(levels) - 1):
        denoised = model(x, _at(x, levels[i]), **extra)
        _report(callback, i, levels[i], x, denoised)
        history = [(x - denoised) / levels[i], *history][:order]
        for j, slope in enumerate(history):
            x = x + slope * _lms_coefficient(len(history), levels, i, j)
    return x


@torch.no_grad()
def dpmpp_2m(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) in lambda = -log(sigma); first order at the
    first step and at the step to sigma 0."""
    extra, levels = extra_args or {}, _levels(sigmas)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        blend = denoised
        if old_denoised is not None:
            blend = torch.lerp(denoised, old_denoised, -h / (2 * h_last))  # D + (D - D_old) / (2 r)
        x = torch.add(x * (sigma_next / sigma), blend, alpha=-math.expm1(-h))
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def ddim(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
    final_alpha: str = "one",
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) written for x / sqrt(alpha_bar); eta 0 is deterministic
    (and equals Euler in sigma), eta 1 is DDPM-like ancestral sampling. final_alpha "first" ends
    at alpha_bar(t=0) instead of 1 (diffusers' set_alpha_to_one=False)."""
    extra, levels = extra_args or {}, _final_levels(model, sigmas, final_alpha)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        alpha_bar, alpha_bar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        std = eta * math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next))
        direction = math.sqrt(max(1 - alpha_bar_next - std**2, 0.0) / alpha_bar_next)
        x = torch.lerp(x, denoised, 1.0 - direction / sigma)  # x0 + direction * eps
        if eta and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * (std / math.sqrt(alpha_bar_next))
    return _final_output(x, levels, sigmas, final_alpha)


@torch.no_grad()
def plms(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    final_alpha: str = "one",
) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM, eq. 12 with the 4th-order Adams-Bashforth
    combination of eps); the first step uses the pseudo improved-Euler warm-up of the original
    LDM PLMS sampler, each step a DDIM (eta 0) transfer with the combined eps. final_alpha as for
    ddim."""
    extra, levels = extra_args or {}, _final_levels(model, sigmas, final_alpha)
    history: list[Tensor] = []
    weights = {
        1: [1.0],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        eps = (x - denoised) / sigma
        if not history and sigma_next > 0:
            x_guess = x + eps * (sigma_next - sigma)
            eps_next = (x_guess - model(x_guess, _at(x, sigma_next), **extra)) / sigma_next
            eps_used = (eps + eps_next) / 2
        else:
            recent = [eps, *history][:4]
            eps_used = sum(
                (w * e for w, e in zip(weights[len(recent)], recent, strict=True)), torch.zeros_like(eps)
            )
        _report(callback, i, sigma, x, x - sigma * eps_used)
        x = x + eps_used * (sigma_next - sigma)
        history = [eps, *history][:3]
    return _final_output(x, levels, sigmas, final_alpha)


# ---------------------------------------------------------------- ancestral and SDE samplers


@torch.no_grad()
def euler_ancestral(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion)."""
    extra, levels = extra_args or {}, _levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _euler_step(x, denoised, sigma, sigma_down)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def dpm_2_ancestral(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2: the dpm_2 step to sigma_down, then noise of std sigma_up (k-diffusion)."""
    extra, levels = extra_args or {}, _levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm_2_step(model, extra, x, denoised, sigma, sigma_down)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def ddpm(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DDPM: sample the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7),
    written for x / sqrt(alpha_bar) with alpha_bar = 1 / (1 + sigma^2)."""
    extra, levels = extra_args or {}, _levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        alpha_bar, alpha_bar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        alpha = alpha_bar / alpha_bar_next
        beta = 1 - alpha
        # posterior mean: beta / (1 - alpha_bar) * x0 + alpha (1 - alpha_bar_next) / (1 - alpha_bar) * x,
        # whose two weights sum to 1 in this parameterisation
        x = torch.lerp(x, denoised, beta / (1 - alpha_bar))
        if sigma_next > 0:
            std = math.sqrt(beta * (1 - alpha_bar_next) / (1 - alpha_bar) / alpha_bar_next)
            x = x + noise_sampler(sigma, sigma_next) * std
    return x


@torch.no_grad()
def lcm(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1;
    ComfyUI's `lcm`): jump to the model's x0, then noise it afresh to the next level, x0 + sigma_next * z."""
    extra, levels = extra_args or {}, _levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next
    return x


@torch.no_grad()
def dpmpp_2m_sde(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Appendix; k-diffusion), with the midpoint or Heun
    second-order correction."""
    extra, levels = extra_args or {}, _levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        decay = -math.expm1(-h - eta_h)
        x = torch.add(x * (sigma_next / sigma * math.exp(-eta_h)), denoised, alpha=decay)
        if old_denoised is not None:
            if solver_type == "heun":
                weight = 1 - decay / (h + eta_h)
            else:
                weight = 0.5 * decay
            x = x + (denoised - old_denoised) * (weight * h / h_last)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * (
                sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
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
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 stages at ratio r = 1/2; k-diffusion's DPM-Solver++(2S) SDE).

    k-diffusion and diffusers feed it Brownian-tree noise (torchsde); our default noise sampler
    draws independent Gaussians per sub-step, and any Brownian sampler can be passed instead."""
    extra, levels = extra_args or {}, _levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    fac = 1 / (2 * r)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            x = _euler_step(x, denoised, sigma, sigma_next)
            continue
        sigma_mid = sigma ** (1 - r) * sigma_next**r  # lambda_mid = lambda + r * h
        down, up = ancestral_step(sigma, sigma_mid, eta)
        x_mid = torch.lerp(x, denoised, 1 - down / sigma) + noise_sampler(sigma, sigma_mid) * (s_noise * up)
        denoised_mid = model(x_mid, _at(x, sigma_mid), **extra)
        down, up = ancestral_step(sigma, sigma_next, eta)
        blend = torch.lerp(denoised, denoised_mid, fac)
        x = torch.lerp(x, blend, 1 - down / sigma) + noise_sampler(sigma, sigma_next) * (s_noise * up)
    return x


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, Tensor]],
    order: int,
    variant: str,
    denoised_next: Tensor | None = None,
) -> Tensor:
    """One UniPC update from (x, sigma) to sigma_next (Zhao et al. 2023, data prediction, Alg. 2).

    ``history`` holds (lambda, x0 prediction) of the last steps, newest last; the newest is at sigma.
    Without ``denoised_next`` this is the predictor UniP of ``order`` (order - 1 earlier points);
    with it, the corrector UniC of ``order``, which adds the model output at sigma_next as one more
    point (rk = 1). lambda = -log(sigma) here (x = x0 + sigma * eps, so alpha = 1). B(h) is h for
    "bh1" and e^h - 1 for "bh2" (with h taken negative, as for data prediction).
    """
    lam, m0 = history[-1]
    hh = lam + math.log(sigma_next)  # -(lambda_next - lambda)
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    earlier = history[-order:-1][::-1]  # the order - 1 points before the newest, newest first
    ratios = [(lam_k - lam) / -hh for lam_k, _ in earlier]
    slopes = [(m_k - m0) / r for (_, m_k), r in zip(earlier, ratios, strict=True)]
    base = x * (sigma_next / sigma) - m0 * h_phi_1
    if denoised_next is not None:
        ratios.append(1.0)
        slopes.append(denoised_next - m0)
    if not slopes:
        return base
    # rhos solve R rho = b with R[i][k] = r_k^i and b_i = i! * phi_{i+1}(h) / B(h), i = 0..n-1
    n = len(slopes)
    phi, factorial, rhs = h_phi_1 / hh - 1.0, 1.0, []
    for i in range(n):
        rhs.append(phi * factorial / b_h)
        factorial *= i + 2
        phi = phi / hh - 1.0 / factorial
    if n == 1:
        rhos = [0.5]  # one point: the fixed weight of the UniPC reference code (predictor 2, corrector 1)
    else:
        rhos = np.linalg.solve(np.vander(np.asarray(ratios), n, increasing=True).T, np.asarray(rhs)).tolist()
    correction = sum(r * d for r, d in zip(rhos, slopes, strict=True))
    return base - correction * b_h


def _uni_pc(model: Denoise, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback,
            order: int, variant: str) -> Tensor:
    extra, levels = extra_args or {}, _levels(sigmas)
    steps = len(levels) - 1
    history: list[tuple[float, Tensor]] = []
    last_x, last_order = x, 0
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, _at(x, sigma), **extra)
        _report(callback, i, sigma, x, denoised)
        if history:  # UniC: correct x with the output just computed there (no extra evaluation)
            x = _unipc_update(last_x, levels[i - 1], sigma, history, last_order, variant, denoised)
        history = [*history, (-math.log(sigma), denoised)][-order:]
        if sigma_next == 0:
            x = denoised
            continue
        last_order = min(order, steps - i, len(history))  # warm up, and lower orders at the end
        last_x = x
        x = _unipc_update(x, sigma, sigma_next, history, last_order, variant)
    return x


@torch.no_grad()
def uni_pc(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 3,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor UniP with the corrector UniC after every step,
    B(h) = h ("bh1"), data prediction; order 3 with lower orders while warming up and at the end."""
    return _uni_pc(model, x, sigmas, extra_args, callback, order, "bh1")


@torch.no_grad()
def uni_pc_bh2(
    model: Denoise,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 3,
) -> Tensor:
    """UniPC with B(h) = e^h - 1 ("bh2"), which the UniPC authors recommend for guided sampling."""
    return _uni_pc(model, x, sigmas, extra_args, callback, order, "bh2")


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "lcm": lcm,
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
    "uni_pc": uni_pc,
    "uni_pc_bh2": uni_pc_bh2,
}
