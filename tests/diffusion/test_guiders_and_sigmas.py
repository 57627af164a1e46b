"""The GUIDER and SIGMAS building blocks: dual CFG's formula, and the sigma-editing nodes."""

from __future__ import annotations

import math

import pytest
import torch

from ldmgraph.diffusion import CondEntry, NoiseSchedule
from ldmgraph.diffusion.denoiser import Denoiser
from ldmgraph.diffusion.errors import DiffusionError
from ldmgraph.diffusion.sampling import Guider, sampler_choice
from ldmgraph.nodes import sampling as nodes


def _run(node_cls, **inputs):
    return node_cls().run(node_cls.Inputs(**inputs), None)


def test_dual_cfg_is_neg_plus_cfg2_middle_plus_cfg1_top(toy_model):
    cond1, cond2, neg = (CondEntry(torch.full((1, 3, 2), v)) for v in (0.7, -0.2, 0.1))
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3.0, 3.0])
    guided = Guider(toy_model, [cond1], [neg], 5.0, middle=[cond2], cfg_middle=2.0).denoiser()
    plain = Denoiser(toy_model)
    d1, d2, dn = (plain(x, sigma, context=c.context.expand(2, -1, -1)) for c in (cond1, cond2, neg))
    expected = dn + 2.0 * (d2 - dn) + 5.0 * (d1 - d2)
    assert torch.allclose(guided(x, sigma), expected, atol=1e-5)


def test_basic_guider_makes_one_network_call_per_step(toy_model):
    guided = Guider(toy_model, [CondEntry(torch.ones(1, 3, 2))]).denoiser()
    guided(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    assert toy_model.calls == 1


def test_sigma_nodes_split_flip_and_join():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    split = _run(nodes.SplitSigmas, sigmas=sigmas, step=2)
    assert split.high_sigmas.tolist() == [10.0, 5.0, 2.0] and split.low_sigmas.tolist() == [2.0, 1.0, 0.0]
    joined = _run(nodes.ConcatSigmas, first=split.high_sigmas, second=split.low_sigmas).sigmas
    assert torch.equal(joined, sigmas)
    flipped = _run(nodes.FlipSigmas, sigmas=sigmas).sigmas
    assert flipped.tolist() == pytest.approx([1e-4, 1.0, 2.0, 5.0, 10.0])


def test_karras_and_exponential_nodes_follow_their_formulas():
    karras = _run(nodes.KarrasScheduler, steps=4, sigma_max=10.0, sigma_min=0.1, rho=7.0).sigmas
    ramp = [k / 3 for k in range(4)]
    expected = [(10 ** (1 / 7) + r * (0.1 ** (1 / 7) - 10 ** (1 / 7))) ** 7 for r in ramp] + [0.0]
    assert karras.tolist() == pytest.approx(expected, rel=1e-5)
    exponential = _run(nodes.ExponentialScheduler, steps=3, sigma_max=8.0, sigma_min=0.5).sigmas
    assert exponential.tolist() == pytest.approx([8.0, math.sqrt(8.0 * 0.5), 0.5, 0.0], rel=1e-5)


def test_sampler_options_are_checked_against_the_declaration():
    assert dict(sampler_choice("euler_ancestral", {"eta": 0.5}).options) == {"eta": 0.5, "s_noise": 1.0}
    with pytest.raises(DiffusionError, match="has no option"):
        sampler_choice("euler", {"eta": 0.5})
    with pytest.raises(DiffusionError, match="above the maximum 4"):
        sampler_choice("lms", {"order": 9})
    with pytest.raises(DiffusionError, match="use one of midpoint, heun"):
        sampler_choice("dpmpp_2m_sde", {"solver_type": "rk4"})


def test_ddim_final_alpha_first_stops_at_the_first_training_sigma(toy_model):
    """set_alpha_to_one=False: the last step goes to sigma(t=0), returned in VP form."""
    schedule = NoiseSchedule.from_config()
    guided = Guider(toy_model, [CondEntry(torch.zeros(1, 3, 2))]).denoiser()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3.0
    sigmas = torch.tensor([2.0, 0.5, 0.0])
    one = sampler_choice("ddim", {"final_alpha": "one"})(guided, x, sigmas)
    first = sampler_choice("ddim", {"final_alpha": "first"})(guided, x, sigmas)
    s0 = schedule.sigma_min
    to_first = sampler_choice("ddim")(guided, x, torch.tensor([2.0, 0.5, s0]))
    assert torch.allclose(first, to_first / math.sqrt(1 + s0**2), atol=1e-6)
    assert not torch.allclose(first, one, atol=1e-4)
