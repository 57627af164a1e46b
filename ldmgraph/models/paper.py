"""The Latent Diffusion paper's released models (CompVis/latent-diffusion): detection (the detect step).

A release is read in this order: the original YAML config (given, `config.yaml` beside the file,
or stored by `ldmgraph convert`), else the U-Net's key shapes matched against the releases below.
Weights cannot tell attention head counts, so a U-Net of unknown shape with self-attention only
needs its config; the error says so.

Facts per release (from each release's `config.yaml`): U-Net input channels, width, levels,
context width and head settings; the conditioning model; the training schedule (also stored in
the checkpoint as the `betas` buffer, which wins when present).

The conditioning modules themselves are in `cond_stage`; they are built by `build`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ldmgraph.models import configs
from ldmgraph.models.detection import (
    CheckpointInfo,
    detect_text_encoder,
    detect_unet_config,
    detect_vae_config,
    dominant_dtype,
    schedule_from_buffers,
)
from ldmgraph.models.files import (
    COND_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelError,
    StateDict,
    UnknownArchitectureError,
)
from ldmgraph.models.ldm_config import LdmConfig, config_for

# --- the releases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """What a release's config says beyond its weights' shapes."""

    name: str
    heads: dict[str, int]  # {"num_heads": n} or {"num_head_channels": c}
    cond: str | None  # conditioning model kind (see `cond_kind`), None for unconditional
    linear_start: float
    linear_end: float
    scale_factor: float = 1.0


# (in_channels, model_channels, channel_mult, context_dim) -> release; facts from the releases' configs
RELEASES: dict[tuple[int, int, tuple[int, ...], int | None], Release] = {
    (4, 320, (1, 2, 4, 4), 1280): Release("txt2img-f8-large", {"num_heads": 8}, "ldm-bert", 0.00085, 0.012, 0.18215),
    (3, 192, (1, 2, 3, 5), 640): Release("text2img256", {"num_head_channels": 32}, "ldm-bert", 0.0015, 0.0195),
    (3, 192, (1, 2, 3, 5), 512): Release("cin256-v2", {"num_heads": 1}, "class-embedder", 0.0015, 0.0195),
    (4, 256, (1, 2, 4), 512): Release("cin256", {"num_head_channels": 32}, "class-embedder", 0.0015, 0.0195),
    (6, 160, (1, 2, 2, 4), None): Release("bsr_sr", {"num_head_channels": 32}, "identity", 0.0015, 0.0155),
    (7, 256, (1, 2, 3, 4), None): Release("inpainting_big", {"num_heads": 8}, "first-stage", 0.0015, 0.0205),
    (3, 224, (1, 2, 3, 4), None): Release("celeba256/ffhq256/lsun_beds256", {"num_head_channels": 32}, None,
                                          0.0015, 0.0195),
    (4, 192, (1, 2, 2, 4, 4), None): Release("lsun_churches256", {"num_heads": 8}, None, 0.0015, 0.0155),
    (6, 128, (1, 4, 8), None): Release("semantic_synthesis", {"num_heads": 8}, "spatial-rescaler", 0.0015, 0.0205),
    (3, 128, (1, 2, 3, 4), 512): Release("layout2img-openimages256", {"num_head_channels": 32}, "ldm-bert",
                                         0.0015, 0.0205),
}

CONCAT_KINDS = {"identity": "lowres-image", "first-stage": "ldm-inpaint", "spatial-rescaler": "segmentation"}
"""How each concat conditioning is built: the low-resolution image in pixels (LDSR), the masked
image's latent then the mask (inpainting_big), the rescaled one-hot map (semantic synthesis)."""


def cond_kind(state: StateDict) -> str | None:
    """The conditioning model from the keys under `cond_stage_model.` (None: none stored)."""
    t = state.tensors
    if COND_PREFIX + "embedding.weight" in t:
        return "class-embedder"
    if COND_PREFIX + "transformer.token_emb.weight" in t:
        return "ldm-bert"
    if COND_PREFIX + "channel_mapper.weight" in t:
        return "spatial-rescaler"
    if COND_PREFIX + "quant_conv.weight" in t:
        return "first-stage"
    return None


def is_paper_file(state: StateDict) -> bool:
    """Whether only this module can read the file: VQ first stage, resblock up/down U-Net, or the
    paper's own conditioning models."""
    return (
        VAE_PREFIX + "quantize.embedding.weight" in state.tensors
        or _updown_blocks(state.sub(UNET_PREFIX)) is not None
        or cond_kind(state) in ("class-embedder", "spatial-rescaler", "first-stage")
    )


# --- U-Net structure from weights (adds resblock_updown and scale-shift norm) -------------------


def _updown_blocks(unet: dict[str, Tensor]) -> tuple[int, int] | None:
    """(levels, res blocks per level) of a U-Net whose resampling is done by ResBlocks, else None.

    An output block that ends a level holds a ResBlock after its first layer (`output_blocks.i.k.in_layers`
    with k > 0) instead of an `Upsample` conv.
    """
    ends = {int(m.group(1)) for k in unet if (m := re.match(r"output_blocks\.(\d+)\.[12]\.in_layers\.0\.weight$", k))}
    if not ends:
        return None
    outputs = {int(m.group(1)) for k in unet if (m := re.match(r"output_blocks\.(\d+)\.", k))}
    levels = len(ends) + 1
    if len(outputs) % levels:
        raise UnknownArchitectureError("", "U-Net output blocks do not divide into levels")
    return levels, len(outputs) // levels - 1


def detect_paper_unet(unet: dict[str, Tensor], path: str | Path) -> dict[str, Any]:
    """UNetModel kwargs from weights, including `resblock_updown` and `use_scale_shift_norm`."""
    updown = _updown_blocks(unet)
    view = dict(unet)
    if updown is not None:
        levels, per_level = updown
        for level in range(levels - 1):  # the down ResBlock closing each level looks like a Downsample
            i = (level + 1) * (per_level + 1)
            for key in [k for k in view if k.startswith(f"input_blocks.{i}.0.")]:
                del view[key]
            view[f"input_blocks.{i}.0.op.weight"] = unet[f"input_blocks.{i}.0.in_layers.2.weight"]
    config = detect_unet_config(view, path)
    if updown is not None:
        config["resblock_updown"] = True
    emb = unet.get("input_blocks.1.0.emb_layers.1.weight")
    width = unet.get("input_blocks.1.0.out_layers.3.weight")
    if emb is not None and width is not None and emb.shape[0] == 2 * width.shape[0]:
        config["use_scale_shift_norm"] = True
    return config


def _fingerprint(unet: dict[str, Any]) -> tuple[int, int, tuple[int, ...], int | None]:
    return (int(unet["in_channels"]), int(unet["model_channels"]), tuple(unet["channel_mult"]), unet.get("context_dim"))


# --- detection ----------------------------------------------------------------------------------


def detect_paper(
    state: StateDict, *, config: str | Path | None = None, prediction_type: str | None = None
) -> CheckpointInfo | None:
    """A `CheckpointInfo` for one of the paper's releases (or a model of the same families), or None
    when the file is for the general detector (SD, bundled models)."""
    if "ldmgraph" in state.metadata:
        return None
    cfg = config_for(state.path, state.metadata, config)
    if cfg is not None and cfg.unet is not None:
        kind = cfg.cond_stage["kind"] if cfg.cond_stage else ""
        if not kind.startswith("other:"):
            return _info_from_config(state, cfg, prediction_type)
        if config is not None:
            raise ModelError(config, f"config: the conditioning model {kind[6:]!r} is not one of the paper's; "
                             "leave the config out and the loader detects the model from its weights")
    if not state.has_prefix(UNET_PREFIX):
        return None
    unet = detect_paper_unet(state.sub(UNET_PREFIX), state.path)
    release = RELEASES.get(_fingerprint(unet))
    if release is None and not is_paper_file(state):
        return None
    return _info_from_weights(state, unet, release, prediction_type)


def _info_from_weights(
    state: StateDict, unet: dict[str, Any], release: Release | None, prediction_type: str | None
) -> CheckpointInfo:
    kind = cond_kind(state)
    if release is not None:
        unet.update({"num_heads": -1, "num_head_channels": -1, **release.heads})
        if kind is None and release.cond in ("identity", "first-stage"):
            kind = release.cond
    elif unet.get("context_dim") is None and _has_attention(state.sub(UNET_PREFIX)):
        raise UnknownArchitectureError(
            state.path,
            "a U-Net with self-attention of a shape no released model has: its head count is not in the "
            "weights. Pass the original config (the loader's config input, or config.yaml beside the file)",
        )
    if kind is None and unet["in_channels"] == 2 * unet["out_channels"]:
        kind = "identity"  # LDSR: the low-resolution RGB image in pixel space
    if kind is None and unet["in_channels"] == 2 * unet["out_channels"] + 1:
        kind = "first-stage"
    vae = detect_vae_config(state.sub(VAE_PREFIX), state.path) if state.has_prefix(VAE_PREFIX) else None
    scale = state.tensors.get("scale_factor")
    default_scale = release.scale_factor if release is not None else (1.0 if vae and "n_embed" in vae else 0.18215)
    schedule = schedule_from_buffers(state) or (
        {"beta_schedule": "linear", "linear_start": release.linear_start, "linear_end": release.linear_end,
         "timesteps": 1000} if release is not None else configs.sd_schedule()
    )
    return _info(
        state, unet, vae, kind, {}, float(scale) if scale is not None else default_scale, schedule,
        release.name if release is not None else "ldm", prediction_type,
    )


def _info_from_config(state: StateDict, cfg: LdmConfig, prediction_type: str | None) -> CheckpointInfo:
    unet = dict(cfg.unet or {})
    cond = cfg.cond_stage
    kind = cond["kind"] if cond else None
    scale = state.tensors.get("scale_factor")
    scale_factor = float(scale) if scale is not None and scale.numel() == 1 else cfg.scale_factor
    schedule = schedule_from_buffers(state) or dict(cfg.schedule)
    return _info(state, unet, dict(cfg.first_stage), kind, (cond or {}).get("params", {}), scale_factor,
                 schedule, "ldm", prediction_type or cfg.parameterization)


def _has_attention(unet: dict[str, Tensor]) -> bool:
    return any(k.endswith("qkv.weight") for k in unet)


def _info(
    state: StateDict,
    unet: dict[str, Any],
    vae: dict[str, Any] | None,
    kind: str | None,
    cond_params: dict[str, Any],
    scale_factor: float,
    schedule: dict[str, Any],
    release: str,
    prediction_type: str | None,
) -> CheckpointInfo:
    text = None
    if kind == "ldm-bert":
        text = detect_text_encoder(state)
        if text is None:
            raise ModelError(state.path, f"the config names a BERT text model but the file has no '{COND_PREFIX}"
                             "transformer.' weights")
    pred = {"eps": "eps", "v": "v", "epsilon": "eps"}.get(prediction_type or "eps")
    if pred is None:
        raise ModelError(state.path, f"prediction type {prediction_type!r} is not supported: use 'eps' or 'v'")
    return CheckpointInfo(
        path=str(state.path),
        layout="single-file",
        architecture=f"ldm-paper:{release}",
        unet=unet,
        vae=vae,
        text_encoder=text,
        prediction_type=pred,
        prediction_type_source="argument" if prediction_type else "default",
        concat_kind=CONCAT_KINDS.get(kind or ""),
        scale_factor=scale_factor,
        schedule=schedule,
        dtype=dominant_dtype(state.tensors.values()),
        metadata={"cond_stage": kind, "cond_params": dict(cond_params), "release": release},
    )
