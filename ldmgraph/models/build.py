"""Modules from a detected architecture (the build step of loading): read -> normalise -> detect ->
build -> wrap.

Every module is constructed on the meta device and takes the file's memory-mapped tensors
(`weights.assign_weights`): no random init, no second copy. Inputs are the original-layout
`StateDict` (a diffusers folder already renamed by `diffusers_folder`) and the detect step's
`CheckpointInfo`; outputs are bare torch modules, which `handles` wraps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models import sdxl
from ldmgraph.models.cond_stage import ClassEmbedder, SpatialRescaler
from ldmgraph.models.detection import CheckpointInfo
from ldmgraph.models.diffusers_folder import TEXT_PROJECTION
from ldmgraph.models.files import (
    CLIP_PREFIX,
    COND_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelError,
    StateDict,
    UnknownArchitectureError,
)
from ldmgraph.models.ldm_config import LdmConfig
from ldmgraph.models.text_encoders import (
    ClipTextEncoder,
    LDMBertTextEncoder,
    LDMBertTransformer,
    clip_text_encoder_from_weights,
    ldm_bert_from_weights,
)
from ldmgraph.models.unet import UNetModel
from ldmgraph.models.vq import autoencoder_class
from ldmgraph.models.weights import assign_weights, build_on_meta

__all__ = [
    "assign_weights", "bert_kwargs", "build_cond_stage", "build_first_stage", "build_on_meta", "build_text_encoder",
    "build_unet", "modules_from_config",
]


def _build(factory: Any, config: dict[str, Any], path: str | Path, component: str) -> nn.Module:
    try:
        return build_on_meta(factory, **config)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UnknownArchitectureError(
            path, f"{component}: cannot build the detected config {config}: {exc}"
        ) from exc


def build_unet(weights: dict[str, Tensor], info: CheckpointInfo, dtype: torch.dtype | None) -> nn.Module:
    """The U-Net of `info.unet` with `weights` (keys without `model.diffusion_model.`); fp16/bf16
    U-Nets keep their time embedding in float32."""
    assert info.unet is not None
    module: Any = _build(UNetModel, info.unet, info.path, "U-Net")
    assign_weights(module, weights, path=info.path, component="U-Net", dtype=dtype)
    if dtype is not None and dtype != torch.float32:
        module.keep_fp32()
    sdxl.attach_layout(module, info.metadata)  # SDXL: how its `adm` vector is laid out
    return module  # type: ignore[no-any-return]


def build_first_stage(weights: dict[str, Tensor], info: CheckpointInfo, dtype: torch.dtype | None) -> nn.Module:
    """The KL or VQ autoencoder of `info.vae` with `weights` (keys without `first_stage_model.`)."""
    assert info.vae is not None
    module = _build(autoencoder_class(info.vae), info.vae, info.path, "autoencoder")
    dtype = sdxl.vae_dtype(info, weights, dtype)
    return assign_weights(module, weights, path=info.path, component="autoencoder", dtype=dtype, ignore=[r"^loss\."])


def build_text_encoder(state: StateDict, text: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """The text encoder that `text` (`CheckpointInfo.text_encoder`, or a diffusers folder's `text`)
    names, from the file's `cond_stage_model.*` tensors (the bundled models' MiniLM is not in the
    file: the loader builds it, see `text_encoders.load_minilm`)."""
    kind = text["kind"]
    if kind in ("sdxl-base", "sdxl-refiner"):  # two encoders (base) or bigG alone (refiner)
        return sdxl.build_text_encoder(state, text, dtype)
    if "pad_id" in text:  # a diffusers text_encoder/ folder: transformers' CLIP layout whatever the family
        return _transformers_clip(state, text, dtype)
    if kind == "clip-l":
        weights = state.sub(CLIP_PREFIX)
    elif kind == "openclip-h":
        weights = state.sub(OPENCLIP_PREFIX)
    elif kind == "ldm-bert":
        encoder: LDMBertTextEncoder = ldm_bert_from_weights(
            state.sub(CLIP_PREFIX), path=state.path, dtype=dtype, config=text.get("config")
        )
        return encoder
    else:
        raise UnknownArchitectureError(
            state.path, f"text encoder {kind!r} is unknown: use 'minilm-l6-v2' or none"
        )
    return clip_text_encoder_from_weights(
        weights, kind=kind, config_kwargs=text.get("config") or {}, path=state.path, dtype=dtype
    )


def _transformers_clip(state: StateDict, text: dict[str, Any], dtype: torch.dtype | None) -> ClipTextEncoder:
    encoder = clip_text_encoder_from_weights(
        state.sub(CLIP_PREFIX),
        kind="clip-l",
        config_kwargs=text["config"],
        path=text["path"],
        dtype=dtype,
        pad_id=text["pad_id"],
        default_clip_skip=1,
    )
    encoder.kind = text["kind"]
    projection = state.tensors.get(TEXT_PROJECTION)
    if projection is not None:
        encoder.text_projection = nn.Parameter(projection.to(dtype or projection.dtype), requires_grad=False)
    return encoder


# --- the paper's conditioning models ------------------------------------------------------------


def build_cond_stage(state: StateDict, info: CheckpointInfo, dtype: torch.dtype | None) -> nn.Module | None:
    """The class embedder or spatial rescaler of a paper release with its weights, else None."""
    kind = info.metadata.get("cond_stage")
    weights = state.sub(COND_PREFIX)
    params = dict(info.metadata.get("cond_params") or {})
    if kind == "class-embedder":
        table = weights["embedding.weight"]
        params.update(n_classes=int(table.shape[0]), embed_dim=int(table.shape[1]))
        module: nn.Module = ClassEmbedder(**params)
    elif kind == "spatial-rescaler":
        mapper = weights["channel_mapper.weight"]
        params.setdefault("n_stages", 2)  # the released semantic-synthesis config
        params.update(in_channels=int(mapper.shape[1]), out_channels=int(mapper.shape[0]),
                      bias="channel_mapper.bias" in weights)
        module = SpatialRescaler(**params)
    else:
        return None
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(state.path, f"conditioning model ({kind}): weights do not fit: {exc}") from exc
    return module.eval().requires_grad_(False)




def bert_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """`LDMBertTransformer` kwargs from the original BERTEmbedder params (x-transformers' Encoder
    defaults: 8 heads of 64 channels, feed-forward 4x)."""
    return {
        "dim": int(params["n_embed"]),
        "depth": int(params["n_layer"]),
        "heads": 8,
        "dim_head": 64,
        "ff_mult": 4,
        "vocab_size": int(params.get("vocab_size", 30522)),
        "max_seq_len": int(params.get("max_seq_len", 77)),
    }


def modules_from_config(cfg: LdmConfig) -> dict[str, nn.Module]:
    """The modules of a release by checkpoint prefix (`model.diffusion_model.`, `first_stage_model.`,
    `cond_stage_model.`), built in the current default device (use `torch.device("meta")` to check shapes)."""
    first = autoencoder_class(cfg.first_stage)(**cfg.first_stage)
    out: dict[str, nn.Module] = {VAE_PREFIX: first}
    if cfg.unet is not None:
        out[UNET_PREFIX] = UNetModel(**cfg.unet)
    kind = cfg.cond_stage["kind"] if cfg.cond_stage else None
    params = dict(cfg.cond_stage["params"]) if cfg.cond_stage else {}
    if kind == "ldm-bert":
        holder = nn.Module()
        holder.transformer = LDMBertTransformer(**bert_kwargs(params))
        out[COND_PREFIX] = holder
    elif kind == "class-embedder":
        out[COND_PREFIX] = ClassEmbedder(**params)
    elif kind == "spatial-rescaler":
        out[COND_PREFIX] = SpatialRescaler(**params)
    elif kind == "first-stage":
        out[COND_PREFIX] = first  # the original registers the first stage a second time under this name
    return out
