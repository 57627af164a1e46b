"""What a user of `UNetModel` / `AutoencoderKL` notices without diffusers: SD checkpoint shapes,
small training configs, half precision, gradient checkpointing, and clear errors."""

from __future__ import annotations

import pytest
import torch

from ldmgraph.models.autoencoder import AutoencoderKL
from ldmgraph.models.unet import UNetModel

SD1_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False,
)
SD2_UNET = dict(SD1_UNET, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SD_VAE = dict(
    ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                  ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
    embed_dim=4,
)


def _tiny_unet(**overrides: object) -> UNetModel:
    kwargs: dict = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                        num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, context_dim=16, norm_groups=8)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return UNetModel(**kwargs)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_sd_configs_have_the_released_parameter_counts_and_key_shapes() -> None:
    """Parameter counts of the released SD1.5 / SD2 U-Nets and the SD VAE (as diffusers reports them)."""
    with torch.device("meta"):
        sd1, sd2, vae = UNetModel(**SD1_UNET), UNetModel(**SD2_UNET), AutoencoderKL(**SD_VAE)
    assert sum(p.numel() for p in sd1.parameters()) == 859_520_964
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    s1, s2, v = _shapes(sd1), _shapes(sd2), _shapes(vae)
    # keys as they appear (after the `model.diffusion_model.` / `first_stage_model.` prefix) in SD files
    assert s1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert s1["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert s2["input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert s2["middle_block.1.transformer_blocks.0.attn2.to_v.weight"] == (1280, 1024)
    assert s1["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert s1["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert s1["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert s1["output_blocks.3.0.skip_connection.weight"] == (1280, 2560, 1, 1)
    assert s1["input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"] == (5120, 640)
    assert s1["out.2.weight"] == (4, 320, 3, 3) and s1["time_embed.2.weight"] == (1280, 1280)
    assert v["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert v["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert v["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert v["quant_conv.weight"] == (8, 8, 1, 1) and v["post_quant_conv.weight"] == (4, 4, 1, 1)


@pytest.mark.parametrize("channel_mult", [[1, 2], [1, 2, 2]])
@pytest.mark.parametrize("context_dim", [16, None])
def test_small_unets_keep_the_latent_shape(channel_mult: list[int], context_dim: int | None) -> None:
    unet = _tiny_unet(channel_mult=channel_mult, context_dim=context_dim, in_channels=7)
    x = torch.randn(2, 7, 16, 16)
    context = torch.randn(2, 5, 16) if context_dim else None
    out = unet(x, torch.tensor([1, 900]), context)
    assert out.shape == (2, 4, 16, 16)
    if context_dim is None:
        assert not any("attn2" in k for k in unet.state_dict())  # no cross-attention anywhere
        assert any(k.endswith("qkv.weight") for k in unet.state_dict())


def test_fresh_unet_predicts_zero_like_the_original_initialisation() -> None:
    """Output convolutions start at zero (original `zero_module`), so training starts from identity blocks."""
    out = _tiny_unet()(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16))
    assert torch.count_nonzero(out) == 0


def test_context_changes_the_prediction_and_timestep_scalar_is_broadcast() -> None:
    unet = _tiny_unet().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 4, 8, 8)
        a = unet(x, torch.tensor(500), torch.randn(2, 3, 16))
        b = unet(x, torch.tensor([500, 500]), torch.randn(2, 3, 16))
    assert (a - b).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain, ckpt = _tiny_unet(), _tiny_unet(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p1, p2 in zip(plain.parameters(), ckpt.parameters(), strict=True):
            noise = 0.05 * torch.randn_like(p1)
            p1.add_(noise)
            p2.add_(noise)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    for model in (plain, ckpt):
        model.train()
        model(x, torch.tensor([1, 2]), c).square().mean().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6), name


def test_bfloat16_unet_and_vae_stay_close_to_float32() -> None:
    unet = _tiny_unet().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = unet(x, torch.tensor([300]), c)
        half = unet.to(torch.bfloat16)(x.bfloat16(), torch.tensor([300]), c.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2
    vae = AutoencoderKL(dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_groups=8), 4)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_img = vae.decode(vae.encode(image).mean)
        half_img = vae.to(torch.bfloat16).decode(vae.encode(image.bfloat16()).mean)
    assert (half_img.float() - ref_img).abs().max() < 0.1


def test_autoencoder_downsampling_factor_and_forward() -> None:
    vae = AutoencoderKL(dict(double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
                             norm_groups=8), 3)
    assert vae.downsampling_factor == 4
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    decoded, posterior = vae(image, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert posterior.mean.shape == (2, 3, 8, 8) and decoded.shape == image.shape
    assert posterior.kl().shape == (2,)
    assert any(".attn.0." in k for k in vae.state_dict())  # attention at resolution 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_head_channels=-1, num_heads=-1), "num_heads or num_head_channels"),
        (dict(num_head_channels=12), "not divisible"),
        (dict(transformer_depth=[1, 1, 1]), "transformer_depth"),
        (dict(use_spatial_transformer=True, context_dim=None), "context_dim"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_parameter(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_unet(**overrides)


def test_missing_context_or_class_label_is_a_clear_error() -> None:
    unet = _tiny_unet()
    with pytest.raises(ValueError, match="context"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="class-conditional"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 3, 16), y=torch.tensor([0]))
