"""Architecture detection (`detect`): from key names and shapes, as the original configs would have
built them: U-Net in/out channels, widths per level, attention levels, transformer depth, context
width, conv vs linear projections; autoencoder widths and levels; the text encoder family.

Facts that weights cannot tell are decided so, in this order: the `prediction_type` argument, then
the file's `ldmgraph` metadata (our bundled models carry their whole configuration there, see
docs/INTERFACES.md), then `modelspec.prediction_type` metadata, then a `v_pred` key, else "eps".
SD 2.x 768-v files carry none of these: pass `prediction_type="v"` for them. Attention heads do not
change any weight shape: SD2-like models (context 1024 or linear projections) get 64 channels per
head, others 8 heads, as the released configs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmgraph.models import configs, families
from ldmgraph.models import sdxl_keys as sk
from ldmgraph.models.diffusers_folder import DiffusersFolder
from ldmgraph.models.files import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CorruptCheckpointError,
    ModelError,
    StateDict,
    UnknownArchitectureError,
)
from ldmgraph.models.vq import detect_vq_config

# --- detection --------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What a checkpoint is: its architecture configs and the facts samplers and nodes need."""

    path: str
    layout: str  # "single-file" | "diffusers" | "bundled"
    # "sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "ldm-txt2img", "ldm-concat", "ldm", "bundled-<kind>", "diffusers-..."
    architecture: str
    unet: dict[str, Any] | None = None
    vae: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None  # {"kind": ..., "config": {...}, ...}
    prediction_type: str = "eps"
    # "argument" | "ldmgraph metadata" | "modelspec metadata" | "v_pred key" | "scheduler config" | "default"
    prediction_type_source: str = "default"
    concat_kind: str | None = None  # None | "lowres-image" | "inpaint-mask-latent"
    scale_factor: float = configs.SD_SCALE_FACTOR
    schedule: dict[str, Any] = field(default_factory=configs.sd_schedule)
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)


def _block_ids(keys: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _has(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _per_level(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def detect_unet_config(unet: Mapping[str, Tensor], path: str | Path) -> dict[str, Any]:
    """UNetModel kwargs from U-Net weights (keys without the `model.diffusion_model.` prefix)."""
    keys = set(unet)
    try:
        conv_in = unet["input_blocks.0.0.weight"]
        out_conv = unet["out.2.weight"]
    except KeyError as exc:
        raise UnknownArchitectureError(
            path, f"U-Net weights lack {exc.args[0]!r}: not a latent-diffusion U-Net"
        ) from exc
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    mults: list[int] = []
    res_blocks: list[int] = []
    depths: list[int] = []
    attn_levels: list[int] = []
    count, level_depth = 0, 0
    width = model_channels
    for i in _block_ids(keys, "input_blocks.")[1:]:
        p = f"input_blocks.{i}."
        if f"{p}0.op.weight" in keys or f"{p}0.op.bias" in keys:  # downsample closes a level
            mults.append(width // model_channels)
            res_blocks.append(count)
            depths.append(level_depth)
            count, level_depth = 0, 0
            continue
        width = int(unet[f"{p}0.out_layers.3.weight"].shape[0])
        count += 1
        if _has(keys, f"{p}1."):
            if len(mults) not in attn_levels:
                attn_levels.append(len(mults))
            level_depth = max(level_depth, len(_block_ids(keys, f"{p}1.transformer_blocks.")))
    mults.append(width // model_channels)
    res_blocks.append(count)
    depths.append(level_depth)

    ctx_keys = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    context_dim = int(unet[ctx_keys[0]].shape[1]) if ctx_keys else None
    proj = [k for k in keys if k.endswith("proj_in.weight")]
    linear = bool(proj) and unet[proj[0]].dim() == 2
    sd2_like = linear or context_dim == 1024
    attn_depths = [d for lvl, d in enumerate(depths) if lvl in attn_levels] or [1]
    config: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": int(out_conv.shape[0]),
        "model_channels": model_channels,
        "attention_resolutions": [2**lvl for lvl in attn_levels],
        "num_res_blocks": _per_level(res_blocks),
        "channel_mult": mults,
        "num_heads": -1 if sd2_like else 8,
        "num_head_channels": 64 if sd2_like else -1,
        "transformer_depth": (attn_depths[0] if len(set(attn_depths)) == 1 else depths) if context_dim else 1,
        "context_dim": context_dim,
        "use_linear_in_transformer": linear,
    }
    if "label_emb.weight" in keys:
        config["num_classes"] = int(unet["label_emb.weight"].shape[0])
    elif "label_emb.0.0.weight" in keys:
        config["num_classes"] = "sequential"
        config["adm_in_channels"] = int(unet["label_emb.0.0.weight"].shape[1])
    if model_channels % 32:
        config["norm_groups"] = _largest_group_count(model_channels)
    return config


def _largest_group_count(channels: int) -> int:
    return max(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def detect_vae_config(vae: Mapping[str, Tensor], path: str | Path) -> dict[str, Any]:
    """AutoencoderKL kwargs (`ddconfig`, `embed_dim`) from autoencoder weights (prefix removed)."""
    keys = set(vae)
    vq = "quantize.embedding.weight" in keys  # the paper's VQ autoencoders (codebook lookup at decode)
    if not vq and (_has(keys, "quantize.") or _has(keys, "quantize_")):
        raise UnknownArchitectureError(
            path, "the autoencoder is a VQ model of an unknown layout (quantize.* keys without "
            "quantize.embedding.weight)"
        )
    try:
        conv_in = vae["encoder.conv_in.weight"]
        conv_out = vae["encoder.conv_out.weight"]
        quant = vae["quant_conv.weight"]
        dec_in = vae["decoder.conv_in.weight"]
        dec_out = vae["decoder.conv_out.weight"]
    except KeyError as exc:
        raise UnknownArchitectureError(
            path, f"autoencoder weights lack {exc.args[0]!r}: not a KL autoencoder"
        ) from exc
    ch = int(conv_in.shape[0])
    levels = _block_ids(keys, "encoder.down.")
    mults, attn_levels = [], []
    for lvl in levels:
        width = int(vae[f"encoder.down.{lvl}.block.0.conv2.weight"].shape[0])
        mults.append(width // ch)
        if _has(keys, f"encoder.down.{lvl}.attn."):
            attn_levels.append(lvl)
    resolution = 256
    z_channels = int(dec_in.shape[1])
    ddconfig: dict[str, Any] = {
        "double_z": int(conv_out.shape[0]) == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": resolution,
        "in_channels": int(conv_in.shape[1]),
        "out_ch": int(dec_out.shape[0]),
        "ch": ch,
        "ch_mult": mults,
        "num_res_blocks": len(_block_ids(keys, "encoder.down.0.block.")),
        "attn_resolutions": [resolution // 2**lvl for lvl in attn_levels],
        "dropout": 0.0,
    }
    if ch % 32:
        ddconfig["norm_groups"] = _largest_group_count(ch)
    config = {"ddconfig": ddconfig, "embed_dim": int(quant.shape[0]) // 2}
    return detect_vq_config(vae, config) if vq else config


def detect_text_encoder(state: StateDict) -> dict[str, Any] | None:
    """The text encoder family and its transformers config kwargs, or None when the file has none."""
    t = state.tensors
    if state.has_prefix("conditioner.embedders."):  # SDXL: ViT-L + bigG (base) or bigG alone (refiner)
        return sdxl_text_config(state, "sdxl-refiner" if state.has_prefix(sk.REFINER_G_PREFIX) else "sdxl-base")
    for level in ("text_model.", ""):  # the second: files re-saved from transformers 5 (no text_model level)
        if CLIP_PREFIX + level + "embeddings.token_embedding.weight" in t:
            sub = state.sub(CLIP_PREFIX + level)
            return {"kind": "clip-l", "config": _clip_kwargs(sub, "encoder.layers.", "quick_gelu")}
    if state.has_prefix(OPENCLIP_PREFIX + "transformer.resblocks."):
        sub = state.sub(OPENCLIP_PREFIX)
        return {"kind": "openclip-h", "config": _openclip_kwargs(sub)}
    if CLIP_PREFIX + "token_emb.weight" in t:
        return {"kind": "ldm-bert", "config": ldm_bert_config(state.sub(CLIP_PREFIX))}
    return None


def ldm_bert_config(weights: dict[str, Tensor]) -> dict[str, Any]:
    """`LDMBertTransformer` kwargs from weights under `cond_stage_model.transformer.` (prefix removed).

    The head width is not in any shape: 64, the x-transformers default the paper's model used.
    """
    token = weights["token_emb.weight"]
    q = weights["attn_layers.layers.0.1.to_q.weight"]
    ff = weights["attn_layers.layers.1.1.net.0.0.weight"]
    n_layers = len({k.split(".")[2] for k in weights if k.startswith("attn_layers.layers.")})
    dim = int(token.shape[1])
    return {
        "dim": dim,
        "depth": n_layers // 2,
        "heads": max(1, int(q.shape[0]) // 64),
        "dim_head": min(64, int(q.shape[0])),
        "ff_mult": int(ff.shape[0]) // dim,
        "vocab_size": int(token.shape[0]),
        "max_seq_len": int(weights["pos_emb.emb.weight"].shape[0]),
        "lm_head": "to_logits.weight" in weights,
    }


def _clip_kwargs(sub: Mapping[str, Tensor], layer_prefix: str, act: str) -> dict[str, Any]:
    tok = sub["embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    fc1 = next(v for k, v in sub.items() if k.endswith("mlp.fc1.weight"))
    return {
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": len(_block_ids(sub, layer_prefix)),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": int(sub["embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": act,
    }


def _openclip_kwargs(sub: Mapping[str, Tensor]) -> dict[str, Any]:
    tok = sub["token_embedding.weight"]
    hidden = int(tok.shape[1])
    return {
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(sub["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": len(_block_ids(sub, "transformer.resblocks.")),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": int(sub["positional_embedding"].shape[0]),
        "hidden_act": "gelu",
    }


def detect_concat_kind(unet: dict[str, Any], path: str | Path) -> str | None:
    extra = unet["in_channels"] - unet["out_channels"]
    if extra == 0:
        return None
    if extra == unet["out_channels"] + 1:
        return (
            "inpaint-mask-latent"  # mask (1) + masked-image latent (C): SD inpainting (9), LDM inpainting (7)
        )
    if extra == 3:
        return "lowres-image"  # LDM super-resolution: the low-resolution RGB image
    raise UnknownArchitectureError(
        path,
        f"U-Net takes {unet['in_channels']} input channels for {unet['out_channels']} latent channels: "
        "unknown concat conditioning",
    )


def _prediction_type(state: StateDict, meta: dict[str, Any], override: str | None) -> tuple[str, str]:
    if override is not None:
        return check_prediction_type(override, state.path), "argument"
    if meta.get("prediction_type"):
        return check_prediction_type(str(meta["prediction_type"]), state.path), "ldmgraph metadata"
    spec = state.metadata.get("modelspec.prediction_type")
    if spec:
        return check_prediction_type(spec, state.path), "modelspec metadata"
    if "v_pred" in state.tensors:
        return "v", "v_pred key"
    return "eps", "default"


def check_prediction_type(value: str, path: str | Path) -> str:
    norm = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}.get(
        value.lower()
    )
    if norm is None:
        raise ModelError(path, f"prediction_type {value!r} is not supported: use 'eps' or 'v'")
    return norm


def bundled_metadata(state: StateDict) -> dict[str, Any] | None:
    """The parsed `ldmgraph` metadata JSON of a bundled model, or None."""
    raw = state.metadata.get("ldmgraph")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(
            state.path, f"its 'ldmgraph' metadata is not valid JSON ({exc})"
        ) from exc
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("ldmgraph-bundled/"):
        raise CorruptCheckpointError(state.path, "its 'ldmgraph' metadata lacks format 'ldmgraph-bundled/1'")
    return meta


def detect(state: StateDict, *, prediction_type: str | None = None) -> CheckpointInfo:
    """Detect the architecture of a single-file checkpoint (original key layout)."""
    path = state.path
    meta = bundled_metadata(state)
    dtype = dominant_dtype(state.tensors.values())
    if meta is not None:
        pred, source = _prediction_type(state, meta, prediction_type)
        te = meta.get("text_encoder")
        text = {"kind": te} if te else None
        if text is not None and meta.get("clause_tokens"):  # a MiniLM model that reads clause tokens
            text.update(clause_tokens=int(meta["clause_tokens"]), clause_only=bool(meta.get("clause_only")))
        return CheckpointInfo(
            path=str(path),
            layout="bundled",
            architecture=f"bundled-{meta.get('kind', 'txt2img')}",
            unet=dict(meta["unet"]),
            vae=dict(meta["vae"]) if meta.get("vae") else None,
            text_encoder=text,
            prediction_type=pred,
            prediction_type_source=source,
            concat_kind=meta.get("concat"),
            scale_factor=float(meta.get("scale_factor", configs.SD_SCALE_FACTOR)),
            schedule=dict(meta.get("schedule") or configs.sd_schedule()),
            dtype=dtype,
            metadata=meta,
        )
    # the family table (ldmgraph.models.families): refused families (SD3, Flux, ...) by name, the others by their reader
    family = families.refuse(path, {k: tuple(v.shape) for k, v in state.tensors.items()})
    return family.read(state, prediction_type=prediction_type)  # type: ignore[no-any-return]


def detect_ldm(state: StateDict, *, prediction_type: str | None = None, dtype: str | None = None) -> CheckpointInfo:
    """SD 1.x/2.x (and inpainting) and the latent-diffusion paper's models, from weight names and shapes."""
    path = state.path
    dtype = dtype or dominant_dtype(state.tensors.values())
    if not state.has_prefix(UNET_PREFIX):
        hint = ""
        if state.has_prefix("encoder.") or state.has_prefix("decoder."):
            hint = " (it looks like a standalone VAE: load it with a VAE loader)"
        raise UnknownArchitectureError(
            path, f"no U-Net weights under '{UNET_PREFIX}'{hint}: not a latent-diffusion checkpoint"
        )
    unet = detect_unet_config(state.sub(UNET_PREFIX), path)
    vae = detect_vae_config(state.sub(VAE_PREFIX), path) if state.has_prefix(VAE_PREFIX) else None
    text = detect_text_encoder(state)
    pred, source = _prediction_type(state, {}, prediction_type)
    concat = detect_concat_kind(unet, path)
    architecture = architecture_name(unet, text, concat)
    scale = state.tensors.get("scale_factor")
    return CheckpointInfo(
        path=str(path),
        layout="single-file",
        architecture=architecture,
        unet=unet,
        vae=vae,
        text_encoder=text,
        prediction_type=pred,
        prediction_type_source=source,
        concat_kind=concat,
        scale_factor=float(scale) if scale is not None and scale.numel() == 1 else default_scale_factor(vae),
        schedule=schedule_from_buffers(state) or configs.sd_schedule(),
        dtype=dtype,
    )


def default_scale_factor(vae: dict[str, Any] | None) -> float:
    """The latent scale when the file stores none: 1 for the paper's VQ models (their configs leave
    `scale_factor` at its default), SD's 0.18215 for KL autoencoders."""
    return 1.0 if vae is not None and "n_embed" in vae else configs.SD_SCALE_FACTOR


def schedule_from_buffers(state: StateDict) -> dict[str, Any] | None:
    """The training schedule from the `betas` buffer that original LatentDiffusion checkpoints keep.

    The original "linear" schedule is betas = linspace(sqrt(start), sqrt(end), T)^2, so start and
    end are the first and last betas; a file whose betas are not of that form gets None.
    """
    betas = state.tensors.get("betas")
    if betas is None or betas.dim() != 1 or betas.numel() < 2:
        return None
    b = betas.double()
    start, end, steps = float(b[0]), float(b[-1]), int(b.numel())
    linear = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    if not torch.allclose(linear, b, rtol=1e-5, atol=1e-9):
        return None
    return {"beta_schedule": "linear", "linear_start": start, "linear_end": end, "timesteps": steps}


def architecture_name(unet: dict[str, Any], text: dict[str, Any] | None, concat: str | None) -> str:
    kind = text["kind"] if text else None
    if kind == "clip-l" and unet["context_dim"] == 768:
        base = "sd1"
    elif kind == "openclip-h" and unet["context_dim"] == 1024:
        base = "sd2"
    elif kind == "ldm-bert":
        base = "ldm-txt2img"
    else:
        base = "ldm"
    if concat == "inpaint-mask-latent":
        return f"{base}-inpaint" if base in ("sd1", "sd2") else "ldm-concat"
    if concat is not None:
        return "ldm-concat"
    return base


def dominant_dtype(tensors: Iterable[Tensor]) -> str:
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if not counts:
        return "float32"
    return str(max(counts, key=lambda d: counts[d])).removeprefix("torch.")


# --- SDXL single files: the same readers, SDXL's key tables (`sdxl_keys`) -------------------------


@dataclass
class _SDXLEncoder:
    """Where one of SDXL's text encoders lies in a normalised state dict, and its names."""

    prefix: str
    naming: str  # "openclip" (fused in_proj, ln_final, text_projection [D, P]) | "hf" (transformers' names)
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "naming": self.naming, "config": dict(self.config)}


def _sdxl_clip_config(state: StateDict, enc: _SDXLEncoder) -> dict[str, Any]:
    sub = state.sub(enc.prefix)
    if enc.naming == "openclip":
        config = _openclip_kwargs(sub)
        projection = sub.get("text_projection")
        if projection is not None:
            config["projection_dim"] = int(projection.shape[1])
        return config
    sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
    act = "quick_gelu" if enc.prefix == sk.L_PREFIX else "gelu"
    return _clip_kwargs(sub, "encoder.layers.", act)


def sdxl_text_config(state: StateDict, family: str) -> dict[str, Any] | None:
    """The `text_encoder` entry of an SDXL file's `CheckpointInfo` (None when it holds no text weights)."""
    encoders: dict[str, _SDXLEncoder] = {}
    if family == "sdxl-refiner":
        if state.has_prefix(sk.REFINER_G_PREFIX):
            encoders["g"] = _SDXLEncoder(sk.REFINER_G_PREFIX, "openclip")
    else:
        if state.has_prefix(sk.L_PREFIX):
            encoders["l"] = _SDXLEncoder(sk.L_PREFIX, "hf")
        if state.has_prefix(sk.G_PREFIX):
            encoders["g"] = _SDXLEncoder(sk.G_PREFIX, "openclip")
        elif state.has_prefix(sk.HF_G_PREFIX):
            encoders["g"] = _SDXLEncoder(sk.HF_G_PREFIX, "hf")
    if "g" not in encoders:
        return None
    for enc in encoders.values():
        enc.config = _sdxl_clip_config(state, enc)
    return {"kind": family, "encoders": {name: enc.as_dict() for name, enc in encoders.items()}}


def detect_sdxl(state: StateDict, *, prediction_type: str | None = None) -> CheckpointInfo:
    """The `CheckpointInfo` of an SDXL base or refiner file (or a fine-tune: same keys, other weights)."""
    shapes = {k: tuple(v.shape) for k, v in state.tensors.items()}
    family = "sdxl-refiner" if families.is_sdxl_refiner(shapes) else "sdxl-base"
    unet = detect_unet_config(state.sub(UNET_PREFIX), state.path)
    vae = detect_vae_config(state.sub(VAE_PREFIX), state.path) if state.has_prefix(VAE_PREFIX) else None
    text = sdxl_text_config(state, family)
    pooled = text["encoders"]["g"]["config"].get("projection_dim") if text else None
    layout = sk.layout_from_adm(family, int(unet["adm_in_channels"]), pooled)
    pred, source = _prediction_type(state, {}, prediction_type)
    concat = detect_concat_kind(unet, state.path)
    scale = state.tensors.get("scale_factor")
    return CheckpointInfo(
        path=str(state.path), layout="single-file",
        architecture=family + ("-inpaint" if concat == "inpaint-mask-latent" else ""),
        unet=unet, vae=vae, text_encoder=text, prediction_type=pred, prediction_type_source=source,
        concat_kind=concat,
        scale_factor=float(scale) if scale is not None and scale.numel() == 1 else sk.SDXL_SCALE_FACTOR,
        schedule=configs.sd_schedule(), dtype=dominant_dtype(state.tensors.values()),
        metadata={"family": family, "vector_layout": layout},
    )


# --- diffusers folders: their JSON files state what the weights would tell ---------------------


def detect_diffusers(folder: DiffusersFolder, *, prediction_type: str | None = None) -> CheckpointInfo:
    """The `CheckpointInfo` of a normalised diffusers pipeline folder (its configs, not its shapes)."""
    assert folder.unet is not None
    if prediction_type is not None:
        pred, source = check_prediction_type(prediction_type, folder.path), "argument"
    elif folder.prediction_type is not None:
        cfg_path = folder.path / "scheduler" / "scheduler_config.json"
        pred, source = check_prediction_type(folder.prediction_type, cfg_path), "scheduler config"
    else:
        pred, source = "eps", "default"
    concat = detect_concat_kind(folder.unet, folder.path)
    text = {"kind": folder.text["kind"], "config": {}} if folder.text is not None else None
    if folder.family is not None:  # SDXL: the folder's own text description (two encoders)
        text, name = folder.text, folder.family
    else:
        name = architecture_name(folder.unet, text, concat)
    info = CheckpointInfo(
        path=str(folder.path),
        layout="diffusers",
        architecture=f"diffusers-{name}",
        metadata=dict(folder.metadata),
        unet=folder.unet,
        text_encoder=text,
        prediction_type=pred,
        prediction_type_source=source,
        concat_kind=concat,
        schedule=folder.schedule,
        dtype=dominant_dtype(folder.state.sub(UNET_PREFIX).values()),
    )
    if folder.vae is not None:
        info.vae, info.scale_factor = folder.vae, configs.SD_SCALE_FACTOR if folder.scale_factor is None else folder.scale_factor
    return info


def detect_diffusers_vae(folder: DiffusersFolder) -> CheckpointInfo:
    """The `CheckpointInfo` of a normalised diffusers `vae/` folder."""
    assert folder.vae is not None and folder.vae_path is not None
    return CheckpointInfo(
        path=str(folder.vae_path),
        layout="diffusers",
        architecture="vae",
        vae=folder.vae,
        scale_factor=configs.SD_SCALE_FACTOR if folder.scale_factor is None else folder.scale_factor,
        dtype=dominant_dtype(folder.state.sub(VAE_PREFIX).values()),
        metadata=dict(folder.metadata),
    )
