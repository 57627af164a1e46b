"""The diffusers folder layout: `model_index.json` with `unet/`, `vae/`, `text_encoder/`,
`tokenizer/` and `scheduler/` components, each converted to the original key names on load."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models import configs
from ldmgraph.models.checkpoint import unet_handle, vae_handle
from ldmgraph.models.detection import (
    CheckpointInfo,
    architecture_name,
    check_prediction_type,
    detect_concat_kind,
    dominant_dtype,
)
from ldmgraph.models.files import (
    CorruptCheckpointError,
    ModelFileNotFoundError,
    PickleRefusedError,
    UnexpectedKeysError,
    UnknownArchitectureError,
    convert_hint,
    read_state_dict,
)

# --- the diffusers folder layout --------------------------------------------------------------

_DIFFUSERS_BETAS = {"scaled_linear": "linear", "linear": "linear_plain", "squaredcos_cap_v2": "cosine"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ModelFileNotFoundError(path, "missing from the diffusers folder") from exc
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(path, f"not valid JSON ({exc})") from exc


def _component_folder(path: Path, name: str) -> Path:
    """`path/name` for a whole diffusers folder, or `path` itself when it is that component's folder."""
    if (path / name).is_dir():
        return path / name
    if (path / "config.json").is_file():
        return path
    raise ModelFileNotFoundError(path / name, f"the diffusers folder has no '{name}/' component")


def _read_component_weights(folder: Path, stem: str) -> dict[str, Tensor]:
    """The tensors of `folder/<stem>.safetensors`, its fp16 variant, or its shards (merged, still mmapped)."""
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    plain = [f for f in files if f.name == f"{stem}.safetensors"]
    shards = [f for f in files if re.fullmatch(re.escape(stem) + r"-\d+-of-\d+\.safetensors", f.name)]
    chosen = plain or shards or files[:1]
    if not chosen:
        pickled = sorted(folder.glob(f"{stem}*.bin"))
        if pickled:
            raise PickleRefusedError(pickled[0], convert_hint(pickled[0]))
        raise ModelFileNotFoundError(folder / f"{stem}.safetensors", "missing from the diffusers folder")
    tensors: dict[str, Tensor] = {}
    for f in chosen:
        tensors.update(read_state_dict(f).tensors)
    return tensors


def diffusers_schedule(path: Path) -> tuple[dict[str, Any], str | None]:
    """(our schedule kwargs, prediction type or None) from `scheduler/scheduler_config.json` (SD's when absent)."""
    cfg_path = path / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        return configs.sd_schedule(), None
    cfg = _read_json(cfg_path)
    beta = str(cfg.get("beta_schedule", "scaled_linear"))
    schedule = {
        "beta_schedule": _DIFFUSERS_BETAS.get(beta, beta),
        "linear_start": float(cfg.get("beta_start", 0.00085)),
        "linear_end": float(cfg.get("beta_end", 0.012)),
        "timesteps": int(cfg.get("num_train_timesteps", 1000)),
    }
    pred = cfg.get("prediction_type")
    return schedule, (None if pred is None else check_prediction_type(str(pred), cfg_path))


def load_diffusers_folder(
    path: Path,
    *,
    cache: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction_type: str | None = None,
    text_encoder: bool = True,
) -> Any:
    """A `Checkpoint` from a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `scheduler/`),
    renamed to the original layout through `diffusers_keys` (the one mapping table)."""
    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.handles import Checkpoint

    unet_dir = _component_folder(path, "unet")
    unet_cfg = dk.unet_config_from_diffusers(_read_json(unet_dir / "config.json"))
    schedule, folder_pred = diffusers_schedule(path)
    if prediction_type is not None:
        pred, source = check_prediction_type(prediction_type, path), "argument"
    elif folder_pred is not None:
        pred, source = folder_pred, "scheduler config"
    else:
        pred, source = "eps", "default"
    info = CheckpointInfo(
        path=str(path),
        layout="diffusers",
        architecture="diffusers",
        unet=unet_cfg,
        prediction_type=pred,
        prediction_type_source=source,
        concat_kind=detect_concat_kind(unet_cfg, path),
        schedule=schedule,
    )
    unet_weights = _read_component_weights(unet_dir, "diffusion_pytorch_model")
    info.dtype = dominant_dtype(unet_weights.values())
    try:
        renamed = dk.unet_from_diffusers(unet_weights, unet_cfg)
    except dk.KeyMappingError as exc:
        raise UnexpectedKeysError(unet_dir, "U-Net", [str(exc)]) from exc
    unet = unet_handle(renamed, info, dtype)
    vae = load_diffusers_vae(path, dtype=dtype, device=device) if (path / "vae").is_dir() else None
    if vae is not None:
        info.vae, info.scale_factor = vae.info.vae, vae.scale_factor
    text = None
    if text_encoder and (path / "text_encoder").is_dir():
        text = load_diffusers_text_encoder(path, dtype=dtype, device=device)
        info.text_encoder = {"kind": text.kind, "config": {}}
    architecture = architecture_name(
        unet_cfg, {"kind": text.kind} if text is not None else None, info.concat_kind
    )
    info.architecture = f"diffusers-{architecture}"
    return Checkpoint(unet=unet, vae=vae, text_encoder=text, info=info).to(device)


def load_diffusers_vae(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    scale_factor: float | None = None,
) -> Any:
    """A `VAEHandle` from a diffusers `vae/` folder (or a pipeline folder holding one)."""
    from ldmgraph.models import diffusers_keys as dk

    folder = _component_folder(path, "vae")
    cfg = _read_json(folder / "config.json")
    config = dk.vae_config_from_diffusers(cfg)
    scale = float(
        scale_factor if scale_factor is not None else cfg.get("scaling_factor", configs.SD_SCALE_FACTOR)
    )
    weights = _read_component_weights(folder, "diffusion_pytorch_model")
    info = CheckpointInfo(
        path=str(folder),
        layout="diffusers",
        architecture="vae",
        vae=config,
        scale_factor=scale,
        dtype=dominant_dtype(weights.values()),
    )
    try:
        renamed = dk.vae_from_diffusers(weights)
    except dk.KeyMappingError as exc:
        raise UnexpectedKeysError(folder, "autoencoder", [str(exc)]) from exc
    return vae_handle(renamed, info, dtype).to(device)


def load_diffusers_text_encoder(
    path: Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Any:
    """A `ClipTextEncoder` from a diffusers `text_encoder/` folder (transformers CLIPTextModel config + weights).

    The pad token is read from `tokenizer/` when present ("!" = id 0 for SD2's OpenCLIP vocabulary,
    else EOS); the last layer is the default (diffusers' SD2 folders already dropped the last block).
    """
    from ldmgraph.models import text_encoders as te

    folder = _component_folder(path, "text_encoder")
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise UnknownArchitectureError(
            folder, f"text encoder model_type {cfg.get('model_type')!r} is not CLIP"
        )
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "clip" else cfg
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "projection_dim",
    )
    kwargs = {k: cfg[k] for k in keep if k in cfg}
    weights = _read_component_weights(folder, "model")
    projection = weights.pop("text_projection.weight", None)
    kind = "clip-l" if kwargs.get("hidden_act", "quick_gelu") == "quick_gelu" else "openclip-h"
    pad_id = _diffusers_pad_id(path)
    encoder = te.clip_text_encoder_from_weights(
        weights,
        kind="clip-l",
        config_kwargs=kwargs,
        path=folder,
        dtype=dtype,
        pad_id=pad_id,
        default_clip_skip=1,
    )
    encoder.kind = kind
    if projection is not None:
        encoder.text_projection = nn.Parameter(
            projection.t().to(dtype or projection.dtype), requires_grad=False
        )
    return encoder.to(device)


def _diffusers_pad_id(path: Path) -> int:
    from ldmgraph.models.tokenizer import EOS_ID

    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / "tokenizer" / name
        if f.is_file():
            pad = _read_json(f).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad == "!":
                return 0
            if pad is not None:
                return EOS_ID
    return EOS_ID

