"""The handles nodes and samplers use: concat conditioning, VAE pixel conventions, noise schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import prefixed, tiny_unet, unet_state, vae_state, write

from ldmgraph.models.checkpoint import load_checkpoint, load_vae


@pytest.fixture
def inpaint_file(tmp_path: Path) -> Path:
    tensors = {
        **prefixed("model.diffusion_model.", unet_state(tiny_unet(in_channels=9))),
        **prefixed("first_stage_model.", vae_state()),
        "scale_factor": torch.tensor(0.3),
    }
    return write(tmp_path / "inpaint.safetensors", tensors)


def test_apply_model_stacks_concat_onto_x(inpaint_file: Path) -> None:
    ckpt = load_checkpoint(inpaint_file)
    unet = ckpt.unet
    assert (unet.in_channels, unet.latent_channels, unet.concat_kind) == (9, 4, "inpaint-mask-latent")
    gen = torch.Generator().manual_seed(0)
    x, concat = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)
    context, t = torch.randn(2, 5, 768, generator=gen), torch.tensor([3.0, 700.5])
    out = unet.apply_model(x, t, context=context, concat=concat)
    with torch.no_grad():
        ref = unet.diffusion_model(torch.cat([x, concat], 1), t, context=context)
    assert out.shape == x.shape and torch.equal(out, ref)
    with pytest.raises(ValueError, match="needs concat conditioning"):
        unet.apply_model(x, t, context=context)


def test_noise_schedule_is_sd_linear_by_default(inpaint_file: Path) -> None:
    """Closed form: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, alpha_bar = cumprod(1 - beta)."""
    unet = load_checkpoint(inpaint_file).unet
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert unet.prediction_type == "eps"
    assert torch.allclose(unet.noise_schedule.alphas_cumprod, alpha_bar, rtol=1e-12, atol=0)


def test_vae_pixels_latents_conventions(inpaint_file: Path) -> None:
    vae = load_checkpoint(inpaint_file).vae
    assert (vae.downscale, vae.latent_channels, vae.scale_factor) == (2, 4, pytest.approx(0.3))
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 17, 12, 3), dtype=np.float32)  # 17 is not a multiple of 2: centre-cropped to 16
    latent = vae.encode(pixels)
    assert latent.shape == (2, 4, 8, 6) and latent.dtype == torch.float32
    module = vae.first_stage_model
    with torch.no_grad():
        x = torch.from_numpy(pixels[:, 0:16]).permute(0, 3, 1, 2) * 2 - 1
        assert torch.allclose(latent, module.encode(x).mode() * 0.3, atol=1e-6)
        image = vae.decode(latent)
        ref = ((module.decode(latent / 0.3) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert image.shape == (2, 16, 12, 3) and image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image, ref, atol=1e-6)
    sampled = vae.encode(torch.from_numpy(pixels), generator=torch.Generator().manual_seed(1))
    assert sampled.shape == latent.shape and not torch.equal(sampled, latent)


def test_standalone_vae_file_in_both_key_layouts(tmp_path: Path) -> None:
    """A VAE file with top-level `encoder.*` keys, and the same weights renamed to diffusers' names."""
    from ldmgraph.models.diffusers_keys import vae_to_diffusers

    state = vae_state()
    plain = load_vae(write(tmp_path / "vae.safetensors", state))
    renamed = load_vae(write(tmp_path / "vae-diffusers.safetensors", vae_to_diffusers(state)))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    assert plain.scale_factor == pytest.approx(0.18215)
    assert torch.allclose(plain.decode(z), renamed.decode(z), atol=1e-6)
