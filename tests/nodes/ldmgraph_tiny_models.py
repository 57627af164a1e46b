"""Tiny random checkpoints in the bundled-model format, written by the tests that need them.

Each file has the original single-file key layout (`model.diffusion_model.*`, `first_stage_model.*`)
and the `ldmgraph` metadata of docs/INTERFACES.md, so the loader treats it exactly like a bundled
model: a KL-f4 autoencoder (64x64 images, 16x16x4 latents), a small U-Net (MiniLM context 384, or
no text for super-resolution) and the bundled text encoder by name. Weights are random but seeded,
with the zero-initialised output layers perturbed so that every input changes the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUNDLED_NAMES = {
    "txt2img": "ldmgraph-shapes-txt2img.safetensors",
    "inpaint": "ldmgraph-shapes-inpaint.safetensors",
    "superres": "ldmgraph-shapes-superres.safetensors",
}
CONCAT = {"txt2img": (0, None), "inpaint": (5, "inpaint-mask-latent"), "superres": (3, "lowres-image")}
VAE_CONFIG = {
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "embed_dim": 4,
}
SCHEDULE = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}


def unet_config(kind: str) -> dict[str, Any]:
    """U-Net kwargs of a tiny model of `kind` (txt2img / inpaint with text, superres without)."""
    extra, _ = CONCAT[kind]
    text = kind != "superres"
    return {
        "in_channels": 4 + extra,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2] if text else [],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 16,
        "transformer_depth": 1,
        "context_dim": 384 if text else None,
        "use_linear_in_transformer": True,
    }


def write_tiny_checkpoint(path: Path, kind: str, seed: int = 0) -> Path:
    """Write a tiny random model of `kind` at `path` (bundled format) and return the path."""
    import torch
    from safetensors.torch import save_file

    from ldmgraph.models.autoencoder import AutoencoderKL
    from ldmgraph.models.unet import UNetModel

    torch.manual_seed(seed + sorted(CONCAT).index(kind))
    unet = UNetModel(**unet_config(kind))
    vae = AutoencoderKL(**VAE_CONFIG)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae)):
        for name, value in module.state_dict().items():
            value = value.detach().clone().float()
            if value.is_floating_point() and value.numel() > 1 and not value.any():
                value.normal_(0.0, 0.05)  # zero-initialised output layers: make them matter
            tensors[prefix + name] = value.contiguous()
    meta = {
        "format": "ldmgraph-bundled/1",
        "kind": kind,
        "unet": unet_config(kind),
        "vae": VAE_CONFIG,
        "scale_factor": 1.0,
        "text_encoder": None if kind == "superres" else "minilm-l6-v2",
        "concat": CONCAT[kind][1],
        "schedule": SCHEDULE,
        "prediction_type": "eps",
        "training": {"dataset": "none (random weights for tests)", "steps": 0, "seed": seed},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ldmgraph": json.dumps(meta)})
    return path


def write_tiny_models(folder: Path) -> Path:
    """The three bundled model names, as tiny random models, in `folder`."""
    for kind, name in BUNDLED_NAMES.items():
        write_tiny_checkpoint(folder / name, kind)
    return folder
