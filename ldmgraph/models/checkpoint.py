"""Checkpoint files: reading (memory-mapped), architecture detection, loading into modules, errors.

Reading: `.safetensors` files are opened with `safetensors.safe_open`, whose tensors are views of
a memory map of the file, and modules are built on the meta device and take those tensors with
`load_state_dict(assign=True)`: the weights exist once in RAM (as page cache of the file), never as
a second copy, and fp16/bf16 weights keep their dtype unless a dtype is asked for. Pickled files
(`.ckpt`, `.pt`, `.pth`, `.bin`) can run code when unpickled and are refused unless the caller
opts in with `allow_pickle=True`, which then uses `torch.load(weights_only=True)`.

Detection (`detect`): from key names and shapes, as the original configs would have built them:
U-Net in/out channels, widths per level, attention levels, transformer depth, context width,
conv vs linear projections; autoencoder widths and levels; the text encoder family. Facts that
weights cannot tell are decided so, in this order: the `prediction_type` argument, then the file's
`ldmgraph` metadata (our bundled models carry their whole configuration there, see
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
from torch import Tensor, nn

from ldmgraph.graph.errors import LdmGraphError
from ldmgraph.models import configs

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = (
    "cond_stage_model.transformer."  # SD1 CLIP (then text_model.*); the paper's BERT (token_emb, ...)
)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2 OpenCLIP

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


# --- errors -----------------------------------------------------------------------------------


class ModelError(LdmGraphError):
    """A model file cannot be used; `path` names it and the message says how to fix it."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ModelFileNotFoundError(ModelError, FileNotFoundError):
    """The file or folder does not exist."""


class CorruptCheckpointError(ModelError):
    """The file is truncated, damaged or not in the format its name says."""


class PickleRefusedError(ModelError):
    """A pickled checkpoint was given without `allow_pickle=True`."""


class MissingKeysError(ModelError):
    """The detected architecture needs weights the file does not have."""

    def __init__(self, path: str | Path, component: str, keys: list[str]) -> None:
        self.component, self.keys = component, list(keys)
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        super().__init__(
            path,
            f"{component}: {len(keys)} weight(s) missing ({shown}); the file is incomplete or of another "
            "architecture: re-export it, or pass the matching config",
        )


class UnexpectedKeysError(ModelError):
    """The file has weights that the detected architecture does not use."""

    def __init__(self, path: str | Path, component: str, keys: list[str]) -> None:
        self.component, self.keys = component, list(keys)
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        super().__init__(
            path,
            f"{component}: {len(keys)} unexpected weight(s) ({shown}); the detected architecture does "
            "not match the file: report it with the key list",
        )


class UnknownArchitectureError(ModelError):
    """The keys match no architecture that ldmgraph knows."""


def _convert_hint(path: Path) -> str:
    return (
        "pickled checkpoints can run code when loaded and are refused. Convert it once to safetensors:\n"
        '  python -c "import torch, safetensors.torch as st; '
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        "sd = sd.get('state_dict', sd); "
        "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"'{path.stem}.safetensors')\"\n"
        "or pass allow_pickle=True to load it with torch.load(weights_only=True)"
    )


# --- reading ----------------------------------------------------------------------------------


@dataclass
class StateDict:
    """Tensors of a file (memory-mapped where possible) plus its string metadata."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def sub(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under `prefix`, with the prefix removed."""
        n = len(prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)


def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' or 'unknown' from the first bytes (names can lie)."""
    with path.open("rb") as f:
        head = f.read(10)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> StateDict:
    """Read a checkpoint file's tensors without copying them (safetensors) or, opted in, a pickle.

    Raises ModelFileNotFoundError, CorruptCheckpointError or PickleRefusedError, each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(path, "no such file (check the name and the model folders)")
    kind = _sniff(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or kind == "pickle":
        if not allow_pickle:
            raise PickleRefusedError(path, _convert_hint(path))
        return _read_pickle(path)
    if kind != "safetensors":
        raise CorruptCheckpointError(
            path, "not a safetensors file (bad header); the file is damaged or of another format"
        )
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # views of the file's memory map
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            path,
            f"cannot read the safetensors data ({exc}); the file is truncated or damaged: download it again",
        ) from exc
    return StateDict(path, tensors, metadata)


def _read_pickle(path: Path) -> StateDict:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # pre-1.6 (non-zip) pickles cannot be memory-mapped: read them whole
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or code-carrying pickles
        raise CorruptCheckpointError(
            path, f"cannot read it with torch.load(weights_only=True): {exc}"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return StateDict(path, tensors, {})


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
    if _has(keys, "quantize.") or _has(keys, "quantize_"):
        raise UnknownArchitectureError(
            path, "the autoencoder is a VQ model (quantize.* keys); only KL autoencoders are supported"
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
    return {"ddconfig": ddconfig, "embed_dim": int(quant.shape[0]) // 2}


def detect_text_encoder(state: StateDict) -> dict[str, Any] | None:
    """The text encoder family and its transformers config kwargs, or None when the file has none."""
    t = state.tensors
    for level in ("text_model.", ""):  # the second: files re-saved from transformers 5 (no text_model level)
        if CLIP_PREFIX + level + "embeddings.token_embedding.weight" in t:
            sub = state.sub(CLIP_PREFIX + level)
            return {"kind": "clip-l", "config": _clip_kwargs(sub, "encoder.layers.", "quick_gelu")}
    if state.has_prefix(OPENCLIP_PREFIX + "transformer.resblocks."):
        sub = state.sub(OPENCLIP_PREFIX)
        return {"kind": "openclip-h", "config": _openclip_kwargs(sub)}
    if CLIP_PREFIX + "token_emb.weight" in t:
        from ldmgraph.models.text_encoders import ldm_bert_config

        return {"kind": "ldm-bert", "config": ldm_bert_config(state.sub(CLIP_PREFIX))}
    return None


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


def _concat_kind(unet: dict[str, Any], path: str | Path) -> str | None:
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
        return _check_prediction(override, state.path), "argument"
    if meta.get("prediction_type"):
        return _check_prediction(str(meta["prediction_type"]), state.path), "ldmgraph metadata"
    spec = state.metadata.get("modelspec.prediction_type")
    if spec:
        return _check_prediction(spec, state.path), "modelspec metadata"
    if "v_pred" in state.tensors:
        return "v", "v_pred key"
    return "eps", "default"


def _check_prediction(value: str, path: str | Path) -> str:
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
    dtype = _dominant_dtype(state.tensors.values())
    if meta is not None:
        pred, source = _prediction_type(state, meta, prediction_type)
        te = meta.get("text_encoder")
        return CheckpointInfo(
            path=str(path),
            layout="bundled",
            architecture=f"bundled-{meta.get('kind', 'txt2img')}",
            unet=dict(meta["unet"]),
            vae=dict(meta["vae"]) if meta.get("vae") else None,
            text_encoder={"kind": te} if te else None,
            prediction_type=pred,
            prediction_type_source=source,
            concat_kind=meta.get("concat"),
            scale_factor=float(meta.get("scale_factor", configs.SD_SCALE_FACTOR)),
            schedule=dict(meta.get("schedule") or configs.sd_schedule()),
            dtype=dtype,
            metadata=meta,
        )
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
    concat = _concat_kind(unet, path)
    architecture = _name_architecture(unet, text, concat)
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
        scale_factor=float(scale) if scale is not None and scale.numel() == 1 else configs.SD_SCALE_FACTOR,
        schedule=configs.sd_schedule(),
        dtype=dtype,
    )


def _name_architecture(unet: dict[str, Any], text: dict[str, Any] | None, concat: str | None) -> str:
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


def _dominant_dtype(tensors: Iterable[Tensor]) -> str:
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if not counts:
        return "float32"
    return str(max(counts, key=lambda d: counts[d])).removeprefix("torch.")


# --- loading weights into modules -------------------------------------------------------------


def build_on_meta(factory: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Construct a module on the meta device: no memory, no random init; weights come by `assign_weights`."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


_REBUILT_BUFFERS = {
    "position_ids": lambda b: torch.arange(b.shape[-1]).expand(b.shape).clone(),
    "token_type_ids": lambda b: torch.zeros(b.shape, dtype=b.dtype),
}


def assign_weights(
    module: nn.Module,
    weights: Mapping[str, Tensor],
    *,
    path: str | Path,
    component: str,
    dtype: torch.dtype | None = None,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Give a meta-device module the file's tensors (no copy unless `dtype` converts them).

    Raises MissingKeysError / UnexpectedKeysError naming the file and the component. Keys matching
    a regex in `ignore` (e.g. buffers that old files store) are skipped. Non-persistent buffers
    (`position_ids`, `token_type_ids`) are rebuilt on the CPU.
    """
    patterns = [re.compile(p) for p in ignore]
    wanted = {k: v for k, v in weights.items() if not any(p.search(k) for p in patterns)}
    if dtype is not None:
        wanted = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in wanted.items()}
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(wanted))
    if missing:
        raise MissingKeysError(path, component, missing)
    unexpected = sorted(set(wanted) - expected)
    if unexpected:
        raise UnexpectedKeysError(path, component, unexpected)
    try:
        module.load_state_dict(wanted, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise UnknownArchitectureError(
            path, f"{component}: weights do not fit the detected architecture: {exc}"
        ) from exc
    _rebuild_meta_buffers(module, path, component)
    return module.eval().requires_grad_(False)


def _rebuild_meta_buffers(module: nn.Module, path: str | Path, component: str) -> None:
    for owner_name, owner in module.named_modules():
        for name, buf in list(owner.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            rebuild = _REBUILT_BUFFERS.get(name)
            if rebuild is None:
                full = f"{owner_name}.{name}" if owner_name else name
                raise ModelError(
                    path, f"{component}: buffer {full!r} has no weight in the file and cannot be rebuilt"
                )
            owner.register_buffer(
                name, rebuild(buf), persistent=name not in owner._non_persistent_buffers_set
            )


# --- loading whole checkpoints ----------------------------------------------------------------


def file_identity(path: str | Path) -> tuple[Any, ...]:
    """(resolved path, size, mtime_ns) of a file, or of every file in a diffusers folder: the cache key.

    A file rewritten in place gets a new size or mtime and so a new key; the old entry ages out.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileNotFoundError(path, "no such file or folder (check the name and the model folders)")
    resolved = path.resolve()
    if resolved.is_dir():
        parts = []
        for f in sorted(resolved.rglob("*")):
            if f.is_file():
                st = f.stat()
                parts.append((str(f.relative_to(resolved)), st.st_size, st.st_mtime_ns))
        return (str(resolved), tuple(parts))
    st = resolved.stat()
    return (str(resolved), st.st_size, st.st_mtime_ns)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, str(dtype).removeprefix("torch."))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return value


def _cached(cache: Any, key: tuple[Any, ...], load: Any) -> Any:
    return load() if cache is None else cache.get_or_load(key, load)


def load_checkpoint(
    path: str | Path,
    *,
    cache: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    text_encoder: bool = True,
) -> Any:
    """Load a whole checkpoint (single file, bundled, or diffusers folder) into a `Checkpoint` of handles.

    `cache` (a `ModelCache`) shares the result with every caller asking for the same file and
    options. `dtype` None keeps the file's dtypes (no copy); a dtype converts the floating weights.
    `prediction_type` overrides the detected one (needed for SD 2.x 768-v files, see the module
    docstring). `text_encoder=False` skips the text encoder.
    """
    torch_dtype = _torch_dtype(dtype)
    key = (
        "checkpoint",
        file_identity(path),
        str(torch_dtype),
        str(device),
        prediction_type,
        allow_pickle,
        text_encoder,
    )
    return _cached(
        cache,
        key,
        lambda: _load_checkpoint(
            Path(path), cache, torch_dtype, device, prediction_type, allow_pickle, text_encoder
        ),
    )


def _load_checkpoint(
    path: Path,
    cache: Any,
    dtype: torch.dtype | None,
    device: str | torch.device,
    prediction_type: str | None,
    allow_pickle: bool,
    with_text: bool,
) -> Any:
    from ldmgraph.models.handles import Checkpoint

    if path.is_dir():
        return load_diffusers_folder(
            path,
            cache=cache,
            dtype=dtype,
            device=device,
            prediction_type=prediction_type,
            text_encoder=with_text,
        )
    state = read_state_dict(path, allow_pickle=allow_pickle)
    info = detect(state, prediction_type=prediction_type)
    unet = _unet_handle(state.sub(UNET_PREFIX), info, dtype)
    vae = _vae_handle(state.sub(VAE_PREFIX), info, dtype) if info.vae else None
    text = _text_encoder(state, info, cache, dtype, device) if with_text and info.text_encoder else None
    return Checkpoint(unet=unet, vae=vae, text_encoder=text, info=info).to(device)


def _unet_handle(weights: dict[str, Tensor], info: CheckpointInfo, dtype: torch.dtype | None) -> Any:
    from ldmgraph.models.handles import DiffusionModelHandle
    from ldmgraph.models.unet import UNetModel

    assert info.unet is not None
    module = _build(UNetModel, info.unet, info.path, "U-Net")
    assign_weights(module, weights, path=info.path, component="U-Net", dtype=dtype)
    return DiffusionModelHandle(
        module,
        prediction_type=info.prediction_type,
        schedule=info.schedule,
        concat_kind=info.concat_kind,
        info=info,
    )


def _vae_handle(weights: dict[str, Tensor], info: CheckpointInfo, dtype: torch.dtype | None) -> Any:
    from ldmgraph.models.autoencoder import AutoencoderKL
    from ldmgraph.models.handles import VAEHandle

    assert info.vae is not None
    module = _build(AutoencoderKL, info.vae, info.path, "autoencoder")
    assign_weights(module, weights, path=info.path, component="autoencoder", dtype=dtype, ignore=[r"^loss\."])
    return VAEHandle(module, scale_factor=info.scale_factor, info=info)


def _build(factory: Any, config: dict[str, Any], path: str | Path, component: str) -> nn.Module:
    try:
        return build_on_meta(factory, **config)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UnknownArchitectureError(
            path, f"{component}: cannot build the detected config {config}: {exc}"
        ) from exc


def _text_encoder(
    state: StateDict, info: CheckpointInfo, cache: Any, dtype: torch.dtype | None, device: str | torch.device
) -> Any:
    from ldmgraph.models import text_encoders as te

    assert info.text_encoder is not None
    kind = info.text_encoder["kind"]
    if kind == "minilm-l6-v2":
        key = ("text-encoder", "minilm-l6-v2", str(dtype or torch.float32), str(device))
        return _cached(cache, key, lambda: te.load_minilm(device=device, dtype=dtype or torch.float32))
    if kind == "clip-l":
        weights = state.sub(CLIP_PREFIX)
    elif kind == "openclip-h":
        weights = state.sub(OPENCLIP_PREFIX)
    elif kind == "ldm-bert":
        return te.ldm_bert_from_weights(
            state.sub(CLIP_PREFIX), path=state.path, dtype=dtype, config=info.text_encoder.get("config")
        )
    else:
        raise UnknownArchitectureError(
            state.path, f"text encoder {kind!r} is unknown: use 'minilm-l6-v2' or none"
        )
    config = info.text_encoder.get("config") or {}
    return te.clip_text_encoder_from_weights(
        weights, kind=kind, config_kwargs=config, path=state.path, dtype=dtype
    )


def load_vae(
    path: str | Path,
    *,
    cache: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    scale_factor: float | None = None,
    allow_pickle: bool = False,
) -> Any:
    """A `VAEHandle` from a standalone VAE file (keys `encoder.*` / `decoder.*`, original or diffusers
    names), a checkpoint's `first_stage_model.*`, or a diffusers `vae/` folder.

    The scale factor comes from `scale_factor`, else the file's metadata / `scale_factor` key / diffusers
    config, else SD's 0.18215.
    """
    torch_dtype = _torch_dtype(dtype)
    key = ("vae", file_identity(path), str(torch_dtype), str(device), scale_factor, allow_pickle)
    return _cached(cache, key, lambda: _load_vae(Path(path), torch_dtype, device, scale_factor, allow_pickle))


def _load_vae(
    path: Path,
    dtype: torch.dtype | None,
    device: str | torch.device,
    scale_factor: float | None,
    allow_pickle: bool,
) -> Any:
    if path.is_dir():
        return load_diffusers_vae(path, dtype=dtype, device=device, scale_factor=scale_factor)
    state = read_state_dict(path, allow_pickle=allow_pickle)
    meta = bundled_metadata(state)
    weights = state.sub(VAE_PREFIX) if state.has_prefix(VAE_PREFIX) else dict(state.tensors)
    if any(k.startswith("encoder.down_blocks.") for k in weights):
        from ldmgraph.models.diffusers_keys import vae_from_diffusers

        weights = vae_from_diffusers(weights)
    if meta is not None and meta.get("vae"):
        config = dict(meta["vae"])
    else:
        config = detect_vae_config(weights, path)
    scale = state.tensors.get("scale_factor")
    if scale_factor is None:
        if meta is not None and "scale_factor" in meta:
            scale_factor = float(meta["scale_factor"])
        elif scale is not None and scale.numel() == 1:
            scale_factor = float(scale)
        else:
            scale_factor = configs.SD_SCALE_FACTOR
    info = CheckpointInfo(
        path=str(path),
        layout="single-file",
        architecture="vae",
        vae=config,
        scale_factor=scale_factor,
        dtype=_dominant_dtype(weights.values()),
    )
    weights = {k: v for k, v in weights.items() if k != "scale_factor"}
    return _vae_handle(weights, info, dtype).to(device)


def load_text_encoder(
    path: str | Path,
    *,
    cache: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> Any:
    """A text encoder handle from a checkpoint file, a diffusers folder (or its `text_encoder/`), or the
    name "minilm-l6-v2" (the bundled models' frozen MiniLM, installed with its weights)."""
    torch_dtype = _torch_dtype(dtype)
    if str(path) == "minilm-l6-v2":
        from ldmgraph.models import text_encoders as te

        minilm_key = ("text-encoder", "minilm-l6-v2", str(torch_dtype or torch.float32), str(device))
        return _cached(
            cache, minilm_key, lambda: te.load_minilm(device=device, dtype=torch_dtype or torch.float32)
        )
    key = ("text-encoder", file_identity(path), str(torch_dtype), str(device), allow_pickle)
    return _cached(
        cache, key, lambda: _load_text_encoder(Path(path), cache, torch_dtype, device, allow_pickle)
    )


def _load_text_encoder(
    path: Path, cache: Any, dtype: torch.dtype | None, device: str | torch.device, allow_pickle: bool
) -> Any:
    if path.is_dir():
        return load_diffusers_text_encoder(path, dtype=dtype, device=device)
    state = read_state_dict(path, allow_pickle=allow_pickle)
    meta = bundled_metadata(state)
    if meta is not None:
        info = detect(state)
    else:
        text = detect_text_encoder(state)
        if text is None:
            raise UnknownArchitectureError(path, "no text encoder weights (cond_stage_model.*) in this file")
        info = CheckpointInfo(
            path=str(path), layout="single-file", architecture="text-encoder", text_encoder=text
        )
    if info.text_encoder is None:
        raise UnknownArchitectureError(path, "this bundled model declares no text encoder")
    return _text_encoder(state, info, cache, dtype, device).to(device)


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
            raise PickleRefusedError(pickled[0], _convert_hint(pickled[0]))
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
    return schedule, (None if pred is None else _check_prediction(str(pred), cfg_path))


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
        pred, source = _check_prediction(prediction_type, path), "argument"
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
        concat_kind=_concat_kind(unet_cfg, path),
        schedule=schedule,
    )
    unet_weights = _read_component_weights(unet_dir, "diffusion_pytorch_model")
    info.dtype = _dominant_dtype(unet_weights.values())
    try:
        renamed = dk.unet_from_diffusers(unet_weights, unet_cfg)
    except dk.KeyMappingError as exc:
        raise UnexpectedKeysError(unet_dir, "U-Net", [str(exc)]) from exc
    unet = _unet_handle(renamed, info, dtype)
    vae = load_diffusers_vae(path, dtype=dtype, device=device) if (path / "vae").is_dir() else None
    if vae is not None:
        info.vae, info.scale_factor = vae.info.vae, vae.scale_factor
    text = None
    if text_encoder and (path / "text_encoder").is_dir():
        text = load_diffusers_text_encoder(path, dtype=dtype, device=device)
        info.text_encoder = {"kind": text.kind, "config": {}}
    architecture = _name_architecture(
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
        dtype=_dominant_dtype(weights.values()),
    )
    try:
        renamed = dk.vae_from_diffusers(weights)
    except dk.KeyMappingError as exc:
        raise UnexpectedKeysError(folder, "autoencoder", [str(exc)]) from exc
    return _vae_handle(renamed, info, dtype).to(device)


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
