"""Checkpoints: reading (memory-mapped), architecture detection, loading into modules, errors.

This module loads whole checkpoints and their parts into handles; it re-exports the names of
`ldmgraph.models.files` (prefixes, errors, `read_state_dict`) and `ldmgraph.models.detection`
(`detect`, `CheckpointInfo`), so `ldmgraph.models.checkpoint` stays the one import for callers.
Diffusers folders are read by `ldmgraph.models.diffusers_folder`.

Modules are built on the meta device and take the file's memory-mapped tensors with
`load_state_dict(assign=True)`: the weights exist once in RAM, never as a second copy, and
fp16/bf16 weights keep their dtype unless a dtype is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models.detection import (
    CheckpointInfo,
    bundled_metadata,
    default_scale_factor,
    detect,
    detect_text_encoder,
    detect_unet_config,
    detect_vae_config,
    dominant_dtype,
)
from ldmgraph.models.files import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    CorruptCheckpointError,
    MissingKeysError,
    ModelError,
    ModelFileNotFoundError,
    PickleRefusedError,
    StateDict,
    UnexpectedKeysError,
    UnknownArchitectureError,
    WeightMismatchError,
    read_state_dict,
)
from ldmgraph.models.header import inspect_model
from ldmgraph.models.paper import cond_stage_module, detect_paper
from ldmgraph.models.vq import autoencoder_class

__all__ = [
    "CLIP_PREFIX", "OPENCLIP_PREFIX", "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "UNET_PREFIX", "VAE_PREFIX",
    "CheckpointInfo", "CorruptCheckpointError", "MissingKeysError", "ModelError", "ModelFileNotFoundError",
    "PickleRefusedError", "StateDict", "UnexpectedKeysError", "UnknownArchitectureError", "assign_weights",
    "build_on_meta", "bundled_metadata", "detect", "detect_text_encoder", "detect_unet_config",
    "detect_vae_config", "file_identity", "load_checkpoint", "load_text_encoder", "load_vae", "read_state_dict",
]

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
    if dtype is not None:  # convert tensor by tensor, giving back each mapped source's pages
        from ldmgraph.models.pages import file_ranges, release

        mapped = file_ranges(path)
        for k, v in wanted.items():
            if v.is_floating_point() and v.dtype != dtype:
                wanted[k] = v.to(dtype)
                release(v, mapped)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(wanted))
    if missing:
        raise MissingKeysError(path, component, missing)
    unexpected = sorted(set(wanted) - set(expected))
    if unexpected:
        raise UnexpectedKeysError(path, component, unexpected)
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in wanted.items()
                  if v.shape != expected[k].shape]
    if mismatched:  # named here in a few lines, not by load_state_dict's one line per tensor
        raise WeightMismatchError(path, component, mismatched)
    try:
        module.load_state_dict(wanted, strict=True, assign=True)
    except RuntimeError as exc:
        raise UnknownArchitectureError(
            path, f"{component}: weights do not fit the detected architecture: {str(exc)[:300]}"
        ) from None
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
    progress: Any = None,
    config: str | Path | None = None,
) -> Any:
    """Load a whole checkpoint (single file, bundled, or diffusers folder) into a `Checkpoint` of handles.

    `cache` (a `ModelCache`) shares the result with every caller asking for the same file and
    options. `dtype` None keeps the file's dtypes (no copy); a dtype converts the floating weights.
    `prediction_type` overrides the detected one (needed for SD 2.x 768-v files, see the module
    docstring). `text_encoder=False` skips the text encoder. `progress(k, n)`, if given, is called
    as the parts are read (header, U-Net, autoencoder, text encoder); not at all on a cache hit.
    `config` names the original YAML config (the LDM paper's releases; default: `config.yaml` beside
    the file, or the one `ldmgraph convert` stored).
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
        file_identity(config) if config is not None else None,
    )
    return _cached(
        cache,
        key,
        lambda: _load_checkpoint(
            Path(path), cache, torch_dtype, device, prediction_type, allow_pickle, text_encoder, progress, config
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
    progress: Any = None,
    config: str | Path | None = None,
) -> Any:
    from ldmgraph.models.handles import Checkpoint

    report = progress or (lambda k, n: None)
    report(0, 4)
    if not allow_pickle:
        inspect_model(path)  # the header's checks: one typed error naming the file and the cause
    if path.is_dir():
        from ldmgraph.models.diffusers_folder import load_diffusers_folder

        return load_diffusers_folder(
            path,
            cache=cache,
            dtype=dtype,
            device=device,
            prediction_type=prediction_type,
            text_encoder=with_text,
        )
    state = read_state_dict(path, allow_pickle=allow_pickle)
    info = detect_paper(state, config=config, prediction_type=prediction_type) or detect(
        state, prediction_type=prediction_type
    )
    report(1, 4)
    unet = unet_handle(state.sub(UNET_PREFIX), info, dtype)
    unet.cond_stage_model = cond_stage_module(state, info, dtype)  # the paper's class / map conditioners
    report(2, 4)
    vae = vae_handle(state.sub(VAE_PREFIX), info, dtype) if info.vae else None
    report(3, 4)
    text = _text_encoder(state, info, cache, dtype, device) if with_text and info.text_encoder else None
    report(4, 4)
    return Checkpoint(unet=unet, vae=vae, text_encoder=text, info=info).to(device)


def unet_handle(weights: dict[str, Tensor], info: CheckpointInfo, dtype: torch.dtype | None) -> Any:
    from ldmgraph.models.handles import DiffusionModelHandle
    from ldmgraph.models.unet import UNetModel

    assert info.unet is not None
    module = _build(UNetModel, info.unet, info.path, "U-Net")
    assign_weights(module, weights, path=info.path, component="U-Net", dtype=dtype)
    if dtype is not None and dtype != torch.float32:
        module.keep_fp32()
    return DiffusionModelHandle(
        module,
        prediction_type=info.prediction_type,
        schedule=info.schedule,
        concat_kind=info.concat_kind,
        info=info,
    )


def vae_handle(weights: dict[str, Tensor], info: CheckpointInfo, dtype: torch.dtype | None) -> Any:
    from ldmgraph.models.handles import VAEHandle

    assert info.vae is not None
    module = _build(autoencoder_class(info.vae), info.vae, info.path, "autoencoder")
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
    if not allow_pickle:
        inspect_model(path, need_unet=False)
    if path.is_dir():
        from ldmgraph.models.diffusers_folder import load_diffusers_vae

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
            scale_factor = default_scale_factor(config)
    info = CheckpointInfo(
        path=str(path),
        layout="single-file",
        architecture="vae",
        vae=config,
        scale_factor=scale_factor,
        dtype=dominant_dtype(weights.values()),
    )
    weights = {k: v for k, v in weights.items() if k != "scale_factor"}
    return vae_handle(weights, info, dtype).to(device)


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
    if not allow_pickle:
        inspect_model(path, need_unet=False)
    if path.is_dir():
        from ldmgraph.models.diffusers_folder import load_diffusers_text_encoder

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


