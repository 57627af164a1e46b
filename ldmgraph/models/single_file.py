"""Write the original single-file checkpoint layout (what SD 1.x/2.x `.safetensors` files hold): the
one writer of checkpoints, used by the training exports, `ldmgraph convert` and the tests.

One safetensors file with the U-Net under `model.diffusion_model.`, the autoencoder under
`first_stage_model.` and, optionally, the text encoder's tensors under their own prefix
(`cond_stage_model.transformer.` for SD1's CLIP). Our modules already use the original key
names, so writing is prefixing; a diffusers model is written by first renaming its state dict
with `ldmgraph.models.diffusers_keys`. Other tools (diffusers' `from_single_file`, ComfyUI,
A1111) read the result. The file is written under a temporary name and renamed, so a failed
write never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."


def _tensors(part: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return part.state_dict() if isinstance(part, nn.Module) else part


def original_state_dict(
    unet: nn.Module | Mapping[str, torch.Tensor] | None = None,
    vae: nn.Module | Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of a single-file checkpoint: U-Net and VAE keys prefixed, `extra` as given.

    `unet`/`vae` are our modules or state dicts in the original layout (no prefix); `extra` holds
    fully prefixed keys (e.g. a text encoder's `cond_stage_model.transformer.text_model...`).
    Floating tensors are cast to `dtype` when given.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, part in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), ("", extra)):
        if part is None:
            continue
        for key, tensor in _tensors(part).items():
            if tensor.is_meta:
                raise ValueError(f"single file: tensor {prefix + key} is on the meta device (weights never loaded)")
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[prefix + key] = tensor
    return out


def save_single_file(
    path: str | Path,
    unet: nn.Module | Mapping[str, torch.Tensor] | None = None,
    vae: nn.Module | Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an original-layout `.safetensors` checkpoint atomically and return its path.

    `metadata` values that are not strings are stored as JSON (safetensors metadata is str -> str),
    e.g. `{"ldmgraph": {...}}` for the bundled models' description.
    """
    tensors = original_state_dict(unet, vae, extra, dtype)
    if not tensors:
        raise ValueError(f"single file: nothing to write to {path} (no unet, vae or extra tensors)")
    return write_state_dict(path, tensors, metadata)


def write_state_dict(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write fully prefixed tensors (already in the original layout) to `path` atomically, bits unchanged.

    Tensors that share storage (tied weights) or are not contiguous are written from their own copy,
    as safetensors needs. `metadata` values that are not strings are stored as JSON.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".sft"):
        raise ValueError(f"single file: {path} must end in .safetensors (pickled checkpoints are not written)")
    tensors = {key: t.detach() for key, t in tensors.items()}
    # safetensors needs contiguous tensors that share no storage
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.contiguous().clone()
            tensors[key] = tensor
        seen.add(tensor.untyped_storage().data_ptr())
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
