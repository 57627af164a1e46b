"""The diffusers folder layout, normalised to the original one (the normalise step of loading).

A diffusers pipeline folder (`model_index.json` with `unet/`, `vae/`, `text_encoder/`, `tokenizer/`
and `scheduler/` components) is read into one `StateDict` in the original single-file layout: the
U-Net under `model.diffusion_model.` and the autoencoder under `first_stage_model.`, renamed
through `diffusers_keys` (the one mapping table), the CLIP text model under
`cond_stage_model.transformer.` (transformers' names, as SD1 files hold it) and its projection
under `cond_stage_model.model.text_projection` (OpenCLIP's [D, P] orientation). The facts the
folder's JSON files state (U-Net and autoencoder configs, scale factor, training schedule,
prediction type, text model config and pad token) travel beside it for the detect step.

SDXL folders (`add_sdxl`): a base folder holds `unet/` (`addition_embed_type="text_time"`: the `adm`
MLP is `add_embedding`, `addition_time_embed_dim` the width of each size number's features),
`text_encoder/` (CLIP ViT-L, `CLIPTextModel`), `text_encoder_2/` (OpenCLIP ViT-bigG as
`CLIPTextModelWithProjection`: `text_projection.weight` [P, D]), `tokenizer/` and `tokenizer_2/`
(bigG's pads with "!", id 0). A refiner folder has `text_encoder_2/` alone. The text weights keep
transformers' names, under `conditioner.embedders.0.transformer.` (ViT-L) and
`conditioner.embedders.1.transformer.` (bigG); `sdxl.build_text_encoder` reads either naming. The
SDXL key tables come from `sdxl_keys` (data), so normalising imports no later loading step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ldmgraph.models import configs, families
from ldmgraph.models import diffusers_keys as dk
from ldmgraph.models import sdxl_keys as sk
from ldmgraph.models.files import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CorruptCheckpointError,
    ModelFileNotFoundError,
    PickleRefusedError,
    StateDict,
    UnexpectedKeysError,
    UnknownArchitectureError,
    convert_hint,
    read_state_dict,
)
from ldmgraph.models.tokenizer import EOS_ID

TEXT_PROJECTION = OPENCLIP_PREFIX + "text_projection"

_DIFFUSERS_BETAS = {"scaled_linear": "linear", "linear": "linear_plain", "squaredcos_cap_v2": "cosine"}


@dataclass
class DiffusersFolder:
    """A diffusers folder in the original layout (`state`) plus the facts of its JSON files.

    `unet` / `vae` are UNetModel / autoencoder kwargs (None: that component was not read);
    `text` is {"kind", "config" (transformers CLIPTextConfig kwargs), "pad_id", "path"} or None;
    `prediction_type` is the scheduler config's, as written there (None when it has none).
    """

    path: Path
    state: StateDict
    unet: dict[str, Any] | None = None
    vae: dict[str, Any] | None = None
    vae_path: Path | None = None
    scale_factor: float | None = None
    schedule: dict[str, Any] = field(default_factory=configs.sd_schedule)
    prediction_type: str | None = None
    text: dict[str, Any] | None = None
    family: str | None = None  # "sdxl-base" | "sdxl-refiner" (see add_sdxl), None for SD1/SD2-like
    metadata: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ModelFileNotFoundError(path, "missing from the diffusers folder") from exc
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(path, f"not valid JSON ({exc})") from exc


def component_folder(path: Path, name: str) -> Path:
    """`path/name` for a whole diffusers folder, or `path` itself when it is that component's folder."""
    if (path / name).is_dir():
        return path / name
    if (path / "config.json").is_file():
        return path
    raise ModelFileNotFoundError(path / name, f"the diffusers folder has no '{name}/' component")


def read_component_weights(folder: Path, stem: str) -> dict[str, Tensor]:
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
    """(our schedule kwargs, prediction type as written or None) from `scheduler/scheduler_config.json`
    (SD's schedule when absent)."""
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
    return schedule, (None if pred is None else str(pred))


def normalise_pipeline(path: Path, *, text_encoder: bool = True) -> DiffusersFolder:
    """A whole pipeline folder (or a `unet/` folder) in the original layout: its U-Net, and its
    autoencoder and text model when the folder has them (`text_encoder=False` skips the latter)."""
    refused = families.diffusers_family(_model_index(path), (path / "transformer").is_dir())
    if refused is not None:
        raise families.UnsupportedFamilyError(path, refused)
    folder = DiffusersFolder(path=path, state=StateDict(path, {}))
    _add_unet(folder, component_folder(path, "unet"))
    folder.schedule, folder.prediction_type = diffusers_schedule(path)
    if (path / "vae").is_dir():
        _add_vae(folder, path, None)
    if is_sdxl_folder(path):  # two text encoders (or the refiner's second alone)
        add_sdxl(folder, path, text_encoder=text_encoder)
    elif text_encoder and (path / "text_encoder").is_dir():
        _add_text(folder, path)
    return folder


def _model_index(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    return _read_json(index) if index.is_file() else {}


def normalise_vae(path: Path, *, scale_factor: float | None = None) -> DiffusersFolder:
    """A diffusers `vae/` folder (or a pipeline folder holding one) in the original layout."""
    folder = DiffusersFolder(path=path, state=StateDict(path, {}))
    _add_vae(folder, path, scale_factor)
    return folder


def normalise_text_encoder(path: Path) -> DiffusersFolder:
    """A diffusers `text_encoder/` folder (or a pipeline folder holding one) in the original layout."""
    folder = DiffusersFolder(path=path, state=StateDict(path, {}))
    _add_text(folder, path)
    return folder


def original_vae_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A standalone autoencoder file's weights in the original names (diffusers-named ones renamed)."""
    if any(k.startswith("encoder.down_blocks.") for k in weights):
        return dict(dk.vae_from_diffusers(weights))
    return weights


def _add_unet(folder: DiffusersFolder, unet_dir: Path) -> None:
    folder.unet = dk.unet_config_from_diffusers(_read_json(unet_dir / "config.json"))
    weights = read_component_weights(unet_dir, "diffusion_pytorch_model")
    try:
        renamed = dk.unet_from_diffusers(weights, folder.unet)
    except dk.KeyMappingError as exc:
        raise UnexpectedKeysError(unet_dir, "U-Net", [str(exc)]) from exc
    folder.state.tensors.update({UNET_PREFIX + k: v for k, v in renamed.items()})


def _add_vae(folder: DiffusersFolder, path: Path, scale_factor: float | None) -> None:
    vae_dir = component_folder(path, "vae")
    cfg = _read_json(vae_dir / "config.json")
    folder.vae = dk.vae_config_from_diffusers(cfg)
    folder.vae_path = vae_dir
    folder.scale_factor = float(
        scale_factor if scale_factor is not None else cfg.get("scaling_factor", configs.SD_SCALE_FACTOR)
    )
    weights = read_component_weights(vae_dir, "diffusion_pytorch_model")
    try:
        renamed = dk.vae_from_diffusers(weights)
    except dk.KeyMappingError as exc:
        raise UnexpectedKeysError(vae_dir, "autoencoder", [str(exc)]) from exc
    folder.state.tensors.update({VAE_PREFIX + k: v for k, v in renamed.items()})


_TEXT_CONFIG_KEYS = (
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


def _add_text(folder: DiffusersFolder, path: Path) -> None:
    """The CLIP text model (transformers CLIPTextModel config + weights) of a `text_encoder/` folder.

    The pad token is read from `tokenizer/` when present ("!" = id 0 for SD2's OpenCLIP vocabulary,
    else EOS); the last layer is the default (diffusers' SD2 folders already dropped the last block).
    """
    text_dir = component_folder(path, "text_encoder")
    cfg = _read_json(text_dir / "config.json")
    if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise UnknownArchitectureError(
            text_dir, f"text encoder model_type {cfg.get('model_type')!r} is not CLIP"
        )
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "clip" else cfg
    kwargs = {k: cfg[k] for k in _TEXT_CONFIG_KEYS if k in cfg}
    weights = read_component_weights(text_dir, "model")
    projection = weights.pop("text_projection.weight", None)
    kind = "clip-l" if kwargs.get("hidden_act", "quick_gelu") == "quick_gelu" else "openclip-h"
    folder.text = {"kind": kind, "config": kwargs, "pad_id": _pad_id(path), "path": text_dir}
    folder.state.tensors.update({CLIP_PREFIX + k: v for k, v in weights.items()})
    if projection is not None:
        folder.state.tensors[TEXT_PROJECTION] = projection.t()  # transformers' Linear [P, D] -> OpenCLIP's [D, P]


def _pad_id(path: Path) -> int:
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


# --- SDXL folders: a second text encoder (bigG), and the U-Net's vector layout ------------------


def is_sdxl_folder(path: Path) -> bool:
    """A diffusers pipeline folder of SDXL (a second text encoder, or an SDXL U-Net config)."""
    if (path / "text_encoder_2").is_dir():
        return True
    cfg = path / "unet" / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"
        except (OSError, json.JSONDecodeError, AttributeError):
            return False
    return False


def _sdxl_text_kwargs(text_dir: Path) -> dict[str, Any]:
    cfg = _read_json(text_dir / "config.json")
    cfg = cfg.get("text_config", cfg)
    return {k: cfg[k] for k in _TEXT_CONFIG_KEYS if k in cfg}


def add_sdxl(folder: DiffusersFolder, path: Path, *, text_encoder: bool = True) -> None:
    """Fill an SDXL `DiffusersFolder` (its U-Net already read): family, vector layout, text encoders."""
    unet_cfg = _read_json(path / "unet" / "config.json") if (path / "unet").is_dir() else {}
    has_l = (path / "text_encoder").is_dir()
    family = "sdxl-base" if has_l or (folder.unet or {}).get("context_dim") == 2048 else "sdxl-refiner"
    adm = int((folder.unet or {}).get("adm_in_channels") or 0)
    if not adm:
        raise UnknownArchitectureError(path / "unet", "an SDXL folder whose U-Net has no text_time embedding")
    time_dim = int(unet_cfg.get("addition_time_embed_dim", sk.FOURIER_DIM))
    numbers = sk.numbers_for(family)
    folder.family = family
    folder.metadata = {"family": family,
                       "vector_layout": sk.layout_spec(numbers, adm - len(numbers) * time_dim, time_dim)}
    if not text_encoder or not (path / "text_encoder_2").is_dir():
        return
    encoders: dict[str, Any] = {}
    for name, sub, prefix in (("l", "text_encoder", sk.L_PREFIX), ("g", "text_encoder_2", sk.HF_G_PREFIX)):
        text_dir = path / sub
        if not text_dir.is_dir():
            continue
        weights = read_component_weights(text_dir, "model")
        folder.state.tensors.update({prefix + k: v for k, v in weights.items()})
        encoders[name] = {"prefix": prefix, "naming": "hf", "config": _sdxl_text_kwargs(text_dir)}
    folder.text = {"kind": family, "encoders": encoders}
