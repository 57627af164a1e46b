"""Noise schedules and sigma schedules against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ldmgraph.diffusion import NoiseSchedule
from ldmgraph.diffusion import schedules as S
from ldmgraph.diffusion.errors import DiffusionError

SD = NoiseSchedule.from_config("linear", 0.00085, 0.012, 1000)


def _sd_alpha_bar(t: int) -> float:
    """SD's alpha_bar_t by hand: betas = (sqrt(0.00085) + k * step)^2, product of (1 - beta)."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    return math.prod(1 - (a + k * (b - a) / 999) ** 2 for k in range(t + 1))


def test_sd_scaled_linear_alphas_cumprod_closed_form():
    assert abs(float(SD.alphas_cumprod[0]) - 0.99915) < 1e-7
    assert abs(float(SD.alphas_cumprod[0]) - _sd_alpha_bar(0)) < 1e-7
    assert abs(float(SD.alphas_cumprod[999]) - _sd_alpha_bar(999)) < 1e-7
    # SD's well-known sigma range 0.0292 .. 14.6146 (k-diffusion / ComfyUI print these)
    assert abs(SD.sigma_max - 14.6146) < 1e-4 and abs(SD.sigma_min - 0.0292) < 1e-4


def test_plain_linear_and_cosine_schedules():
    plain = NoiseSchedule.from_config("linear_plain", 1e-4, 2e-2, 1000)
    assert abs(float(plain.alphas_cumprod[0]) - (1 - 1e-4)) < 1e-12
    cosine = NoiseSchedule.from_config("cosine", 0, 0, 1000)
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(cosine.alphas_cumprod[499]) - f(500) / f(0)) < 1e-9
    with pytest.raises(DiffusionError, match="unknown beta schedule"):
        NoiseSchedule.from_config("quadratic", 0.1, 0.2, 10)


def test_sigma_t_roundtrip_hits_training_sigmas():
    t = torch.tensor([0.0, 1.0, 250.0, 998.5, 999.0])
    back = SD.sigma_to_t(SD.t_to_sigma(t))
    assert torch.allclose(back, t, atol=1e-3)
    assert torch.allclose(SD.t_to_sigma(torch.tensor([0.0, 999.0])), SD.sigmas[[0, 999]])


@pytest.mark.parametrize("n", [1, 5, 20])
def test_karras_endpoints_and_rho_spacing(n):
    sigmas = S.karras(n, SD)
    assert sigmas.shape == (n + 1,) and sigmas[-1] == 0
    assert math.isclose(float(sigmas[0]), SD.sigma_max, rel_tol=1e-6)
    if n > 1:
        assert math.isclose(float(sigmas[n - 1]), SD.sigma_min, rel_tol=1e-6)
        steps = sigmas[:n].double() ** (1 / 7)
        diffs = steps[1:] - steps[:-1]
        assert torch.allclose(diffs, diffs[0].expand_as(diffs), rtol=1e-4)


@pytest.mark.parametrize("name", ["normal", "karras", "exponential", "simple", "ddim_uniform", "sgm_uniform", "beta"])
def test_every_schedule_decreases_to_zero(name):
    sigmas = getattr(S, name)(10, SD)
    assert sigmas.shape == (11,)
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all())
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_beta_schedule_follows_the_beta_quantiles():
    # Beta(1/2, 1/2) is the arcsine distribution, quantile sin^2(pi q / 2); Beta(1, 1) is uniform
    n = 12
    q = 1 - torch.arange(n, dtype=torch.float64) / n
    arcsine = torch.round(torch.sin(math.pi * q / 2) ** 2 * 999).long()
    assert torch.equal(S.beta(n, SD, 0.5, 0.5)[:-1], SD.sigmas[arcsine])
    assert torch.equal(S.beta(n, SD, 1.0, 1.0)[:-1], SD.sigmas[torch.round(q * 999).long()])
    # the default (0.6, 0.6) starts at sigma_max, crowds both ends and never repeats a step
    default = S.beta(20, SD)
    assert default[0] == SD.sigma_max and default.shape == (21,)
    steps = torch.tensor([int((SD.sigmas - s).abs().argmin()) for s in default[:-1]])
    gaps = steps[:-1] - steps[1:]  # in timesteps
    assert gaps[0] < gaps[len(gaps) // 2] and gaps[-1] < gaps[len(gaps) // 2]
    long = S.beta(900, SD)
    assert bool((long[1:] < long[:-1]).all()) and long.shape[0] < 901


def test_exponential_is_log_linear_and_ddim_uniform_picks_leading_timesteps():
    logs = S.exponential(6, SD)[:-1].log()
    assert torch.allclose(logs[1:] - logs[:-1], (logs[1] - logs[0]).expand(5), atol=1e-5)
    assert torch.equal(S.ddim_uniform(10, SD)[:-1], SD.sigmas[torch.arange(901, 0, -100)])


@pytest.mark.reference
@pytest.mark.parametrize(
    "ours,theirs", [("linear", "scaled_linear"), ("linear_plain", "linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_beta_schedules_match_diffusers(ours, theirs):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule=theirs, beta_start=0.00085, beta_end=0.012).alphas_cumprod
    mine = NoiseSchedule.from_config(ours, 0.00085, 0.012, 1000).alphas_cumprod
    assert torch.allclose(mine.float(), reference, atol=2e-6)
