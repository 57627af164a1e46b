"""Torch models of latent diffusion: U-Net, KL autoencoder, text encoders, checkpoint loading, model cache.

Loading is one pipeline, one module per step, imported in this order only: `files` (read) ->
`diffusers_folder` (normalise to the original layout, through `diffusers_keys`) -> `detection` and
`paper` (detect) -> `build` (modules on the meta device, via `weights`) -> `handles` (MODEL / VAE /
TEXT_ENCODER values); `checkpoint` runs the steps (`load_checkpoint`, `load_vae`,
`load_text_encoder`). Module definitions: `unet`, `autoencoder`, `vq`, `text_encoders`,
`cond_stage`; `single_file` writes the original layout; `cache` is the model cache.
The common names below are exported lazily (PEP 562), so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_checkpoint": "ldmgraph.models.checkpoint",
    "load_vae": "ldmgraph.models.checkpoint",
    "load_text_encoder": "ldmgraph.models.checkpoint",
    "detect": "ldmgraph.models.checkpoint",
    "read_state_dict": "ldmgraph.models.checkpoint",
    "CheckpointInfo": "ldmgraph.models.checkpoint",
    "ModelError": "ldmgraph.models.checkpoint",
    "Checkpoint": "ldmgraph.models.handles",
    "DiffusionModelHandle": "ldmgraph.models.handles",
    "VAEHandle": "ldmgraph.models.handles",
    "TextEncoder": "ldmgraph.models.text_encoders",
    "TextEncoding": "ldmgraph.models.text_encoders",
    "ModelCache": "ldmgraph.models.cache",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldmgraph.models' has no attribute {name!r}")
