"""UniPC at 8 steps and PLMS at 20 steps with guidance (cfg 4) on the bundled text-to-image model:
our samplers give the images diffusers' schedulers give through the same network and noise.

At cfg 4 these high-order multistep solvers miss part of the captions that dpmpp_2m draws (the
judge reads held-out one-object captions): the same misses with diffusers' UniPCMultistepScheduler
(solver_order 3, as our default) and PNDMScheduler (PLMS), so they come from the solvers under
strong guidance, not from our code. diffusers recommends solver_order 2 for guided sampling; the
README's sampler section says what to use.
"""

from __future__ import annotations

import pytest
import torch

from ldmgraph.train.export import BUNDLED_NAMES, assets_dir

PATH = assets_dir() / BUNDLED_NAMES["ldm"]
pytestmark = [pytest.mark.reference, pytest.mark.skipif(not PATH.is_file(), reason="needs the bundled model")]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
CFG = 4.0
SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def model():
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.train.evaluate import one_object_prompts

    ckpt = load_checkpoint(PATH)
    prompts = one_object_prompts(len(SEEDS))
    uncond = ckpt.text_encoder.encode([""]).context.float()
    conds = [ckpt.text_encoder.encode([p]).context.float() for _, p in prompts]
    return ckpt, [c for c, _ in prompts], conds, uncond


class _RoundedTimesteps:
    """The U-Net with its timestep rounded to an integer, as diffusers' schedulers with karras sigmas
    call it, so that a comparison tests the solver and not that rounding."""

    prediction_type = "eps"

    def __init__(self, unet) -> None:
        self.unet = unet
        self.noise_schedule = unet.noise_schedule

    def apply_model(self, x, t, **kwargs):
        return self.unet.apply_model(x, t.round(), **kwargs)


def _ours(ckpt, cond, uncond, seed, sampler, schedule, steps, options=None, round_t=False):
    from ldmgraph.diffusion import CondEntry, Latent, sample

    out = sample(_RoundedTimesteps(ckpt.unet) if round_t else ckpt.unet, Latent(samples=torch.zeros(1, 4, 16, 16)), [CondEntry(context=cond)],
                 [CondEntry(context=uncond)], seed=seed, steps=steps, cfg=CFG, sampler=sampler,
                 schedule=schedule, sampler_options=options)
    return out.samples


def _diffusers(ckpt, cond, uncond, seed, scheduler, steps):
    """diffusers' own loop (scale_model_input, eps with CFG, step) around our U-Net's eps output."""
    scheduler.set_timesteps(steps)
    noise = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(seed))[None]
    # our start is noise * sqrt(1 + sigma^2) at sigma_max and noise * sigma below it (as ComfyUI's);
    # in diffusers' space (times sqrt(alpha_bar)) that is noise, or noise * sqrt(1 - alpha_bar)
    alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
    x = noise if int(scheduler.timesteps[0]) >= 999 else noise * (1 - alpha_bar) ** 0.5
    context = torch.cat([cond, uncond])
    with torch.no_grad():
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(x, t)
            eps_cond, eps_uncond = ckpt.unet.apply_model(torch.cat([xin, xin]), torch.full((2,), float(t)),
                                                          context=context).chunk(2)
            x = scheduler.step(eps_uncond + CFG * (eps_cond - eps_uncond), t, x).prev_sample
    return x


def _reads(ckpt, latent, combo) -> bool:
    from ldmgraph.train.data.judge import score

    return min(score(ckpt.vae.decode(latent).numpy()[0], [combo]).values()) == 1.0


CASES = {
    "uni_pc_bh2 order 3, karras, 8 steps": (
        "uni_pc_bh2", "karras", 8, {"order": 3},
        lambda d: d.UniPCMultistepScheduler(**SD, solver_order=3, solver_type="bh2", use_karras_sigmas=True)),
    "plms, ddim_uniform, 20 steps": (
        "plms", "ddim_uniform", 20, None,
        lambda d: d.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_guided_multistep_solvers_draw_what_diffusers_draws(case, model):
    import diffusers

    ckpt, combos, conds, uncond = model
    sampler, schedule, steps, options, make = CASES[case]
    ours_read, theirs_read = [], []
    for seed, combo, cond in zip(SEEDS, combos, conds, strict=True):
        ours = _ours(ckpt, cond, uncond, seed, sampler, schedule, steps, options, round_t=schedule == "karras")
        theirs = _diffusers(ckpt, cond, uncond, seed, make(diffusers), steps)
        assert (ours - theirs).abs().max() < 1e-3  # both end at sigma 0, where the two spaces meet
        ours_read.append(_reads(ckpt, ours, combo))
        theirs_read.append(_reads(ckpt, theirs, combo))
    assert ours_read == theirs_read


def test_order_2_unipc_and_dpmpp_2m_draw_more_captions_than_order_3_at_cfg_4(model):
    # the README's advice under guidance: order 2 (measured on these four: dpmpp_2m 4, UniPC order 2 3,
    # UniPC order 3 1)
    ckpt, combos, conds, uncond = model
    read = {"uni_pc_bh2 order 2": 0, "dpmpp_2m": 0, "uni_pc_bh2 order 3": 0}
    for seed, combo, cond in zip(SEEDS, combos, conds, strict=True):
        for name, sampler, options in (("uni_pc_bh2 order 2", "uni_pc_bh2", {"order": 2}),
                                       ("dpmpp_2m", "dpmpp_2m", None), ("uni_pc_bh2 order 3", "uni_pc_bh2", {"order": 3})):
            read[name] += _reads(ckpt, _ours(ckpt, cond, uncond, seed, sampler, "karras", 8, options), combo)
    assert read["dpmpp_2m"] >= 3 and read["uni_pc_bh2 order 2"] >= 3, read
    assert read["uni_pc_bh2 order 3"] < min(read["dpmpp_2m"], read["uni_pc_bh2 order 2"]), read
