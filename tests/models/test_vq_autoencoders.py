"""The paper's VQ autoencoders (f4, f8, f16; attention-free f4) agree with diffusers' VQModel on the
same random weights written in the original layout: encode, quantize and decode, through `load_vae`
and the VAE handle that the VAEEncode / VAEDecode nodes use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ldmgraph.models.checkpoint import load_vae
from ldmgraph.models.vq import VQModel

TOL = 1e-4


def vq_config(ch_mult: list[int], attn_type: str = "vanilla", n_embed: int = 64) -> dict[str, Any]:
    ddconfig = {
        "double_z": False, "z_channels": 3, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": ch_mult, "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    }
    if attn_type != "vanilla":
        ddconfig["attn_type"] = attn_type
    return {"ddconfig": ddconfig, "embed_dim": 3, "n_embed": n_embed}


def random_vq_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = VQModel(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
        model.quantize.embedding.weight.normal_(0.0, 1.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def diffusers_vq(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    from diffusers import VQModel as DiffusersVQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    dd = config["ddconfig"]
    levels = len(dd["ch_mult"])
    model = DiffusersVQModel(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], num_vq_embeddings=config["n_embed"], vq_embed_dim=config["embed_dim"],
        norm_num_groups=32, mid_block_add_attention=dd.get("attn_type", "vanilla") != "none",
    )
    prefixed = {f"first_stage_model.{k}": v for k, v in weights.items()}
    converted = convert_ldm_vae_checkpoint(prefixed, {"down_block_types": model.config.down_block_types,
                                                      "up_block_types": model.config.up_block_types})
    converted["quantize.embedding.weight"] = weights["quantize.embedding.weight"]
    model.load_state_dict(converted, strict=True)
    return model.eval()


@pytest.mark.reference
@pytest.mark.parametrize(
    ("name", "ch_mult", "attn_type"),
    [("vq-f4", [1, 2, 4], "vanilla"), ("vq-f4-noattn", [1, 2, 4], "none"), ("vq-f8", [1, 2, 2, 4], "vanilla"),
     ("vq-f16", [1, 1, 2, 2, 4], "vanilla")],
)
def test_vq_autoencoder_agrees_with_diffusers(tmp_path: Path, name: str, ch_mult: list[int], attn_type: str) -> None:
    from ldmgraph.models.single_file import save_single_file

    config = vq_config(ch_mult, attn_type)
    weights = random_vq_weights(config, seed=len(name))
    path = tmp_path / f"{name}.safetensors"
    save_single_file(path, vae=weights)
    handle = load_vae(path)
    assert handle.scale_factor == 1.0 and handle.downscale == 2 ** (len(ch_mult) - 1)
    assert handle.latent_channels == 3
    has_attention = "encoder.mid.attn_1.q.weight" in handle.first_stage_model.state_dict()
    assert has_attention == (attn_type != "none")
    reference = diffusers_vq(config, weights)

    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 32, 32, 3, generator=g)
    with torch.no_grad():
        ref_latent = reference.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latents
        latent = handle.encode(pixels.numpy())
        assert latent.shape == ref_latent.shape
        assert (latent - ref_latent).abs().max().item() < TOL

        ref_quant = reference.quantize(ref_latent)[0]
        quant = handle.first_stage_model.quantize(latent)
        assert (quant - ref_quant).abs().max().item() < TOL
        assert not torch.allclose(quant, latent, atol=1e-3)  # quantization really moved the latents

        ref_image = ((reference.decode(ref_latent).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        image = handle.decode(latent)
        assert (image - ref_image).abs().max().item() < TOL
        unquantized = reference.decode(ref_latent, force_not_quantize=True).sample
        ours = handle.first_stage_model.decode(latent, force_not_quantize=True)
        assert (ours - unquantized).abs().max().item() < TOL


def test_vq_decode_snaps_to_the_codebook() -> None:
    """Decoding a latent equals decoding its nearest codebook vectors (closed form, per position)."""
    config = vq_config([1, 2])
    model = VQModel(**config).eval()
    model.load_state_dict(random_vq_weights(config, 3))
    codebook = model.quantize.embedding.weight
    z = torch.randn(1, 3, 4, 4)
    nearest = ((z.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
    snapped = codebook[nearest].permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.allclose(model.decode(z), model.decode(snapped, force_not_quantize=True), atol=1e-5)
