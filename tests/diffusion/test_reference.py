"""Agreement with diffusers' schedulers: same U-Net, same starting noise, same per-step noise.

The table of which diffusers settings match which of our names is in the docstring of
ldmgraph/diffusion/samplers.py. diffusers runs its own loop (scale_model_input, unet, step); we run
our sampler on `Denoiser(model)` over our own schedule; final latents must agree to 1e-3.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ldmgraph.diffusion import NoiseSchedule
from ldmgraph.diffusion import samplers as K
from ldmgraph.diffusion import schedules as S
from ldmgraph.diffusion.denoiser import Denoiser

pytestmark = pytest.mark.reference

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TOL = 1e-3
SCHEDULE = NoiseSchedule.from_config("linear", 0.00085, 0.012, 1000)


@pytest.fixture(scope="module")
def context():
    return torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _diffusers_loop(scheduler, unet, x, context, step_kwargs=lambda i: {}):
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=context).sample
            x = scheduler.step(eps, t, x, **step_kwargs(i)).prev_sample
    return x


@pytest.fixture
def ours(as_model, tiny_unet, context):
    """Run one of our samplers on the same U-Net: `ours(sampler, x, sigmas, round_t=False, **options)`."""

    def run(sampler, x, sigmas, round_t=False, **kwargs):
        model = Denoiser(as_model(tiny_unet, round_t=round_t))
        return sampler(model, x, sigmas, extra_args={"context": context}, **kwargs)

    return run


def _list_noise_sampler(noises):
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


CASES = [
    # (our sampler, our schedule, steps, diffusers class, extra config)
    ("euler", "normal", 10, "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("euler", "karras", 10, "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("heun", "normal", 10, "HeunDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("heun", "karras", 10, "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("lms", "normal", 10, "LMSDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("lms", "karras", 10, "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("name,schedule,steps,cls,config", CASES)
def test_ode_samplers_match_diffusers(name, schedule, steps, cls, config, tiny_unet, noise, context, ours):
    import diffusers

    scheduler = getattr(diffusers, cls)(**SD, **config)
    scheduler.set_timesteps(steps)
    sigmas = getattr(S, schedule)(steps, SCHEDULE)
    assert torch.allclose(
        sigmas, scheduler.sigmas.float()[-(steps + 1) :] if name != "heun" else sigmas, rtol=1e-4
    )
    x = noise * scheduler.init_noise_sigma
    expected = _diffusers_loop(scheduler, tiny_unet, x, context)
    got = ours(getattr(K, name), x, sigmas)
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize(
    "schedule,config,round_t,steps",
    [
        ("sgm_uniform", {"timestep_spacing": "linspace"}, False, 9),
        ("karras", {"use_karras_sigmas": True}, True, 10),
    ],
)
def test_dpmpp_2m_matches_dpmsolver_multistep(
    schedule, config, round_t, steps, tiny_unet, noise, context, ours
):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, **config)
    scheduler.set_timesteps(steps)
    sigmas = getattr(S, schedule)(steps, SCHEDULE)
    assert torch.allclose(sigmas, scheduler.sigmas.float(), rtol=1e-4)
    expected = _diffusers_loop(scheduler, tiny_unet, noise, context)  # VP space: x_T = noise
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # the same x_T divided by sqrt(alpha_bar_T)
    got = ours(K.dpmpp_2m, x, sigmas, round_t=round_t)
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim(eta, tiny_unet, noise, context, ours):
    from diffusers import DDIMScheduler

    steps = 10
    scheduler = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    scheduler.set_timesteps(steps)
    sigmas = S.leading(steps, SCHEDULE)
    noises = [
        torch.randn(noise.shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(steps)
    ]
    expected = _diffusers_loop(
        scheduler, tiny_unet, noise, context, lambda i: {"eta": eta, "variance_noise": noises[i]}
    )
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    got = ours(K.ddim, x, sigmas, eta=eta, noise_sampler=_list_noise_sampler(noises))
    assert (got - expected).abs().max() < TOL


def test_ddpm_matches_diffusers_ddpm(tiny_unet, noise, context, ours):
    from diffusers import DDPMScheduler

    steps = 10
    scheduler = DDPMScheduler(**SD, clip_sample=False, steps_offset=1, variance_type="fixed_small")
    scheduler.set_timesteps(steps)
    sigmas = S.leading(steps, SCHEDULE)
    assert torch.equal(scheduler.timesteps, torch.arange(901, 0, -100))
    shared = torch.Generator().manual_seed(5)
    expected = _diffusers_loop(scheduler, tiny_unet, noise, context, lambda i: {"generator": shared})
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    generator = torch.Generator().manual_seed(5)
    got = ours(K.ddpm, x, sigmas, noise_sampler=K.default_noise_sampler(x, generator))
    assert (got - expected).abs().max() < TOL


def test_euler_ancestral_matches_with_same_noise(tiny_unet, noise, context, ours):
    from diffusers import EulerAncestralDiscreteScheduler

    steps = 10
    scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    sigmas = S.normal(steps, SCHEDULE)
    x = noise * scheduler.init_noise_sigma
    shared = torch.Generator().manual_seed(11)
    expected = _diffusers_loop(scheduler, tiny_unet, x, context, lambda i: {"generator": shared})
    got = ours(K.euler_ancestral, x, sigmas, noise_sampler=K.default_noise_sampler(x, torch.Generator().manual_seed(11)))
    assert (got - expected).abs().max() < TOL


def test_dpmpp_2m_sde_matches_with_same_noise(tiny_unet, noise, context, ours):
    from diffusers import DPMSolverMultistepScheduler

    steps = 10
    scheduler = DPMSolverMultistepScheduler(
        **SD, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    scheduler.set_timesteps(steps)
    sigmas = S.karras(steps, SCHEDULE)
    noises = [
        torch.randn(noise.shape, generator=torch.Generator().manual_seed(200 + i)) for i in range(steps)
    ]
    expected = _diffusers_loop(scheduler, tiny_unet, noise, context, lambda i: {"variance_noise": noises[i]})
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    got = ours(K.dpmpp_2m_sde, x, sigmas, round_t=True, noise_sampler=_list_noise_sampler(noises))
    assert (got - expected).abs().max() < TOL


def test_dpmpp_sde_matches_with_same_noise(tiny_unet, noise, context, ours, monkeypatch):
    if (
        "torchsde" not in sys.modules
    ):  # diffusers imports it at module level; its Brownian tree is replaced below
        monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler

    steps = 8
    scheduler = DPMSolverSDEScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    theirs = torch.Generator().manual_seed(21)
    scheduler.noise_sampler = lambda sigma, sigma_next: torch.randn(noise.shape, generator=theirs)
    sigmas = S.normal(steps, SCHEDULE)
    x = noise * scheduler.init_noise_sigma
    expected = _diffusers_loop(scheduler, tiny_unet, x, context)
    got = ours(K.dpmpp_sde, x, sigmas, noise_sampler=K.default_noise_sampler(x, torch.Generator().manual_seed(21)))
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize(
    "name,cls", [("dpm_2", "KDPM2DiscreteScheduler"), ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler")]
)
def test_dpm_2_samplers_match_kdpm2(name, cls, tiny_unet, noise, context, ours):
    import diffusers

    steps = 10
    scheduler = getattr(diffusers, cls)(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    sigmas = S.normal(steps, SCHEDULE)
    x = noise * scheduler.init_noise_sigma
    shared = torch.Generator().manual_seed(31)
    kwargs = {"generator": shared} if "Ancestral" in cls else {}
    expected = _diffusers_loop(scheduler, tiny_unet, x, context, lambda i: kwargs)
    got = ours(getattr(K, name), x, sigmas, noise_sampler=K.default_noise_sampler(x, torch.Generator().manual_seed(31)))
    assert (got - expected).abs().max() < TOL


def test_plms_matches_pndm_with_skipped_prk_steps(tiny_unet, noise, context, ours):
    from diffusers import PNDMScheduler

    steps = 10
    scheduler = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    sigmas = S.leading(steps, SCHEDULE)
    expected = _diffusers_loop(scheduler, tiny_unet, noise, context)  # VP space: x_T = noise
    got = ours(K.plms, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert (got - expected).abs().max() < TOL


def test_v_prediction_euler_matches_diffusers(tiny_unet, noise, context, as_model):
    from diffusers import EulerDiscreteScheduler

    steps = 10
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", prediction_type="v_prediction")
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    expected = _diffusers_loop(scheduler, tiny_unet, x, context)
    model = as_model(tiny_unet)
    model.prediction_type = "v"
    got = K.euler(Denoiser(model), x, S.normal(steps, SCHEDULE), extra_args={"context": context})
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize("name,variant", [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(
    "schedule,config,round_t,steps",
    [("sgm_uniform", {"timestep_spacing": "linspace"}, False, 9), ("karras", {"use_karras_sigmas": True}, True, 10)],
)
def test_uni_pc_matches_unipc_multistep(
    name, variant, order, schedule, config, round_t, steps, tiny_unet, noise, context, ours
):
    from diffusers import UniPCMultistepScheduler

    # diffusers' bh1 divides by B(h) = h, infinite on a step to sigma 0 (its result is NaN there), so
    # bh1 is compared on schedules that end at sigma_min, the last step's order 1 update included
    final = "zero" if variant == "bh2" else "sigma_min"
    scheduler = UniPCMultistepScheduler(**SD, solver_order=order, solver_type=variant, final_sigmas_type=final,
                                        **config)
    scheduler.set_timesteps(steps)
    sigmas = getattr(S, schedule)(steps, SCHEDULE)
    if final == "zero":
        assert torch.allclose(sigmas, scheduler.sigmas.float(), rtol=1e-4)
    else:
        assert torch.allclose(sigmas[:-1], scheduler.sigmas.float()[:-1], rtol=1e-4)
        sigmas = scheduler.sigmas.float()
    expected = _diffusers_loop(scheduler, tiny_unet, noise, context)  # VP space: x_T = noise
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    got = ours(getattr(K, name), x, sigmas, round_t=round_t, order=order)
    if final == "sigma_min":  # diffusers' VP latent at sigma_min is ours times sqrt(alpha_bar)
        got = got / (1 + sigmas[-1] ** 2).sqrt()
    assert (got - expected).abs().max() < TOL
    # the corrector matters: plain multistep prediction (DPM-Solver++ 2M) ends elsewhere
    if order == 2 and final == "zero":
        assert (ours(K.dpmpp_2m, x, sigmas, round_t=round_t) - expected).abs().max() > 10 * TOL
