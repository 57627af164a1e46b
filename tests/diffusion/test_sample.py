"""sample(): seeds, batches, img2img, CFG call counts, conditioning, masks, cancellation."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ldmgraph.diffusion import Cancelled, CondEntry, Latent, NoiseSchedule, sample
from ldmgraph.diffusion import samplers as K
from ldmgraph.diffusion import schedules as S
from ldmgraph.diffusion.denoiser import Denoiser
from ldmgraph.diffusion.guidance import CFGDenoiser
from ldmgraph.diffusion.registry import SAMPLER_NAMES

POS = [CondEntry(context=torch.full((1, 3, 8), 0.3))]
NEG = [CondEntry(context=torch.zeros(1, 3, 8))]


def _run(model, latent, **kwargs):
    options = dict(seed=42, steps=6, cfg=4.0, sampler="euler", schedule="karras")
    options.update(kwargs)
    return sample(model, latent, POS, NEG, **options).samples


class OracleModel:
    """The ideal network for data that is always X: returns the true eps (or v) for x_t."""

    def __init__(self, target: torch.Tensor, prediction_type: str) -> None:
        self.target = target
        self.prediction_type = prediction_type
        self.noise_schedule = NoiseSchedule.from_config()

    def apply_model(self, x, t, context=None, concat=None, y=None):
        sigma = self.noise_schedule.t_to_sigma(t).view(-1, 1, 1, 1)
        alpha, s = (
            (1 + sigma**2).rsqrt(),
            sigma * (1 + sigma**2).rsqrt(),
        )  # sqrt(alpha_bar), sqrt(1 - alpha_bar)
        eps = (x - alpha * self.target) / s
        return eps if self.prediction_type == "eps" else alpha * eps - s * self.target


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_denoiser_recovers_x0_from_ideal_eps_and_v_models(prediction_type):
    target = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    denoiser = Denoiser(OracleModel(target, prediction_type))
    for sigma in (0.05, 1.0, 14.0):
        x = target + sigma * torch.randn(target.shape)
        assert torch.allclose(denoiser(x, torch.tensor(sigma)), target, atol=2e-3 * max(sigma, 1))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_lands_on_the_data_with_an_ideal_model(name):
    target = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    model = OracleModel(target, "eps")
    out = sample(
        model,
        Latent(torch.zeros(1, 4, 6, 6)),
        POS,
        [],
        seed=0,
        steps=8,
        cfg=1.0,
        sampler=name,
        schedule="karras",
    )
    assert (out.samples - target).abs().max() < 5e-3


def test_cfg_one_makes_one_call_per_step_and_cfg_batches_cond_with_uncond(toy_model):
    latent = Latent(torch.zeros(2, 4, 8, 8))
    _run(toy_model, latent, cfg=1.0, steps=5)
    assert toy_model.calls == 5 and toy_model.batch_sizes == [2] * 5
    toy_model.calls, toy_model.batch_sizes = 0, []
    _run(toy_model, latent, cfg=7.5, steps=5)
    assert toy_model.calls == 5 and toy_model.batch_sizes == [4] * 5  # cond + uncond in one batch


def test_cfg_formula_against_separate_passes(toy_model):
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([3.0])
    cond = CFGDenoiser(Denoiser(toy_model), POS, [], 1.0)(x, sigma)
    uncond = CFGDenoiser(Denoiser(toy_model), NEG, [], 1.0)(x, sigma)
    guided = CFGDenoiser(Denoiser(toy_model), POS, NEG, 6.0)(x, sigma)
    assert torch.allclose(guided, uncond + 6.0 * (cond - uncond), atol=1e-5)


def test_same_seed_is_bit_identical_in_two_processes():
    script = textwrap.dedent(
        """
        import hashlib, torch
        from ldmgraph.diffusion import CondEntry, Latent, NoiseSchedule, sample
        torch.manual_seed(0)
        net = torch.nn.Conv2d(4, 4, 3, padding=1)
        class Net:
            prediction_type = "eps"
            noise_schedule = NoiseSchedule.from_config()
            def apply_model(self, x, t, context=None, concat=None, y=None):
                return net(x) * torch.cos(t / 1000).view(-1, 1, 1, 1) + context.mean()
        pos, neg = [CondEntry(torch.ones(1, 2, 4))], [CondEntry(torch.zeros(1, 2, 4))]
        with torch.no_grad():
            out = sample(Net(), Latent(torch.zeros(2, 4, 8, 8)), pos, neg, seed=1234, steps=5, cfg=5.0,
                         sampler="euler_ancestral", schedule="karras").samples
        print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
        """
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert runs[0].stdout.strip() and runs[0].stdout == runs[1].stdout


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_batch_image_k_equals_single_run_with_seed_plus_k(toy_model, sampler):
    batch = _run(toy_model, Latent(torch.zeros(3, 4, 8, 8)), sampler=sampler, seed=10)
    for k in range(3):
        single = _run(toy_model, Latent(torch.zeros(1, 4, 8, 8)), sampler=sampler, seed=10 + k)
        assert torch.allclose(batch[k : k + 1], single, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_denoise_zero_returns_input_and_denoise_one_is_txt2img_from_pure_noise(toy_model):
    image = Latent(torch.randn(1, 4, 8, 8))
    assert torch.equal(
        sample(
            toy_model,
            image,
            POS,
            NEG,
            seed=3,
            steps=6,
            cfg=4.0,
            sampler="euler",
            schedule="karras",
            denoise=0.0,
        ).samples,
        image.samples,
    )
    got = _run(toy_model, Latent(torch.zeros(1, 4, 8, 8)), seed=3, denoise=1.0)
    assert not got.is_inference()  # an ordinary tensor: later nodes may edit a copy in place
    # by hand: noise from the seed on the CPU, x_T = noise * sqrt(1 + sigma_max^2), Euler over karras
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))[None]
    sigmas = S.karras(6, toy_model.noise_schedule)
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    expected = K.euler(CFGDenoiser(Denoiser(toy_model), POS, NEG, 4.0), x, sigmas)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_img2img_runs_the_tail_of_a_longer_schedule(toy_model):
    seen = []
    image = Latent(torch.randn(1, 4, 8, 8))
    out = _run(
        toy_model, image, steps=4, denoise=0.5, callback=lambda info: seen.append(float(info["sigma"]))
    )
    full = S.karras(8, toy_model.noise_schedule)
    assert seen == pytest.approx(full[4:8].tolist())
    assert (out - image.samples).abs().mean() < (_run(toy_model, image, steps=4) - image.samples).abs().mean()


def test_start_and_end_steps_split_a_run_like_ksampler_advanced(toy_model):
    latent = Latent(torch.zeros(1, 4, 8, 8))
    whole = _run(toy_model, latent, steps=6, sampler="euler")
    first = sample(
        toy_model,
        latent,
        POS,
        NEG,
        seed=42,
        steps=6,
        cfg=4.0,
        sampler="euler",
        schedule="karras",
        end_step=3,
        return_with_leftover_noise=True,
    )
    second = sample(
        toy_model,
        first,
        POS,
        NEG,
        seed=42,
        steps=6,
        cfg=4.0,
        sampler="euler",
        schedule="karras",
        start_step=3,
        add_noise=False,
    )
    assert torch.allclose(whole, second.samples, atol=1e-5)


def test_callback_sees_each_step_and_can_cancel(toy_model):
    seen = []

    def callback(info):
        seen.append(info)
        if info["i"] == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        _run(toy_model, Latent(torch.zeros(1, 4, 8, 8)), steps=6, callback=callback)
    assert [s["i"] for s in seen] == [0, 1, 2]
    assert {"i", "sigma", "x", "denoised"} <= set(seen[0]) and seen[0]["denoised"].shape == (1, 4, 8, 8)


def test_inpainting_noise_mask_keeps_the_known_latent(toy_model):
    known = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    out = _run(toy_model, Latent(known, noise_mask=mask), sampler="dpmpp_2m")
    assert torch.equal(out[..., mask[0, 0] == 0], known[..., mask[0, 0] == 0])
    assert (out[..., 2:6, 2:6] - known[..., 2:6, 2:6]).abs().mean() > 0.1


def test_area_and_strength_weight_several_conditionings(toy_model):
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    a = CondEntry(context=torch.full((1, 3, 8), 1.0))
    b = CondEntry(context=torch.full((1, 3, 8), -1.0))
    only = {
        name: CFGDenoiser(Denoiser(toy_model), [e], [], 1.0)(x, sigma) for name, e in (("a", a), ("b", b))
    }
    weighted = CFGDenoiser(Denoiser(toy_model), [a, CondEntry(b.context, strength=3.0)], [], 1.0)(x, sigma)
    assert torch.allclose(weighted, (only["a"] + 3 * only["b"]) / 4, atol=1e-5)
    right = CondEntry(b.context, area=(8, 4, 0, 4))  # (h, w, y, x): the right half
    split = CFGDenoiser(Denoiser(toy_model), [a, right], [], 1.0)(x, sigma)
    assert torch.allclose(split[..., :4], only["a"][..., :4], atol=1e-5)
    # the area's left edge lies inside the image: its weight ramps 1/8, 2/8, 3/8, 4/8 from there
    # (ComfyUI's feathering of unmasked areas); its other edges are on the border
    w = torch.tensor([1, 2, 3, 4]) / 8
    assert torch.allclose(split[..., 4:], (only["a"][..., 4:] + w * only["b"][..., 4:]) / (1 + w), atol=1e-5)
    masked = CondEntry(b.context, area=(8, 4, 0, 4), mask=torch.ones(1, 8, 8))  # a mask: no feathering
    split = CFGDenoiser(Denoiser(toy_model), [a, masked], [], 1.0)(x, sigma)
    assert torch.allclose(split[..., 4:], (only["a"][..., 4:] + only["b"][..., 4:]) / 2, atol=1e-5)


def test_area_weights_ramp_in_from_the_edges_inside_the_image():
    from ldmgraph.diffusion.guidance import area_feather

    # a 12x20 area at y 2, x 0 of a 16x24 latent: top and bottom edges and the right edge are inside
    weight = area_feather((slice(2, 14), slice(0, 20)), 16, 24)[0, 0]
    rows = torch.minimum(torch.arange(1, 13) / 8, torch.ones(12)) * torch.minimum(torch.arange(12, 0, -1) / 8, torch.ones(12))
    cols = torch.minimum(torch.arange(20, 0, -1) / 8, torch.ones(20))
    assert torch.allclose(weight, rows[:, None] * cols[None, :])
    assert area_feather((slice(0, 16), slice(0, 24)), 16, 24) is None  # the whole image: plain weights


def test_concat_conditioning_reaches_the_model_for_cond_and_uncond():
    seen = []

    class ConcatModel:
        prediction_type = "eps"
        noise_schedule = NoiseSchedule.from_config()

        def apply_model(self, x, t, context=None, concat=None, y=None):
            seen.append(None if concat is None else concat.shape)
            return torch.zeros_like(x)

    concat = torch.randn(1, 5, 8, 8)
    pos = [CondEntry(POS[0].context, concat=concat)]
    neg = [CondEntry(NEG[0].context, concat=concat)]
    sample(
        ConcatModel(),
        Latent(torch.zeros(2, 4, 8, 8)),
        pos,
        neg,
        seed=0,
        steps=2,
        cfg=3.0,
        sampler="euler",
        schedule="normal",
    )
    assert seen == [torch.Size([4, 5, 8, 8])] * 2


def test_unknown_names_and_bad_sampler_options_are_clear_errors(toy_model):
    latent = Latent(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="no sampler named 'eulr'"):
        _run(toy_model, latent, sampler="eulr")
    with pytest.raises(ValueError, match="has no option"):
        _run(toy_model, latent, sampler="euler", sampler_options={"eta": 0.5})
