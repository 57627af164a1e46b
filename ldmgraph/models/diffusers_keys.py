"""The one key-mapping table between the diffusers folder layout and the original LDM layout.

Our modules use the original latent-diffusion key names (`input_blocks.1.0.in_layers.0.weight`,
`encoder.down.0.block.0.norm1.weight`); diffusers renames them (`down_blocks.0.resnets.0.norm1.weight`,
`encoder.down_blocks.0.resnets.0.norm1.weight`) and stores attention 1x1 convolutions as linear
layers. This module converts state dicts both ways (U-Net: `unet_from_diffusers`,
`unet_to_diffusers`; autoencoder: `vae_from_diffusers`, `vae_to_diffusers`) and converts diffusers
`config.json` contents to our constructor kwargs and back. Tensors are renamed, not copied (only
the fused qkv of the legacy attention block is split or concatenated, and 1x1 conv <-> linear
weights are reshaped as views).

The U-Net mapping is built structurally from the architecture (which level has attention, how
many residual blocks per level), not from string patterns, so any channel_mult length and any
attention layout map correctly. The facts (key names, which diffusers block types correspond to
which original blocks) were checked against diffusers 0.42 `UNet2DConditionModel`, `UNet2DModel`,
`AutoencoderKL` and its single-file conversion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

# original ResBlock child -> diffusers ResnetBlock2D child
_UNET_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
# original autoencoder ResnetBlock child -> diffusers ResnetBlock2D child
_VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
# original autoencoder AttnBlock child -> diffusers Attention child (1x1 convs become linears)
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


class KeyMappingError(ValueError):
    """A state dict does not match the architecture it is converted for."""


# ----------------------------------------------------------------------------------------------
# U-Net configs


def _levels(config: Mapping[str, Any]) -> int:
    return len(config.get("channel_mult", (1, 2, 4, 8)))


def _per_level(value: Any, levels: int) -> list[int]:
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


def _attention_levels(config: Mapping[str, Any]) -> list[bool]:
    resolutions = set(config["attention_resolutions"])
    return [2**level in resolutions for level in range(_levels(config))]


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a diffusers `UNet2DConditionModel` / `UNet2DModel` config.json into `UNetModel` kwargs.

    Raises `KeyMappingError` for diffusers options that have no counterpart in the original
    architecture (e.g. a non-sinusoidal time embedding or an unusual mid block).
    """
    if "_class_name" in cfg:
        conditional = cfg["_class_name"] != "UNet2DModel"
    else:  # a config object from a live model has no class name
        conditional = "cross_attention_dim" in cfg
    blocks = list(cfg["block_out_channels"])
    base = blocks[0]
    if any(c % base for c in blocks):
        raise KeyMappingError(f"block_out_channels {blocks} are not multiples of {base}")
    if not cfg.get("flip_sin_to_cos", True) or cfg.get("freq_shift", 0) != 0:
        raise KeyMappingError("only flip_sin_to_cos=True, freq_shift=0 (the original timestep embedding) is supported")
    if cfg.get("act_fn", "silu") != "silu":
        raise KeyMappingError(f"act_fn={cfg.get('act_fn')!r} is not supported (the original uses SiLU)")
    down_types = list(cfg["down_block_types"])
    attention = ["Attn" in t for t in down_types]
    levels = len(blocks)
    kwargs: dict[str, Any] = {
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": base,
        "channel_mult": [c // base for c in blocks],
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "attention_resolutions": [2**level for level, a in enumerate(attention) if a],
        "norm_groups": cfg.get("norm_num_groups", 32),
        "use_scale_shift_norm": cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
    }
    chans = [c for c, a in zip(blocks, attention, strict=True) if a] + [blocks[-1]]  # mid block: last level
    if conditional:
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise KeyMappingError(f"mid_block_type={cfg.get('mid_block_type')!r} is not supported")
        heads_cfg = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = _per_level(heads_cfg, levels)
        used = [h for h, a in zip(heads, attention, strict=True) if a] + [heads[-1]]
        widths = {c // h for c, h in zip(chans, used, strict=True)}
        if len(set(used)) == 1:
            kwargs["num_heads"] = used[0]
        elif len(widths) == 1:
            kwargs["num_head_channels"] = widths.pop()
        else:
            raise KeyMappingError(f"heads {heads} per level are neither constant nor a constant head width")
        kwargs["context_dim"] = cfg.get("cross_attention_dim", 1280)
        kwargs["use_linear_in_transformer"] = bool(cfg.get("use_linear_projection", False))
        kwargs["transformer_depth"] = cfg.get("transformer_layers_per_block", 1)
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + Fourier size features
            if cfg.get("class_embed_type") is not None:
                raise KeyMappingError("addition_embed_type='text_time' together with a class embedding is not supported")
            kwargs["num_classes"] = "sequential"
            kwargs["adm_in_channels"] = cfg["projection_class_embeddings_input_dim"]
        elif cfg.get("class_embed_type") == "projection":
            kwargs["num_classes"] = "sequential"
            kwargs["adm_in_channels"] = cfg["projection_class_embeddings_input_dim"]
        elif cfg.get("class_embed_type") is None and cfg.get("num_class_embeds") is not None:
            kwargs["num_classes"] = cfg["num_class_embeds"]
        elif cfg.get("class_embed_type") is not None or cfg.get("addition_embed_type") is not None:
            raise KeyMappingError("only num_class_embeds or class_embed_type='projection' class conditioning is supported")
    else:
        if not cfg.get("add_attention", True):
            raise KeyMappingError("UNet2DModel with add_attention=False has no original counterpart (mid attention)")
        head_dim = cfg.get("attention_head_dim", 8)
        if head_dim is None:
            kwargs["num_heads"] = 1
        else:
            kwargs["num_head_channels"] = head_dim
        if cfg.get("num_class_embeds") is not None:
            kwargs["num_classes"] = cfg["num_class_embeds"]
        kwargs["context_dim"] = None
    return kwargs


def unet_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Turn `UNetModel` kwargs into a diffusers config: `UNet2DConditionModel` when the model has
    cross-attention, `UNet2DModel` (self-attention blocks) when `context_dim` is None."""
    if config.get("context_refiner"):
        raise ValueError("this U-Net has a context refiner (a transformer over the text context), which diffusers' "
                         "UNet2DConditionModel has no place for; keep it as a single file")
    levels = _levels(config)
    base = config["model_channels"]
    blocks = [base * m for m in config.get("channel_mult", (1, 2, 4, 8))]
    attention = _attention_levels(config)
    conditional = config.get("context_dim") is not None
    num_heads = config.get("num_heads", -1)
    head_channels = config.get("num_head_channels", -1)
    cfg: dict[str, Any] = {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "block_out_channels": blocks,
        "layers_per_block": config["num_res_blocks"],
        "norm_num_groups": config.get("norm_groups", 32),
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "resnet_time_scale_shift": "scale_shift" if config.get("use_scale_shift_norm") else "default",
    }
    if conditional:
        cfg["_class_name"] = "UNet2DConditionModel"
        cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
        cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        cfg["attention_head_dim"] = num_heads if head_channels == -1 else [max(c // head_channels, 1) for c in blocks]
        cfg["cross_attention_dim"] = config["context_dim"]
        cfg["use_linear_projection"] = bool(config.get("use_linear_in_transformer", False))
        cfg["transformer_layers_per_block"] = config.get("transformer_depth", 1)
        num_classes = config.get("num_classes")
        if num_classes == "sequential":
            cfg["class_embed_type"] = "projection"
            cfg["projection_class_embeddings_input_dim"] = config["adm_in_channels"]
        elif isinstance(num_classes, int):
            cfg["num_class_embeds"] = num_classes
        elif num_classes is not None:
            raise KeyMappingError(f"num_classes={num_classes!r} has no diffusers counterpart")
    else:
        cfg["_class_name"] = "UNet2DModel"
        cfg["down_block_types"] = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
        cfg["up_block_types"] = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        if head_channels != -1:
            cfg["attention_head_dim"] = head_channels
        elif num_heads == 1:
            cfg["attention_head_dim"] = None
        else:
            used = {c // num_heads for c, a in zip(blocks + [blocks[-1]], attention + [True], strict=True) if a}
            if len(used) != 1:
                raise KeyMappingError("UNet2DModel needs one head width; set num_head_channels")
            cfg["attention_head_dim"] = used.pop()
        if isinstance(config.get("num_classes"), int):
            cfg["num_class_embeds"] = config["num_classes"]
    if levels != len(cfg["down_block_types"]):
        raise KeyMappingError("channel_mult and attention levels disagree")
    return cfg


# ----------------------------------------------------------------------------------------------
# U-Net state dicts


def _unet_module_pairs(config: Mapping[str, Any], to_diffusers: bool = True) -> list[tuple[str, str, str]]:
    """(original prefix, diffusers prefix, kind) for every module of the U-Net, in order.

    kind: "plain" (same child names), "resnet", "transformer" (same child names) or "attention"
    (legacy fused-qkv block <-> diffusers `Attention`).
    """
    levels = _levels(config)
    nrb = _per_level(config["num_res_blocks"], levels)
    attention = _attention_levels(config)
    attn_kind = "transformer" if config.get("context_dim") is not None else "attention"
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1.", "plain"),
        ("time_embed.2.", "time_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "conv_in.", "plain"),
        ("out.0.", "conv_norm_out.", "plain"),
        ("out.2.", "conv_out.", "plain"),
        ("middle_block.0.", "mid_block.resnets.0.", "resnet"),
        ("middle_block.1.", "mid_block.attentions.0.", attn_kind),
        ("middle_block.2.", "mid_block.resnets.1.", "resnet"),
    ]
    num_classes = config.get("num_classes")
    if num_classes == "sequential":
        pairs += [("label_emb.0.0.", "class_embedding.linear_1.", "plain"),
                  ("label_emb.0.2.", "class_embedding.linear_2.", "plain")]
        if not to_diffusers:  # SDXL's diffusers U-Nets call the same MLP `add_embedding`
            pairs += [("label_emb.0.0.", "add_embedding.linear_1.", "plain"),
                      ("label_emb.0.2.", "add_embedding.linear_2.", "plain")]
    elif num_classes is not None:
        pairs.append(("label_emb.", "class_embedding.", "plain"))
    n = 1
    for level in range(levels):
        for j in range(nrb[level]):
            pairs.append((f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", "resnet"))
            if attention[level]:
                pairs.append((f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{j}.", attn_kind))
            n += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{n}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", "plain"))
            n += 1
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb[level] + 1):
            pairs.append((f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", "resnet"))
            if attention[level]:
                pairs.append((f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{j}.", attn_kind))
            if level and j == nrb[level]:
                index = 2 if attention[level] else 1
                pairs.append((f"output_blocks.{n}.{index}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", "plain"))
            n += 1
    return pairs


def _rename(suffix: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if suffix.startswith(old):
            return new + suffix[len(old):]
    return suffix


def _match(key: str, prefixes: list[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    for pair in prefixes:
        if key.startswith(pair[0]):
            return pair
    return None


def _heads_of(config: Mapping[str, Any], channels: int) -> int:
    head_channels = config.get("num_head_channels", -1)
    return config["num_heads"] if head_channels == -1 else channels // head_channels


def _split_qkv(qkv: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """Fused qkv [3C, C(, 1)] -> q, k, v [C, C(, 1)] (legacy order: rows grouped per head)."""
    c = qkv.shape[0] // 3
    rest = qkv.shape[1:]
    if new_order:
        parts = qkv.reshape(3, c, *rest)
        return tuple(parts[i] for i in range(3))
    parts = qkv.reshape(heads, 3, c // heads, *rest)
    return tuple(parts[:, i].reshape(c, *rest) for i in range(3))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """Inverse of `_split_qkv`."""
    if new_order:
        return torch.cat([q, k, v], dim=0)
    c = q.shape[0]
    rest = q.shape[1:]
    parts = torch.stack([t.reshape(heads, c // heads, *rest) for t in (q, k, v)], dim=1)
    return parts.reshape(3 * c, *rest)


def _attention_channels(sd: Mapping[str, torch.Tensor], prefix: str, norm_name: str) -> int:
    return sd[prefix + norm_name + "weight"].shape[0]


def unet_from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Rename a diffusers U-Net state dict to the original layout of `UNetModel(**config)`.

    Unknown keys raise `KeyMappingError` naming them, so a wrong config never loads silently.
    """
    pairs = sorted(((d, o, k) for o, d, k in _unet_module_pairs(config, to_diffusers=False)), key=lambda p: -len(p[0]))
    new_order = bool(config.get("use_new_attention_order", False))
    out: StateDict = {}
    unknown = []
    for key, tensor in sd.items():
        pair = _match(key, pairs)
        if pair is None:
            unknown.append(key)
            continue
        d_prefix, o_prefix, kind = pair
        suffix = key[len(d_prefix):]
        if kind == "resnet":
            out[o_prefix + _rename(suffix, {v: k for k, v in _UNET_RESNET.items()})] = tensor
        elif kind == "attention":
            _attention_from_diffusers(sd, d_prefix, o_prefix, suffix, tensor, config, new_order, out)
        else:
            out[o_prefix + suffix] = tensor
    if unknown:
        raise KeyMappingError(f"diffusers U-Net keys with no place in this architecture: {unknown[:5]} ...")
    return out


def _attention_from_diffusers(
    sd: Mapping[str, torch.Tensor], d_prefix: str, o_prefix: str, suffix: str, tensor: torch.Tensor,
    config: Mapping[str, Any], new_order: bool, out: StateDict,
) -> None:
    """diffusers `Attention` (group_norm, to_q/k/v, to_out.0 linears) -> legacy AttentionBlock."""
    if suffix.startswith("group_norm."):
        out[o_prefix + "norm." + suffix[len("group_norm."):]] = tensor
    elif suffix.startswith("to_out.0."):
        out[o_prefix + "proj_out." + suffix[len("to_out.0."):]] = tensor[..., None] if tensor.dim() == 2 else tensor
    elif suffix.startswith("to_q."):
        param = suffix[len("to_q."):]
        q, k, v = (sd[f"{d_prefix}to_{n}.{param}"] for n in "qkv")
        heads = _heads_of(config, _attention_channels(sd, d_prefix, "group_norm."))
        fused = _join_qkv(q, k, v, heads, new_order)
        out[o_prefix + "qkv." + param] = fused[..., None] if fused.dim() == 2 else fused
    elif not suffix.startswith(("to_k.", "to_v.")):
        raise KeyMappingError(f"unexpected diffusers attention key {d_prefix + suffix}")


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Rename an original-layout U-Net state dict (`UNetModel(**config)`) to diffusers' names."""
    pairs = sorted(_unet_module_pairs(config), key=lambda p: -len(p[0]))
    new_order = bool(config.get("use_new_attention_order", False))
    out: StateDict = {}
    unknown = []
    for key, tensor in sd.items():
        pair = _match(key, pairs)
        if pair is None:
            unknown.append(key)
            continue
        o_prefix, d_prefix, kind = pair
        suffix = key[len(o_prefix):]
        if kind == "resnet":
            out[d_prefix + _rename(suffix, _UNET_RESNET)] = tensor
        elif kind == "attention":
            if suffix.startswith("norm."):
                out[d_prefix + "group_norm." + suffix[5:]] = tensor
            elif suffix.startswith("proj_out."):
                out[d_prefix + "to_out.0." + suffix[9:]] = tensor.squeeze(-1) if tensor.dim() == 3 else tensor
            elif suffix.startswith("qkv."):
                param = suffix[4:]
                heads = _heads_of(config, _attention_channels(sd, o_prefix, "norm."))
                for name, part in zip("qkv", _split_qkv(tensor, heads, new_order), strict=True):
                    out[f"{d_prefix}to_{name}.{param}"] = part.squeeze(-1) if part.dim() == 3 else part
            else:
                raise KeyMappingError(f"unexpected attention key {key}")
        else:
            out[d_prefix + suffix] = tensor
    if unknown:
        raise KeyMappingError(f"U-Net keys with no place in this architecture: {unknown[:5]} ...")
    return out


# ----------------------------------------------------------------------------------------------
# Autoencoder configs and state dicts


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers `AutoencoderKL` config.json -> `{"ddconfig": ..., "embed_dim": ...}`.

    The latent scale factor is diffusers' `scaling_factor` (0.18215 for SD); read it from `cfg`.
    """
    if not cfg.get("use_quant_conv", True) or not cfg.get("use_post_quant_conv", True):
        raise KeyMappingError("AutoencoderKL without quant_conv/post_quant_conv is not supported")
    if not cfg.get("mid_block_add_attention", True):
        raise KeyMappingError("AutoencoderKL without mid-block attention is not supported")
    blocks = list(cfg.get("block_out_channels", [64]))
    base = blocks[0]
    resolution = cfg.get("sample_size", 32)
    down_types = list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * len(blocks)))
    attn_resolutions = [resolution // 2**i for i, t in enumerate(down_types) if "Attn" in t]
    ddconfig = {
        "double_z": True,
        "z_channels": cfg.get("latent_channels", 4),
        "resolution": resolution,
        "in_channels": cfg.get("in_channels", 3),
        "out_ch": cfg.get("out_channels", 3),
        "ch": base,
        "ch_mult": [c // base for c in blocks],
        "num_res_blocks": cfg.get("layers_per_block", 1),
        "attn_resolutions": attn_resolutions,
        "dropout": 0.0,
        "norm_groups": cfg.get("norm_num_groups", 32),
    }
    return {"ddconfig": ddconfig, "embed_dim": cfg.get("latent_channels", 4)}


def vae_config_to_diffusers(config: Mapping[str, Any], scale_factor: float = 0.18215) -> dict[str, Any]:
    """`{"ddconfig": ..., "embed_dim": ...}` -> a diffusers `AutoencoderKL` config."""
    dd = config["ddconfig"]
    if dd["z_channels"] != config["embed_dim"]:
        raise KeyMappingError("diffusers' AutoencoderKL needs z_channels == embed_dim")
    levels = len(dd["ch_mult"])
    attn = [dd["resolution"] // 2**i in dd["attn_resolutions"] for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": config["embed_dim"],
        "norm_num_groups": dd.get("norm_groups", 32),
        "sample_size": dd["resolution"],
        "scaling_factor": scale_factor,
    }


_VAE_LEVEL = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.*)$")
_VAE_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.(.*)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$")
_VAE_TOP = {"norm_out.": "conv_norm_out."}


def _count_levels(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _conv_to_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t


def _linear_to_conv(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.dim() == 2 else t


def vae_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename an original-layout autoencoder state dict (no `first_stage_model.` prefix) to diffusers'."""
    up_levels = _count_levels(sd, r"^decoder\.up\.(\d+)\.")
    out: StateDict = {}
    for key, t in sd.items():
        if m := _VAE_LEVEL.match(key):
            part, _, level, kind, j, rest = m.groups()
            lvl = int(level) if part == "encoder" else up_levels - 1 - int(level)
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            if kind == "block":
                out[f"{part}.{blocks}.{lvl}.resnets.{j}.{_rename(rest, _VAE_RESNET)}"] = t
            else:
                out[f"{part}.{blocks}.{lvl}.attentions.{j}.{_rename(rest, _VAE_ATTN)}"] = _conv_to_linear(t)
        elif m := _VAE_RESAMPLE.match(key):
            part, _, level, kind, rest = m.groups()
            lvl = int(level) if part == "encoder" else up_levels - 1 - int(level)
            blocks, sampler = ("down_blocks", "downsamplers") if part == "encoder" else ("up_blocks", "upsamplers")
            out[f"{part}.{blocks}.{lvl}.{sampler}.0.{rest}"] = t
        elif m := _VAE_MID.match(key):
            part, name, rest = m.groups()
            if name == "attn_1":
                out[f"{part}.mid_block.attentions.0.{_rename(rest, _VAE_ATTN)}"] = _conv_to_linear(t)
            else:
                index = 0 if name == "block_1" else 1
                out[f"{part}.mid_block.resnets.{index}.{_rename(rest, _VAE_RESNET)}"] = t
        elif key.startswith(("encoder.", "decoder.")):
            part, rest = key.split(".", 1)
            out[f"{part}.{_rename(rest, _VAE_TOP)}"] = t
        elif key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = t
        else:
            raise KeyMappingError(f"autoencoder key with no diffusers counterpart: {key}")
    return out


_D_LEVEL = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_D_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.(.*)$")
_D_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def vae_from_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a diffusers `AutoencoderKL` state dict to the original layout of `AutoencoderKL`."""
    up_levels = _count_levels(sd, r"^decoder\.up_blocks\.(\d+)\.")
    resnet = {v: k for k, v in _VAE_RESNET.items()}
    attn = {v: k for k, v in _VAE_ATTN.items()}
    top = {v: k for k, v in _VAE_TOP.items()}
    out: StateDict = {}
    for key, t in sd.items():
        if m := _D_LEVEL.match(key):
            part, _, level, kind, j, rest = m.groups()
            lvl = int(level) if part == "encoder" else up_levels - 1 - int(level)
            blocks = "down" if part == "encoder" else "up"
            if kind == "resnets":
                out[f"{part}.{blocks}.{lvl}.block.{j}.{_rename(rest, resnet)}"] = t
            else:
                out[f"{part}.{blocks}.{lvl}.attn.{j}.{_rename(rest, attn)}"] = _linear_to_conv(t)
        elif m := _D_RESAMPLE.match(key):
            part, _, level, _, rest = m.groups()
            lvl = int(level) if part == "encoder" else up_levels - 1 - int(level)
            name = "down.{}.downsample" if part == "encoder" else "up.{}.upsample"
            out[f"{part}.{name.format(lvl)}.{rest}"] = t
        elif m := _D_MID.match(key):
            part, kind, index, rest = m.groups()
            if kind == "attentions":
                out[f"{part}.mid.attn_1.{_rename(rest, attn)}"] = _linear_to_conv(t)
            else:
                out[f"{part}.mid.block_{int(index) + 1}.{_rename(rest, resnet)}"] = t
        elif key.startswith(("encoder.", "decoder.")):
            part, rest = key.split(".", 1)
            out[f"{part}.{_rename(rest, top)}"] = t
        elif key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = t
        else:
            raise KeyMappingError(f"diffusers autoencoder key with no original counterpart: {key}")
    return out
