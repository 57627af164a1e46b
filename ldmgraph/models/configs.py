"""Architecture configurations as plain dicts, in the original latent-diffusion config names.

Sources: the released `v1-inference.yaml` / `v2-inference(-v).yaml` / `v1-inpainting-inference.yaml`
of Stable Diffusion (CompVis, Stability AI) and the LDM paper's configs (Rombach et al. 2022,
Tab. 13-15). The dicts are copied by the accessors, so callers may change them freely.
"""

from __future__ import annotations

import copy
from typing import Any

SD_SCALE_FACTOR = 0.18215
"""Latent scale factor of the Stable Diffusion 1.x/2.x KL-f8 autoencoder (unit variance of the training latents)."""

SD_SCHEDULE: dict[str, Any] = {
    "beta_schedule": "linear",
    "linear_start": 0.00085,
    "linear_end": 0.012,
    "timesteps": 1000,
}
"""SD's training schedule; "linear" is the original code's name for linspace over sqrt(beta), squared."""

_SD1_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
}

_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "num_heads": -1,
    "num_head_channels": 64,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
}

_SD_VAE: dict[str, Any] = {
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "embed_dim": 4,
}


def sd1_unet(**overrides: Any) -> dict[str, Any]:
    """SD 1.x U-Net (860M parameters): 8 heads, conv proj_in/out, CLIP ViT-L context 768."""
    return {**copy.deepcopy(_SD1_UNET), **overrides}


def sd1_inpaint_unet() -> dict[str, Any]:
    """SD 1.x inpainting U-Net: 9 input channels (latent 4 + mask 1 + masked-image latent 4)."""
    return sd1_unet(in_channels=9)


def sd2_unet(**overrides: Any) -> dict[str, Any]:
    """SD 2.x U-Net: 64 channels per head, linear proj_in/out, OpenCLIP ViT-H context 1024."""
    return {**copy.deepcopy(_SD2_UNET), **overrides}


def sd_vae() -> dict[str, Any]:
    """The KL-f8 autoencoder of SD 1.x/2.x (`AutoencoderKL(**sd_vae())`)."""
    return copy.deepcopy(_SD_VAE)


def sd_schedule() -> dict[str, Any]:
    """The noise schedule of SD 1.x/2.x training (NoiseSchedule.from_config kwargs)."""
    return dict(SD_SCHEDULE)


def vae_downscale(ddconfig: dict[str, Any]) -> int:
    """Spatial downsampling factor f of an autoencoder config: 2 ** (levels - 1)."""
    return int(2 ** (len(ddconfig["ch_mult"]) - 1))
