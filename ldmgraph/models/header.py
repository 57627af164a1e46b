"""What a checkpoint is, from its header alone: format, configuration, weight shapes. No torch.

Validation calls :func:`inspect_model` on every model a workflow names, so a pickle, a damaged
file or a broken configuration is reported before anything runs; the loaders call it too, so the
same typed error (``ldmgraph.models.errors``) names the file and the cause either way.

A safetensors file starts with an 8-byte little-endian header length, then a JSON object
mapping each tensor name to ``{dtype, shape, data_offsets}`` (and optional ``__metadata__``
strings); see the safetensors format description. A diffusers folder holds ``model_index.json``
and one ``config.json`` per component. Bundled ldmgraph models carry their whole configuration as
JSON in the ``ldmgraph`` metadata entry (docs/INTERFACES.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ldmgraph.models.errors import (
    BadMetadataError,
    BadWeightError,
    CorruptCheckpointError,
    MissingKeysError,
    ModelFileNotFoundError,
    PickleRefusedError,
    UnknownArchitectureError,
    convert_hint,
)
from ldmgraph.models.families import UnsupportedFamilyError, diffusers_family, refuse
from ldmgraph.models.ldm_config import config_for

UNET = "model.diffusion_model."
VAE = "first_stage_model."
MAX_HEADER_BYTES = 100 * 2**20
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
BETA_SCHEDULES = {"linear", "scaled_linear", "linear_plain", "plain_linear", "sqrt_linear", "cosine",
                  "squaredcos_cap_v2"}


@dataclass(frozen=True)
class Tensor:
    """One header entry: dtype name (``F32``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSummary:
    """What validation needs to know about a model file: its layout, configs and weight bytes."""

    path: str
    layout: str  # "bundled" | "single-file" | "diffusers"
    kind: str  # bundled kind ("txt2img", "inpaint", "superres"), else "checkpoint" / "vae" / ...
    unet: dict[str, Any] | None = None  # UNetModel kwargs (in_channels, model_channels, channel_mult, ...)
    vae: dict[str, Any] | None = None  # {"ddconfig": ..., "embed_dim": ...}
    text_encoder: str | None = None
    weight_bytes: int = 0
    dtype_bytes: int = 4
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell (the autoencoder's f; 8 when the file has no autoencoder)."""
        if self.vae is None:
            return 8
        return int(2 ** (len(self.vae["ddconfig"]["ch_mult"]) - 1))

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the U-Net denoises."""
        if self.unet is not None:
            return int(self.unet["out_channels"])
        return int(self.vae["embed_dim"]) if self.vae else 4


# --- formats ----------------------------------------------------------------------------------------


def sniff(path: Path) -> str:
    """``"safetensors"``, ``"pickle"``, ``"diffusers"`` or ``"unknown"``, from the bytes (names can lie)."""
    if path.is_dir():
        return "diffusers"  # a folder: the diffusers layout, whose components are checked one by one
    with path.open("rb") as f:
        head = f.read(10)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_header(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensor table and string metadata of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(path, "shorter than a safetensors header; the file is truncated")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CorruptCheckpointError(path, f"its header claims {length} bytes; the file is truncated or damaged")
        text = f.read(length)
    try:
        table = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, f"its header is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(table, dict):
        raise CorruptCheckpointError(path, "its header is not a JSON object; the file is damaged")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(path, "its __metadata__ is not a JSON object")
    data_bytes = size - 8 - length
    tensors = {name: _entry(path, name, value, data_bytes) for name, value in table.items()}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _entry(path: Path, name: str, value: Any, data_bytes: int) -> Tensor:
    try:
        dtype, shape, (start, end) = value["dtype"], value["shape"], value["data_offsets"]
        shape = tuple(int(d) for d in shape)
        itemsize = DTYPE_BYTES[dtype]
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(path, f"header entry {name!r} is malformed") from None
    if any(d < 0 for d in shape) or not 0 <= start <= end <= data_bytes:
        raise CorruptCheckpointError(path, f"tensor {name!r} lies outside the file; the file is truncated")
    if end - start != math.prod(shape) * itemsize:
        raise CorruptCheckpointError(
            path, f"tensor {name!r} holds {end - start} bytes but {dtype} {list(shape)} needs "
            f"{math.prod(shape) * itemsize}: its dtype or shape is wrong")
    return Tensor(dtype, shape)


# --- whole models -----------------------------------------------------------------------------------


def inspect_model(path: str | os.PathLike[str], *, need_unet: bool = True) -> ModelSummary:
    """Check a checkpoint file or diffusers folder from its header and describe it.

    Raises one typed :class:`~ldmgraph.models.errors.ModelError` naming the file and the cause.
    Results are cached by path, size and modification time.
    """
    path = Path(path)
    try:
        stat = path.stat()
        for name in ("model_index.json", "config.json"):
            if path.is_dir() and (path / name).is_file():
                stat = (path / name).stat()
                break
    except OSError:
        raise ModelFileNotFoundError(path, "no such file or folder (check the name and the model folders)") from None
    return _inspect(str(path), stat.st_size, stat.st_mtime_ns, need_unet)


@lru_cache(maxsize=64)
def _inspect(path_text: str, size: int, mtime: int, need_unet: bool) -> ModelSummary:
    path = Path(path_text)
    kind = sniff(path)
    if kind == "diffusers":
        return _diffusers(path, need_unet)
    if kind == "pickle" or path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(path, convert_hint(path))
    if kind != "safetensors":
        raise CorruptCheckpointError(path, "not a safetensors file (bad header); the file is damaged or of another format")
    tensors, metadata = read_header(path)
    if "ldmgraph" not in metadata:  # a family ldmgraph does not run (SD3, Flux, ...) is named, not mis-read
        refuse(path, {k: t.shape for k, t in tensors.items()})
    weight_bytes = sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for t in tensors.values())
    floats = [t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES]
    dtype_bytes = DTYPE_BYTES[max(set(floats), key=floats.count)] if floats else 4
    if "ldmgraph" in metadata:
        meta = bundled_meta(path, metadata["ldmgraph"])
        summary = ModelSummary(str(path), "bundled", str(meta.get("kind", "txt2img")), meta["unet"], meta.get("vae"),
                               meta.get("text_encoder"), weight_bytes, dtype_bytes, meta)
        _check_weights(path, tensors, summary)
        return summary
    unet = _unet_from_shapes(path, {k[len(UNET):]: t for k, t in tensors.items() if k.startswith(UNET)})
    if unet is None and need_unet:
        vae_like = any(k.startswith(("encoder.", "decoder.")) for k in tensors)
        hint = " (it looks like a standalone VAE: load it with a VAE loader)" if vae_like else ""
        raise UnknownArchitectureError(
            path, f"no U-Net weights under '{UNET}'{hint}: not a latent-diffusion checkpoint")
    vae = _vae_from_shapes({k[len(VAE):]: t for k, t in tensors.items() if k.startswith(VAE)})
    summary = ModelSummary(str(path), "single-file", "checkpoint" if unet else "weights", unet, vae, None,
                           weight_bytes, dtype_bytes)
    _check_weights(path, tensors, summary)
    config_for(path, metadata)  # the loader reads config.yaml beside the file (or the stored one): so does validation
    return summary


def bundled_meta(path: Path, raw: str) -> dict[str, Any]:
    """The ``ldmgraph`` metadata of a bundled model, checked field by field."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(path, f"its 'ldmgraph' metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("ldmgraph-bundled/"):
        raise CorruptCheckpointError(path, "its 'ldmgraph' metadata lacks format 'ldmgraph-bundled/1'")
    if not isinstance(meta.get("unet"), dict):
        raise BadMetadataError(path, "its 'ldmgraph' metadata has no 'unet' configuration (a JSON object); "
                               "re-export the model with `ldmgraph train`")
    _check_unet_config(path, meta["unet"], "the metadata's 'unet'")
    if meta.get("vae") is not None:
        _check_vae_config(path, meta["vae"], "the metadata's 'vae'")
    _check_schedule(path, meta.get("schedule"))
    return meta


def _check_unet_config(path: Path, unet: dict[str, Any], where: str) -> None:
    for key in ("in_channels", "out_channels", "model_channels"):
        if not _positive_int(unet.get(key)):
            raise BadMetadataError(path, f"{where} has {key}={unet.get(key)!r}; it must be a positive integer")
    mult = unet.get("channel_mult")
    if not (isinstance(mult, list) and mult and all(_positive_int(m) for m in mult)):
        raise BadMetadataError(path, f"{where} has channel_mult={mult!r}; it must be a list of positive integers")
    blocks = unet.get("num_res_blocks")
    if not (_positive_int(blocks) or (isinstance(blocks, list) and all(_positive_int(b) for b in blocks))):
        raise BadMetadataError(path, f"{where} has num_res_blocks={blocks!r}; it must be a positive integer")
    refiner = unet.get("context_refiner")
    if refiner is not None:
        keys = ("width", "depth", "heads", "max_tokens")
        if not (isinstance(refiner, dict) and set(refiner) <= set(keys) and all(_positive_int(v) for v in refiner.values())):
            raise BadMetadataError(path, f"{where} has context_refiner={refiner!r}; it must be null or an object of "
                                         f"positive integers {keys}")
        if unet.get("context_dim") is None:
            raise BadMetadataError(path, f"{where} has a context_refiner but no context_dim (nothing to refine)")


def _check_vae_config(path: Path, vae: Any, where: str) -> None:
    dd = vae.get("ddconfig") if isinstance(vae, dict) else None
    if not isinstance(dd, dict):
        raise BadMetadataError(path, f"{where} has no 'ddconfig' object")
    for key in ("ch", "z_channels", "in_channels", "out_ch"):
        if not _positive_int(dd.get(key)):
            raise BadMetadataError(path, f"{where} has {key}={dd.get(key)!r}; it must be a positive integer")
    mult = dd.get("ch_mult")
    if not (isinstance(mult, list) and mult and all(_positive_int(m) for m in mult)):
        raise BadMetadataError(path, f"{where} has ch_mult={mult!r}; it must be a list of positive integers")


def _check_schedule(path: Path, schedule: Any) -> None:
    if schedule is None:
        return
    problem = None
    if not isinstance(schedule, dict):
        problem = "is not a JSON object"
    elif schedule.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        problem = f"has beta_schedule={schedule.get('beta_schedule')!r} (known: {', '.join(sorted(BETA_SCHEDULES))})"
    elif not _positive_int(schedule.get("timesteps", 1000)) or schedule.get("timesteps", 1000) < 2:
        problem = f"has timesteps={schedule.get('timesteps')!r}; it must be an integer >= 2"
    else:
        start, end = schedule.get("linear_start", 0.00085), schedule.get("linear_end", 0.012)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end))
        if not (numbers and 0 < start < end < 1):
            problem = f"has linear_start={start!r}, linear_end={end!r}; they must satisfy 0 < start < end < 1"
    if problem:
        raise BadMetadataError(path, f"the noise schedule in its metadata {problem}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# --- weights ----------------------------------------------------------------------------------------


def _conv(path: Path, tensors: dict[str, Tensor], key: str, out: int | None, inp: int | None) -> Tensor:
    t = tensors.get(key)
    if t is None:
        raise MissingKeysError(path, key.split(".", 1)[0] if "." in key else "model", [key])
    if len(t.shape) != 4 or 0 in t.shape:
        raise BadWeightError(path, f"{key} has shape {list(t.shape)}; a convolution weight is 4-D "
                             "[out, in, k, k] with no zero sizes")
    if t.dtype not in FLOAT_DTYPES:
        raise BadWeightError(path, f"{key} is stored as {t.dtype}; weights must be floating point")
    if (out is not None and t.shape[0] != out) or (inp is not None and t.shape[1] != inp) or t.shape[2:] != (3, 3):
        raise BadWeightError(path, f"{key} has shape {list(t.shape)} but the configuration says "
                             f"[{out if out is not None else '?'}, {inp if inp is not None else '?'}, 3, 3]")
    return t


def _check_weights(path: Path, tensors: dict[str, Tensor], summary: ModelSummary) -> None:
    """Shapes and block lists the configuration implies: a 1-D conv_in, 0 channels, missing blocks."""
    bad = sorted(k for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES and k.endswith((".weight", ".bias")))
    if bad:
        raise BadWeightError(path, f"{len(bad)} weight(s) are not floating point, e.g. {bad[0]} is "
                             f"{tensors[bad[0]].dtype}; the file's dtypes are wrong")
    unet = summary.unet
    if unet is not None:
        _conv(path, tensors, UNET + "input_blocks.0.0.weight", unet["model_channels"], unet["in_channels"])
        _conv(path, tensors, UNET + "out.2.weight", unet["out_channels"], None)
        levels, per = len(unet["channel_mult"]), unet["num_res_blocks"]
        per = per if isinstance(per, list) else [per] * levels
        n_in = 1 + sum(per) + levels - 1
        n_out = sum(p + 1 for p in per)
        wanted = [f"input_blocks.{i}." for i in range(n_in)] + ["middle_block."]
        wanted += [f"output_blocks.{i}." for i in range(n_out)]
        have = {k[len(UNET):] for k in tensors if k.startswith(UNET)}
        missing = [w + "*" for w in wanted if not any(h.startswith(w) for h in have)]
        if missing:
            raise MissingKeysError(path, "U-Net", [UNET + m for m in missing])
    if summary.vae is not None and summary.layout != "diffusers":
        dd = summary.vae["ddconfig"]
        _conv(path, tensors, VAE + "encoder.conv_in.weight", dd["ch"], dd["in_channels"])
        _conv(path, tensors, VAE + "decoder.conv_out.weight", dd["out_ch"], None)


def _unet_from_shapes(path: Path, unet: dict[str, Tensor]) -> dict[str, Any] | None:
    """Enough of the U-Net's configuration for checks and memory estimates, from weight shapes."""
    if not unet:
        return None
    conv_in = _conv(path, unet, "input_blocks.0.0.weight", None, None)
    out = _conv(path, unet, "out.2.weight", None, None)
    base = conv_in.shape[0]
    ids = sorted({int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    mult, per, attn, count, width = [], [], [], 0, base
    for i in ids[1:]:
        if f"input_blocks.{i}.0.op.weight" in unet:
            mult.append(width // base)
            per.append(count)
            count = 0
            continue
        res = unet.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if res is None or len(res.shape) != 4 or 0 in res.shape:
            raise BadWeightError(path, f"{UNET}input_blocks.{i}.0.out_layers.3.weight is missing or malformed")
        width, count = res.shape[0], count + 1
        if any(k.startswith(f"input_blocks.{i}.1.") for k in unet) and 2 ** len(mult) not in attn:
            attn.append(2 ** len(mult))
    mult.append(width // base)
    per.append(count)
    ctx = [t.shape[1] for k, t in unet.items() if k.endswith("attn2.to_k.weight") and len(t.shape) == 2]
    return {"in_channels": conv_in.shape[1], "out_channels": out.shape[0], "model_channels": base,
            "channel_mult": mult, "num_res_blocks": per if len(set(per)) > 1 else per[0],
            "attention_resolutions": attn, "context_dim": ctx[0] if ctx else None}


def _vae_from_shapes(vae: dict[str, Tensor]) -> dict[str, Any] | None:
    conv_in, dec_in = vae.get("encoder.conv_in.weight"), vae.get("decoder.conv_in.weight")
    if conv_in is None or dec_in is None or len(conv_in.shape) != 4 or len(dec_in.shape) != 4:
        return None
    ch = conv_in.shape[0]
    levels = sorted({int(m.group(1)) for k in vae if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = []
    for lvl in levels:
        t = vae.get(f"encoder.down.{lvl}.block.0.conv2.weight")
        mult.append(t.shape[0] // ch if t is not None and t.shape and ch else 1)
    out = vae.get("decoder.conv_out.weight")
    return {"ddconfig": {"ch": ch, "ch_mult": mult or [1], "z_channels": dec_in.shape[1],
                         "in_channels": conv_in.shape[1], "out_ch": out.shape[0] if out is not None else 3},
            "embed_dim": dec_in.shape[1]}


# --- diffusers folders ------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileNotFoundError(path, "missing from the diffusers folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path, f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadMetadataError(path, "is not a JSON object")
    return value


def _typed(path: Path, cfg: dict[str, Any], key: str, kind: str, default: Any) -> Any:
    value = cfg.get(key, default)
    ok = {
        "int": _positive_int(value),
        "ints": isinstance(value, list) and bool(value) and all(_positive_int(v) for v in value),
        "strs": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "int?": value is None or _positive_int(value) or (isinstance(value, list) and all(_positive_int(v) for v in value)),
    }[kind]
    if not ok:
        what = {"int": "a positive integer", "ints": "a list of positive integers", "strs": "a list of strings",
                "int?": "a positive integer, a list of them, or null"}[kind]
        raise BadMetadataError(path, f"{key} is {value!r}; it must be {what}")
    return value


def _diffusers(path: Path, need_unet: bool) -> ModelSummary:
    index = path / "model_index.json"
    refused = diffusers_family(_read_config(index) if index.is_file() else {}, (path / "transformer").is_dir())
    if refused is not None:
        raise UnsupportedFamilyError(path, refused)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    unet = vae = None
    weight_bytes = 0
    if (unet_dir / "config.json").is_file() and (need_unet or unet_dir != path):
        cfg_path = unet_dir / "config.json"
        cfg = _read_config(cfg_path)
        blocks = _typed(cfg_path, cfg, "block_out_channels", "ints", [320, 640, 1280, 1280])
        down = _typed(cfg_path, cfg, "down_block_types", "strs", ["CrossAttnDownBlock2D"] * len(blocks))
        per = _typed(cfg_path, cfg, "layers_per_block", "int", 2)
        for key in ("in_channels", "out_channels"):
            _typed(cfg_path, cfg, key, "int", 4)
        for key in ("cross_attention_dim", "attention_head_dim"):
            _typed(cfg_path, cfg, key, "int?", None)
        if len(down) != len(blocks) or any(b % blocks[0] for b in blocks):
            raise BadMetadataError(cfg_path, f"down_block_types ({len(down)}) and block_out_channels {blocks} "
                                   "do not describe the same levels")
        unet = {"in_channels": cfg.get("in_channels", 4), "out_channels": cfg.get("out_channels", 4),
                "model_channels": blocks[0], "channel_mult": [b // blocks[0] for b in blocks],
                "num_res_blocks": per, "context_dim": cfg.get("cross_attention_dim"),
                "attention_resolutions": [2**i for i, t in enumerate(down) if "Attn" in t]}
        weight_bytes += _component_weights(unet_dir)
    elif need_unet:
        raise ModelFileNotFoundError(path / "unet", "the diffusers folder has no 'unet/' component")
    vae_dir = path / "vae" if (path / "vae").is_dir() else (path if unet is None and _is_vae_folder(path) else None)
    if vae_dir is not None and (vae_dir / "config.json").is_file():
        cfg_path = vae_dir / "config.json"
        cfg = _read_config(cfg_path)
        blocks = _typed(cfg_path, cfg, "block_out_channels", "ints", [64])
        latent = _typed(cfg_path, cfg, "latent_channels", "int", 4)
        vae = {"ddconfig": {"ch": blocks[0], "ch_mult": [b // blocks[0] for b in blocks], "z_channels": latent,
                            "in_channels": 3, "out_ch": 3}, "embed_dim": latent}
        weight_bytes += _component_weights(vae_dir)
    text = "clip" if (path / "text_encoder").is_dir() else None
    return ModelSummary(str(path), "diffusers", "diffusers", unet, vae, text, weight_bytes)


def _is_vae_folder(folder: Path) -> bool:
    """A component folder holding an autoencoder (not a text encoder's or a scheduler's config)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and (cfg.get("_class_name") == "AutoencoderKL" or "latent_channels" in cfg)


def _component_weights(folder: Path) -> int:
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        pickled = sorted(folder.glob("diffusion_pytorch_model*.bin"))
        if pickled:
            raise PickleRefusedError(pickled[0], convert_hint(pickled[0]))
        raise ModelFileNotFoundError(folder / "diffusion_pytorch_model.safetensors", "missing from the diffusers folder")
    total = 0
    for f in files:
        if sniff(f) != "safetensors":
            raise CorruptCheckpointError(f, "not a safetensors file (bad header)")
        tensors, _ = read_header(f)
        total += sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for t in tensors.values())
    return total
