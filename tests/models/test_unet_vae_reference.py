"""Our U-Net and KL autoencoder agree with diffusers on the same weights, both ways.

diffusers is the independent reference: small random diffusers models are saved in the diffusers
folder layout, loaded into ldmgraph through `diffusers_keys`, and must give the same outputs
(max abs difference <= 1e-4 in fp32). The other direction: ldmgraph writes the original
single-file layout and diffusers' own `from_single_file` (offline, local `config=` folder) must
read it back to the same outputs. Models are tiny so the file runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ldmgraph.models import diffusers_keys as dk  # noqa: E402
from ldmgraph.models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution  # noqa: E402
from ldmgraph.models.single_file import save_single_file  # noqa: E402
from ldmgraph.models.unet import UNetModel, timestep_embedding  # noqa: E402

pytestmark = pytest.mark.reference
TOL = 1e-4

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # SD1-like: conv proj_in/out, a fixed number of heads, attention at the top level only
    "sd1_conv_heads": dict(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, sample_size=16,
    ),
    # SD2-like: linear proj_in/out, fixed head width (16 channels per head: 2 then 4 heads)
    "sd2_linear_head_channels": dict(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True,
        norm_num_groups=8, sample_size=16,
    ),
    # SD-inpainting-like 9 input channels, three levels, attention deeper only, depth 2,
    # two residual blocks, class labels
    "inpaint9_three_levels": dict(
        in_channels=9, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, transformer_layers_per_block=2,
        num_class_embeds=10, norm_num_groups=8, sample_size=16,
    ),
}
# the paper's concat models: no cross-attention, self-attention blocks (diffusers' UNet2DModel)
CONCAT_UNET = dict(
    in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=8, norm_num_groups=8, sample_size=16,
)
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "f2_two_levels": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "f4_three_levels": dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
                            sample_size=32, latent_channels=3,
                            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
    "f8_sd_like_groups32": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32,
                                sample_size=32,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norms and biases too), scaled to keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * noise)
    return model.eval()


def _unet_inputs(in_channels: int, context_dim: int | None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, 16, 16, generator=gen)
    t = torch.tensor([3.0, 801.0])
    context = torch.randn(2, 7, context_dim, generator=gen) if context_dim else None
    return x, t, context


def _ours_from_diffusers_unet(folder: Path) -> tuple[UNetModel, dict[str, Any]]:
    config = json.loads((folder / "config.json").read_text())
    weights = safetensors_torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    kwargs = dk.unet_config_from_diffusers(config)
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(dk.unet_from_diffusers(weights, kwargs), strict=True)
    return ours, kwargs


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_from_diffusers_layout_matches_diffusers(name: str, tmp_path: Path) -> None:
    cfg = UNET_CONFIGS[name]
    ref = _randomize(diffusers.UNet2DConditionModel(**cfg), seed=len(name))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours, kwargs = _ours_from_diffusers_unet(tmp_path)
    x, t, context = _unet_inputs(cfg.get("in_channels", 4), cfg["cross_attention_dim"])
    labels = torch.tensor([1, 7]) if cfg.get("num_class_embeds") else None
    with torch.no_grad():
        expected = ref(x, t, context, class_labels=labels).sample
        got = ours(x, t, context, y=labels)
    assert expected.abs().max() > 0.05  # a dead network would agree trivially
    assert (got - expected).abs().max().item() <= TOL
    # the mapping is a bijection: our weights rename back to exactly diffusers' tensors
    back = dk.unet_to_diffusers(ours.state_dict(), kwargs)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    assert dk.unet_config_from_diffusers(dk.unet_config_to_diffusers(kwargs)) == kwargs


def test_concat_unet_without_cross_attention_matches_diffusers(tmp_path: Path) -> None:
    ref = _randomize(diffusers.UNet2DModel(**CONCAT_UNET), seed=7)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours, kwargs = _ours_from_diffusers_unet(tmp_path)
    assert kwargs["context_dim"] is None and kwargs["in_channels"] == 7
    x, t, _ = _unet_inputs(7, None)
    with torch.no_grad():
        expected = ref(x, t).sample
        got = ours(x, t)
    assert expected.abs().max() > 0.05
    assert (got - expected).abs().max().item() <= TOL
    back = dk.unet_to_diffusers(ours.state_dict(), kwargs)
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def _first_resblock_rows(ours: UNetModel) -> tuple[list[int], Any]:
    """Rows of the batch the first residual block computes, per call (a forward hook)."""
    from ldmgraph.models.unet import ResBlock

    first = next(m for m in ours.modules() if isinstance(m, ResBlock))
    rows: list[int] = []
    return rows, first.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))


@pytest.mark.parametrize(("name", "labels_differ"), [
    *[(name, False) for name in UNET_CONFIGS],
    *[(name, True) for name, cfg in UNET_CONFIGS.items() if cfg.get("num_class_embeds")],
])
def test_guidance_batch_shares_work_before_cross_attention_and_matches_diffusers(
    name: str, labels_differ: bool, tmp_path: Path
) -> None:
    """Classifier-free guidance's batch: the same latents and timesteps twice, two contexts.

    Until the first cross-attention the two stacks are equal, and ldmgraph computes that part once
    (the first residual block sees half the rows); diffusers computes the whole batch, and the
    outputs must still agree. A class label that differs between the stacks changes the timestep
    embedding, so then nothing is shared."""
    cfg = UNET_CONFIGS[name]
    ref = _randomize(diffusers.UNet2DConditionModel(**cfg), seed=len(name))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = _ours_from_diffusers_unet(tmp_path)
    x, t, context = _unet_inputs(cfg.get("in_channels", 4), cfg["cross_attention_dim"])
    assert context is not None
    uncond = torch.randn(context.shape, generator=torch.Generator().manual_seed(5))
    xs, ts, contexts = torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, uncond])
    labels = None
    if cfg.get("num_class_embeds"):
        labels = torch.tensor([1, 7, 2, 7]) if labels_differ else torch.tensor([1, 7, 1, 7])
    rows, hook = _first_resblock_rows(ours)
    try:
        with torch.no_grad():
            expected = ref(xs, ts, contexts, class_labels=labels).sample
            got = ours(xs, ts, contexts, y=labels)
    finally:
        hook.remove()
    assert rows == [4 if labels_differ else 2]
    assert (expected[:2] - expected[2:]).abs().max() > 0.01  # the two contexts give different predictions
    assert (got - expected).abs().max().item() <= TOL


def test_concat_unet_guidance_batch_matches_diffusers(tmp_path: Path) -> None:
    """No cross-attention at all: the whole down path runs once for equal stacks."""
    ref = _randomize(diffusers.UNet2DModel(**CONCAT_UNET), seed=7)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = _ours_from_diffusers_unet(tmp_path)
    x, t, _ = _unet_inputs(7, None)
    rows, hook = _first_resblock_rows(ours)
    try:
        with torch.no_grad():
            expected = ref(torch.cat([x, x]), torch.cat([t, t])).sample
            got = ours(torch.cat([x, x]), torch.cat([t, t]))
    finally:
        hook.remove()
    assert rows == [2]
    assert (got - expected).abs().max().item() <= TOL


def _ours_from_diffusers_vae(folder: Path) -> AutoencoderKL:
    config = json.loads((folder / "config.json").read_text())
    weights = safetensors_torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    ours = AutoencoderKL(**dk.vae_config_from_diffusers(config)).eval()
    ours.load_state_dict(dk.vae_from_diffusers(weights), strict=True)
    return ours


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_from_diffusers_layout_matches_diffusers(name: str, tmp_path: Path) -> None:
    ref = _randomize(diffusers.AutoencoderKL(**VAE_CONFIGS[name]), seed=len(name))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = _ours_from_diffusers_vae(tmp_path)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected_posterior = ref.encode(image).latent_dist
        posterior = ours.encode(image)
        z = expected_posterior.mean
        expected_image, image_out = ref.decode(z).sample, ours.decode(z)
    assert posterior.mean.shape[1] == VAE_CONFIGS[name].get("latent_channels", 4)
    assert (posterior.mean - expected_posterior.mean).abs().max().item() <= TOL
    assert (posterior.std - expected_posterior.std).abs().max().item() <= TOL
    assert expected_image.abs().max() > 0.05
    assert (image_out - expected_image).abs().max().item() <= TOL
    back = dk.vae_to_diffusers(ours.state_dict())
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_single_file_written_by_us_is_read_by_diffusers(name: str, tmp_path: Path) -> None:
    """ldmgraph -> original single file -> diffusers `from_single_file` (offline, local config)."""
    cfg = UNET_CONFIGS[name]
    vae_name = list(VAE_CONFIGS)[list(UNET_CONFIGS).index(name)]
    folder = tmp_path / "diffusers"
    # the diffusers folder only provides config.json files for `config=`; weights come from us
    _randomize(diffusers.UNet2DConditionModel(**cfg), seed=1).save_pretrained(folder / "unet")
    _randomize(diffusers.AutoencoderKL(**VAE_CONFIGS[vae_name]), seed=1).save_pretrained(folder / "vae")
    unet_kwargs = dk.unet_config_from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    vae_kwargs = dk.vae_config_from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    ours_unet = _randomize(UNetModel(**unet_kwargs), seed=11)
    ours_vae = _randomize(AutoencoderKL(**vae_kwargs), seed=12)
    path = save_single_file(tmp_path / "model.safetensors", unet=ours_unet, vae=ours_vae)

    theirs_unet = diffusers.UNet2DConditionModel.from_single_file(
        path, config=str(folder), subfolder="unet", local_files_only=True
    )
    theirs_vae = diffusers.AutoencoderKL.from_single_file(
        path, config=str(folder), subfolder="vae", local_files_only=True
    )
    x, t, context = _unet_inputs(cfg.get("in_channels", 4), cfg["cross_attention_dim"])
    labels = torch.tensor([1, 7]) if cfg.get("num_class_embeds") else None
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got, expected = ours_unet(x, t, context, y=labels), theirs_unet.eval()(x, t, context, class_labels=labels).sample
        mean, expected_mean = ours_vae.encode(image).mean, theirs_vae.eval().encode(image).latent_dist.mean
        decoded, expected_decoded = ours_vae.decode(mean), theirs_vae.decode(mean).sample
    assert expected.abs().max() > 0.05
    assert (got - expected).abs().max().item() <= TOL
    assert (mean - expected_mean).abs().max().item() <= TOL
    assert (decoded - expected_decoded).abs().max().item() <= TOL


def test_timestep_embedding_is_diffusers_sd_embedding() -> None:
    """cos-first sinusoidal embedding: diffusers' `flip_sin_to_cos=True, downscale_freq_shift=0`."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    expected = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 320), expected, atol=1e-6)


def test_posterior_kl_and_sampling_follow_the_gaussian_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=gen)
    posterior = DiagonalGaussianDistribution(moments)
    normal = torch.distributions.Normal(posterior.mean, posterior.std)
    standard = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.std))
    expected_kl = torch.distributions.kl_divergence(normal, standard).sum(dim=[1, 2, 3])
    assert torch.allclose(posterior.kl(), expected_kl, rtol=1e-5)
    same = posterior.sample(torch.Generator().manual_seed(5)), posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(*same)
    assert torch.equal(posterior.mode(), moments[:, :4])


SD_DIFFUSERS_UNETS = {
    # diffusers' published unet/config.json values (SD1.5 and SD2.1) vs the original yaml configs
    "sd15": (dict(cross_attention_dim=768, attention_head_dim=8),
             dict(num_heads=8, context_dim=768, use_linear_in_transformer=False)),
    "sd21": (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
             dict(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)),
    "sd2_inpaint": (dict(in_channels=9, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                         use_linear_projection=True),
                    dict(in_channels=9, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)),
}


@pytest.mark.parametrize("name", list(SD_DIFFUSERS_UNETS))
def test_full_size_sd_configs_map_key_for_key_and_shape_for_shape(name: str) -> None:
    """Real SD-size diffusers configs (on the meta device: no memory) map onto the original yaml's U-Net."""
    diffusers_cfg, expected = SD_DIFFUSERS_UNETS[name]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_cfg)
        kwargs = dk.unet_config_from_diffusers(dict(ref.config))
        ours = UNetModel(**kwargs)
    for key, value in expected.items():
        assert kwargs[key] == value, key
    assert kwargs["attention_resolutions"] == [1, 2, 4] and kwargs["channel_mult"] == [1, 2, 4, 4]
    renamed = dk.unet_from_diffusers(ref.state_dict(), kwargs)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        ours_vae = AutoencoderKL(**dk.vae_config_from_diffusers(dict(vae.config)))
    renamed_vae = dk.vae_from_diffusers(vae.state_dict())
    assert {k: tuple(v.shape) for k, v in renamed_vae.items()} == {k: tuple(v.shape) for k, v in ours_vae.state_dict().items()}
