"""Training noise schedules: betas -> alphas_cumprod -> sigmas, and the timestep <-> sigma maps.

A discrete DDPM schedule (Ho et al. 2020) with alpha_bar_t = prod_{s<=t} (1 - beta_s) is the
variance-exploding process x = x0 + sigma * eps with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
after dividing x_t by sqrt(alpha_bar_t) (Karras et al. 2022, Sec. 2 and Appendix C.2). Samplers
work in sigma; the network is called with the (fractional) timestep whose sigma matches,
found by linear interpolation in log-sigma as k-diffusion's DiscreteSchedule does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldmgraph.diffusion.errors import DiffusionError

# Accepted spellings of each beta schedule (original LDM config names and diffusers names).
_SCALED_LINEAR = {"linear", "scaled_linear"}
_PLAIN_LINEAR = {"linear_plain", "plain_linear", "sqrt_linear"}
_COSINE = {"cosine", "squaredcos_cap_v2"}
BETA_SCHEDULES = sorted(_SCALED_LINEAR | _PLAIN_LINEAR | _COSINE)


def make_betas(
    beta_schedule: str, linear_start: float, linear_end: float, timesteps: int, cosine_s: float = 8e-3
) -> Tensor:
    """Betas in float64 for one of the original latent-diffusion schedules.

    "linear" (SD's, diffusers' "scaled_linear"): linspace in sqrt(beta) from sqrt(linear_start) to
    sqrt(linear_end), squared. "linear_plain" (the original code's "sqrt_linear", diffusers'
    "linear"): linspace in beta. "cosine": Nichol & Dhariwal 2021, eq. 17, with offset s and betas
    clipped to 0.999.
    """
    if beta_schedule in _SCALED_LINEAR:
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if beta_schedule in _PLAIN_LINEAR:
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if beta_schedule in _COSINE:
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)
    raise DiffusionError(
        f"unknown beta schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}"
    )


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A model's training noise schedule, as sigmas indexed by integer timestep.

    Build it with `NoiseSchedule.from_config(...)` (the original configs' `beta_schedule`,
    `linear_start`, `linear_end`, `timesteps`) or `NoiseSchedule.from_betas(betas)`.
    """

    alphas_cumprod: Tensor  # [T] float64
    sigmas: Tensor  # [T] float32, increasing with t
    log_sigmas: Tensor  # [T] float32

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseSchedule:
        """Schedule from explicit betas (any float dtype; computed in float64)."""
        alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        # the log is taken in float64 and then rounded, as ComfyUI's ModelSamplingDiscrete does:
        # the float32 log of a rounded sigma can land a sigma on the other side of a midpoint
        return cls(alphas_cumprod=alphas_cumprod, sigmas=sigmas.to(torch.float32), log_sigmas=sigmas.log().to(torch.float32))

    @classmethod
    def from_config(
        cls,
        beta_schedule: str = "linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
    ) -> NoiseSchedule:
        """Schedule from the training configuration (defaults: Stable Diffusion 1.x/2.x)."""
        return cls.from_betas(make_betas(beta_schedule, linear_start, linear_end, timesteps))

    @property
    def timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep for each sigma: linear interpolation in log-sigma (k-diffusion),
        clamped to 0..T-1."""
        log_sigmas = (
            self.log_sigmas if self.log_sigmas.device == sigma.device else self.log_sigmas.to(sigma.device)
        )
        log_sigma = sigma.to(torch.float32).log().reshape(-1)
        high = torch.searchsorted(log_sigmas, log_sigma).clamp_(1, log_sigmas.shape[0] - 1)
        lo, hi = log_sigmas[high - 1], log_sigmas[high]
        w = ((log_sigma - lo) / (hi - lo)).clamp_(0, 1)
        return (high - 1).to(torch.float32).add_(w).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma linearly."""
        t = t.to(torch.float32)
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(0, log_sigmas.shape[0] - 1)
        high = t.ceil().long().clamp(0, log_sigmas.shape[0] - 1)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def alpha_bar_at(self, sigma: Tensor) -> Tensor:
        """alpha_bar for a sigma: 1 / (1 + sigma^2), the VP <-> VE identity."""
        return 1.0 / (1.0 + sigma**2)
