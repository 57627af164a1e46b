"""Unit tests of the diffusion nodes' arithmetic against closed forms (no checkpoints needed).

A stand-in VAE (average pooling down by f = 4, nearest upsampling back) makes sizes and the
mask/latent layout easy to predict; the real autoencoder is exercised by the workflow tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmgraph.conditioners import Conditioner, conditioner_node
from ldmgraph.diffusion import CondEntry, Latent
from ldmgraph.nodes.common import NodeInputError
from ldmgraph.nodes.concat_conditioning import InpaintConditioning, SuperResolutionConditioning
from ldmgraph.nodes.conditioning import (
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetArea,
    ConditioningZeroOut,
)
from ldmgraph.nodes.image_ops import ImageCompositeMasked, ImagePadForOutpaint
from ldmgraph.nodes.latent import (
    EmptyLatent,
    LatentFromBatch,
    LatentUpscale,
    LatentUpscaleBy,
    RepeatLatentBatch,
    SetLatentNoiseMask,
    VAEEncodeForInpaint,
)


class PoolVAE:
    """Latent = the image average-pooled by 4, channels RGB + their mean (4 channels)."""

    downscale = 4
    latent_channels = 4

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.as_tensor(pixels).permute(0, 3, 1, 2), 4)
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latent[:, :3], scale_factor=4, mode="nearest").permute(0, 2, 3, 1)


def run(node_cls, **inputs):
    """Run a node directly (these nodes do not use the context); a conditioner through its node."""
    if issubclass(node_cls, Conditioner):
        node_cls = conditioner_node(node_cls)
    return node_cls().run(node_cls.Inputs(**inputs), None)


def entry(value: float, tokens: int = 3, dim: int = 2) -> CondEntry:
    return CondEntry(context=torch.full((1, tokens, dim), value), pooled=torch.full((1, dim), value))


def test_empty_latent_uses_the_vae_factor_and_defaults_to_sd_factor_8():
    latent = run(EmptyLatent, width=96, height=64, batch_size=2, vae=PoolVAE()).latent
    assert latent.samples.shape == (2, 4, 16, 24) and not latent.samples.any()
    assert run(EmptyLatent, width=96, height=64, batch_size=1).latent.samples.shape == (1, 4, 8, 12)


def test_average_is_the_weighted_sum_and_pads_short_contexts():
    out = run(
        ConditioningAverage,
        conditioning_to=[entry(1.0)],
        conditioning_from=[entry(3.0, tokens=2)],
        to_strength=0.25,
    ).conditioning
    context = out[0].context
    assert context.shape == (1, 3, 2)
    assert torch.allclose(context[:, :2], torch.full((1, 2, 2), 0.25 * 1 + 0.75 * 3))
    assert torch.allclose(context[:, 2], torch.full((1, 2), 0.25))  # padded tokens of `from` are zeros
    assert torch.allclose(out[0].pooled, torch.full((1, 2), 2.5))


def test_concat_appends_tokens_and_combine_joins_lists():
    out = run(
        ConditioningConcat, conditioning_to=[entry(1.0, 3)], conditioning_from=[entry(2.0, 5)]
    ).conditioning
    assert out[0].context.shape == (1, 8, 2) and out[0].context[0, 3:].eq(2.0).all()
    joined = run(ConditioningCombine, conditioning_1=[entry(1.0)], conditioning_2=[entry(2.0), entry(3.0)])
    assert [float(e.context[0, 0, 0]) for e in joined.conditioning] == [1.0, 2.0, 3.0]


def test_set_area_converts_pixels_to_latent_pixels_with_the_vae_factor():
    out = run(
        ConditioningSetArea,
        conditioning=[entry(1.0)],
        width=64,
        height=32,
        x=64,
        y=8,
        strength=0.5,
        vae=PoolVAE(),
    ).conditioning
    assert out[0].area == (8, 16, 2, 16) and out[0].strength == 0.5
    sd = run(ConditioningSetArea, conditioning=[entry(1.0)], width=64, height=32, x=64, y=8).conditioning
    assert sd[0].area == (4, 8, 1, 8)


def test_zero_out_zeroes_context_and_pooled():
    out = run(ConditioningZeroOut, conditioning=[entry(5.0)]).conditioning[0]
    assert not out.context.any() and not out.pooled.any() and out.context.shape == (1, 3, 2)


def test_latent_upscale_by_size_keeps_aspect_when_one_side_is_zero():
    latent = Latent(samples=torch.randn(1, 4, 16, 8))
    out = run(
        LatentUpscale, latent=latent, method="bilinear", width=0, height=128, crop="disabled", vae=PoolVAE()
    )
    assert out.latent.samples.shape == (1, 4, 32, 16)
    by = run(LatentUpscaleBy, latent=latent, method="nearest-exact", scale_by=1.5).latent.samples
    assert by.shape == (1, 4, 24, 12)
    assert torch.equal(by[:, :, ::3, ::3], latent.samples[:, :, ::2, ::2])  # nearest keeps the values


def test_latent_batch_nodes_keep_seed_offsets_distinct():
    latent = Latent(samples=torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 4, 2, 2).clone())
    picked = run(LatentFromBatch, latent=latent, batch_index=1, length=2).latent
    assert picked.batch_index == [1, 2] and picked.samples[:, 0, 0, 0].tolist() == [1.0, 2.0]
    repeated = run(RepeatLatentBatch, latent=picked, amount=3).latent
    assert repeated.samples.shape[0] == 6
    assert len(set(repeated.batch_index)) == 6  # every copy gets its own noise


def test_noise_mask_is_resized_to_the_latent():
    latent = Latent(samples=torch.zeros(1, 4, 16, 16))
    mask = np.zeros((1, 64, 64), np.float32)
    mask[:, :32] = 1.0
    out = run(SetLatentNoiseMask, latent=latent, mask=mask).latent
    assert out.noise_mask.shape == (1, 1, 16, 16)
    assert out.noise_mask[0, 0, :8].eq(1).all() and out.noise_mask[0, 0, 8:].eq(0).all()


@pytest.mark.parametrize("layout, mask_channel", [("sd", 0), ("ldm", 4)])
def test_inpaint_conditioning_stacks_mask_and_masked_latent_in_the_layout_order(layout, mask_channel):
    image = np.ones((1, 32, 32, 3), np.float32)
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, 8:24, 8:24] = 1.0
    out = run(
        InpaintConditioning,
        positive=[entry(1.0)],
        negative=[entry(0.0)],
        vae=PoolVAE(),
        image=image,
        mask=mask,
        layout=layout,
        noise_mask=True,
    )
    concat = out.positive[0].concat
    assert concat.shape == (1, 5, 8, 8) and torch.equal(concat, out.negative[0].concat)
    expected_mask = torch.zeros(8, 8)
    expected_mask[2:6, 2:6] = 1
    assert torch.equal(concat[0, mask_channel], expected_mask)
    masked_rgb = concat[0, 1:4] if layout == "sd" else concat[0, 0:3]
    assert torch.allclose(masked_rgb[:, 3, 3], torch.full((3,), 0.5))  # the hole is grey
    assert torch.allclose(masked_rgb[:, 0, 0], torch.ones(3))  # outside untouched
    assert out.latent.noise_mask is not None and torch.allclose(
        out.latent.samples[0, :3], torch.ones(3, 8, 8)
    )


def test_vae_encode_for_inpaint_grows_the_mask_and_refuses_a_wrong_size_mask():
    image = np.ones((1, 32, 32, 3), np.float32)
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, 16, 16] = 1.0
    out = run(VAEEncodeForInpaint, vae=PoolVAE(), image=image, mask=mask, grow_mask_by=4).latent
    full = F.interpolate(out.noise_mask, size=(32, 32), mode="nearest")
    assert out.noise_mask.shape == (1, 1, 8, 8) and full.sum() > 1  # one pixel grew into a block
    with pytest.raises(NodeInputError, match="the mask is 16x16 but the image is 32x32"):
        run(
            VAEEncodeForInpaint,
            vae=PoolVAE(),
            image=image,
            mask=np.zeros((1, 16, 16), np.float32),
            grow_mask_by=0,
        )


@pytest.mark.parametrize("grow", [0, 1, 4, 6])
def test_vae_encode_for_inpaint_grows_the_mask_as_comfyui_and_greys_only_the_hole(grow):
    """ComfyUI's rule, restated: noise mask = clamp(conv2d(round(mask), ones(k, k), padding =
    ceil((k - 1) / 2)), 0, 1) cropped to the image (then resized to the latent, bilinear);
    pixels greyed where round(mask) is 1 only."""
    import math

    image = np.ones((1, 32, 32, 3), np.float32)
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, 12:16, 17:19] = 0.7  # rounds to 1
    mask[:, 3, 3] = 0.4  # rounds to 0: neither greyed nor grown
    out = run(VAEEncodeForInpaint, vae=PoolVAE(), image=image, mask=mask, grow_mask_by=grow).latent
    hole = torch.from_numpy(mask).round().unsqueeze(1)
    expected = hole
    if grow:
        conv = F.conv2d(hole, torch.ones(1, 1, grow, grow), padding=math.ceil((grow - 1) / 2))
        expected = conv.clamp(0, 1)[..., :32, :32]
    expected = F.interpolate(expected, size=(8, 8), mode="bilinear")
    assert torch.allclose(out.noise_mask, expected, atol=1e-6)
    greyed = torch.where(hole[:, 0].bool(), 0.5, 1.0)
    assert torch.allclose(out.samples[:, 0], F.avg_pool2d(greyed.unsqueeze(1), 4)[:, 0], atol=1e-6)


def test_superres_conditioning_concats_the_lowres_image_at_latent_size():
    lowres = np.random.default_rng(0).random((1, 16, 16, 3), dtype=np.float32)
    out = run(SuperResolutionConditioning, image=lowres, vae=PoolVAE(), scale_by=4, start="bicubic")
    assert out.latent.samples.shape == (1, 4, 16, 16)
    concat = out.positive[0].concat
    expected = torch.from_numpy(lowres).permute(0, 3, 1, 2)
    assert torch.allclose(concat, expected * 2 - 1)  # same size as the latent: as is, in -1..1
    # the start latent encodes the bicubic upsampling: pooling it back gives about the input
    assert (out.latent.samples[:, :3] - expected).abs().mean() < 0.1  # zeros would be ~0.5 away
    empty = run(SuperResolutionConditioning, image=lowres, vae=PoolVAE(), scale_by=4, start="empty").latent
    assert empty.samples.shape == (1, 4, 16, 16) and not empty.samples.any()


def test_pad_for_outpaint_marks_the_new_area_and_feathers_into_the_image():
    image = np.zeros((1, 16, 16, 3), np.float32)
    out = run(ImagePadForOutpaint, image=image, left=8, top=0, right=0, bottom=0, feathering=4)
    assert out.image.shape == (1, 16, 24, 3) and out.mask.shape == (1, 16, 24)
    assert (out.mask[:, :, :8] == 1).all() and np.allclose(out.image[:, :, :8], 0.5)
    assert out.mask[0, 0, 8] == pytest.approx(1.0) and out.mask[0, 0, 9] == pytest.approx((3 / 4) ** 2)
    assert (out.mask[:, :, 12:] == 0).all()


def test_composite_keeps_destination_pixels_outside_the_mask_exactly():
    rng = np.random.default_rng(1)
    dest, src = rng.random((1, 8, 8, 3), dtype=np.float32), rng.random((1, 8, 8, 3), dtype=np.float32)
    mask = np.zeros((1, 8, 8), np.float32)
    mask[:, 2:5, 2:5] = 1.0
    out = run(
        ImageCompositeMasked, destination=dest, source=src, x=0, y=0, mask=mask, mask_strength=1.0
    ).image
    assert np.array_equal(out[:, mask[0] == 0], dest[:, mask[0] == 0])
    assert np.array_equal(out[:, mask[0] == 1], src[:, mask[0] == 1])


def _blocky_scene(rng: np.random.Generator) -> np.ndarray:
    """A 64x64 image of a few flat rectangles (edges inside 4x4 blocks), values 0.2..0.8."""
    image = np.full((1, 64, 64, 3), 0.5, np.float32)
    for _ in range(4):
        x0, y0 = rng.integers(0, 48, 2)
        w, h = rng.integers(6, 16, 2)
        image[:, y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.2, 0.8, 3)
    return image


def test_match_lowres_ties_an_upscale_to_its_original_and_brings_it_closer_to_the_truth():
    from ldmgraph.nodes.image_ops import ImageMatchLowRes, box_downscale

    rng = np.random.default_rng(3)
    truth = _blocky_scene(rng)
    low = box_downscale(truth, 4)
    # an upscale with the right edges but wrong colours, as a super-resolution model may draw it
    guess = np.clip(truth * 0.8 + 0.15 + rng.normal(0, 0.02, truth.shape).astype(np.float32), 0, 1)
    out = run(ImageMatchLowRes, image=guess, lowres=low, iterations=8).image

    assert np.abs(box_downscale(out, 4) - low).max() < 2e-3
    assert np.abs(box_downscale(guess, 4) - low).max() > 0.05
    mse = lambda a: float(((a - truth) ** 2).mean())  # noqa: E731
    assert mse(out) < mse(guess) / 4
    assert np.array_equal(run(ImageMatchLowRes, image=guess, lowres=low, iterations=0).image, guess)


def test_match_lowres_names_the_inputs_when_sizes_do_not_divide():
    from ldmgraph.nodes.image_ops import ImageMatchLowRes

    with pytest.raises(NodeInputError, match="ImageMatchLowRes: input 'image' is 60x64.*'lowres' \\(16x16\\)"):
        run(ImageMatchLowRes, image=np.zeros((1, 64, 60, 3), np.float32), lowres=np.zeros((1, 16, 16, 3), np.float32))
