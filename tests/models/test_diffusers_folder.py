"""A whole diffusers pipeline folder loads through `load_checkpoint` and agrees with diffusers itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import clip_model

from ldmgraph.models.checkpoint import PickleRefusedError, load_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, Any]:
    """unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json, tiny random SD2-style (linear proj, v)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        scaling_factor=0.25,
    ).eval()
    text = clip_model(hidden=64, heads=4, layers=2, act="gelu", seed=3)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "DDIMScheduler",
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "num_train_timesteps": 1000,
                "prediction_type": "v_prediction",
            }
        )
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder, unet, vae, text


@pytest.mark.reference
def test_pipeline_folder_agrees_with_diffusers(pipeline_folder: tuple[Path, Any, Any, Any]) -> None:
    folder, unet, vae, text = pipeline_folder
    ckpt = load_checkpoint(folder)
    assert ckpt.info.layout == "diffusers"
    assert ckpt.unet.prediction_type == "v" and ckpt.info.prediction_type_source == "scheduler config"
    assert (
        ckpt.unet.schedule["beta_schedule"] == "linear"
    )  # diffusers' scaled_linear is the original "linear"
    assert ckpt.vae.scale_factor == 0.25 and ckpt.text_encoder.pad_id == 0

    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 64, generator=gen)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=context).sample
        ours = ckpt.unet.apply_model(x, t, context=context)
        assert (ours - ref).abs().max().item() <= TOL

        z = torch.randn(1, 4, 8, 8, generator=gen)
        ref_image = ((vae.decode(z / 0.25).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        assert (ckpt.vae.decode(z) - ref_image).abs().max().item() <= TOL

        ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
        ref_ctx = text(input_ids=ids).last_hidden_state
    assert (ckpt.text_encoder.encode(["a photo of a cat"]).context - ref_ctx).abs().max().item() <= TOL


def test_component_folder_with_only_bin_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DConditionModel",
                "block_out_channels": [32, 64],
                "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "cross_attention_dim": 32,
            }
        )
    )
    torch.save({}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="diffusion_pytorch_model.bin"):
        load_checkpoint(tmp_path)
