"""Loading, one way: read the file -> normalise keys to the original layout -> detect -> build ->
wrap in handles. Each step is one module, imported in that order only:

1. `files` reads a file's tensors (safetensors memory-mapped; pickles refused, see `convert`);
   `header` checks a file before that;
2. `diffusers_folder` renames a diffusers folder to the original layout (through `diffusers_keys`);
3. `detection` (and `paper` for the LDM paper's releases, with `ldm_config` for their YAML)
   detects the architecture;
4. `build` constructs the modules on the meta device and assigns the weights (`weights`);
5. `handles` wraps them in the MODEL / VAE / TEXT_ENCODER values.

This module runs the steps and shares the results through the model cache. It re-exports the names
callers used from here (prefixes, errors, `read_state_dict`, `detect`, `CheckpointInfo`,
`build_on_meta`, `assign_weights`), so `ldmgraph.models.checkpoint` stays the one import for callers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldmgraph.models import text_encoders as te
from ldmgraph.models.build import build_cond_stage, build_first_stage, build_text_encoder, build_unet
from ldmgraph.models.detection import (
    CheckpointInfo,
    bundled_metadata,
    default_scale_factor,
    detect,
    detect_diffusers,
    detect_diffusers_vae,
    detect_text_encoder,
    detect_unet_config,
    detect_vae_config,
    dominant_dtype,
)
from ldmgraph.models.diffusers_folder import (
    normalise_pipeline,
    normalise_text_encoder,
    normalise_vae,
    original_vae_weights,
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
from ldmgraph.models.handles import (
    Checkpoint,
    DiffusionModelHandle,
    VAEHandle,
    wrap_first_stage,
    wrap_unet,
)
from ldmgraph.models.header import inspect_model
from ldmgraph.models.paper import detect_paper
from ldmgraph.models.weights import assign_weights, build_on_meta

__all__ = [
    "CLIP_PREFIX", "OPENCLIP_PREFIX", "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "UNET_PREFIX", "VAE_PREFIX",
    "CheckpointInfo", "CorruptCheckpointError", "MissingKeysError", "ModelError", "ModelFileNotFoundError",
    "PickleRefusedError", "StateDict", "UnexpectedKeysError", "UnknownArchitectureError", "WeightMismatchError",
    "assign_weights", "build_on_meta", "bundled_metadata", "detect", "detect_text_encoder", "detect_unet_config",
    "detect_vae_config", "file_identity", "load_checkpoint", "load_text_encoder", "load_vae", "read_state_dict",
    "unet_handle", "vae_handle",
]


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
) -> Checkpoint:
    report = progress or (lambda k, n: None)
    report(0, 4)
    if not allow_pickle:
        inspect_model(path)  # the header's checks: one typed error naming the file and the cause
    text_config: dict[str, Any] | None
    vae_info: CheckpointInfo | None = None
    if path.is_dir():  # read + normalise, then detect from the folder's configs
        folder = normalise_pipeline(path, text_encoder=with_text)
        state, text_config = folder.state, folder.text
        info = detect_diffusers(folder, prediction_type=prediction_type)
        vae_info = detect_diffusers_vae(folder) if folder.vae is not None else None
    else:  # read (already the original layout), then detect from the weights or the original config
        state = read_state_dict(path, allow_pickle=allow_pickle)
        info = detect_paper(state, config=config, prediction_type=prediction_type) or detect(
            state, prediction_type=prediction_type
        )
        vae_info, text_config = (info if info.vae else None), info.text_encoder
    report(1, 4)
    unet = unet_handle(state.sub(UNET_PREFIX), info, dtype)
    unet.cond_stage_model = build_cond_stage(state, info, dtype)  # the paper's class / map conditioners
    report(2, 4)
    vae = vae_handle(state.sub(VAE_PREFIX), vae_info, dtype) if vae_info is not None else None
    report(3, 4)
    text = _text_encoder(state, text_config, cache, dtype, device) if with_text and text_config else None
    report(4, 4)
    return Checkpoint(unet=unet, vae=vae, text_encoder=text, info=info).to(device)


def unet_handle(weights: dict[str, Any], info: CheckpointInfo, dtype: torch.dtype | None) -> DiffusionModelHandle:
    """Build the U-Net of `info` with `weights` (original layout, no prefix) and wrap it as a MODEL."""
    return wrap_unet(build_unet(weights, info, dtype), info)


def vae_handle(weights: dict[str, Any], info: CheckpointInfo, dtype: torch.dtype | None) -> VAEHandle:
    """Build the autoencoder of `info` with `weights` (original layout, no prefix) and wrap it as a VAE."""
    return wrap_first_stage(build_first_stage(weights, info, dtype), info)


def _text_encoder(
    state: StateDict, text: dict[str, Any], cache: Any, dtype: torch.dtype | None, device: str | torch.device
) -> Any:
    if text["kind"] == "minilm-l6-v2":  # not in the file: the installed package's weights, shared
        key = ("text-encoder", "minilm-l6-v2", str(dtype or torch.float32), str(device))
        minilm = _cached(cache, key, lambda: te.load_minilm(device=device, dtype=dtype or torch.float32))
        # a model trained with clause tokens reads them too (the same weights, no copy)
        if not text.get("clause_tokens"):
            return minilm
        return te.with_clause_tokens(minilm, int(text["clause_tokens"]), bool(text.get("clause_only")))
    return build_text_encoder(state, text, dtype)


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
        folder = normalise_vae(path, scale_factor=scale_factor)
        return vae_handle(folder.state.sub(VAE_PREFIX), detect_diffusers_vae(folder), dtype).to(device)
    state = read_state_dict(path, allow_pickle=allow_pickle)
    meta = bundled_metadata(state)
    weights = state.sub(VAE_PREFIX) if state.has_prefix(VAE_PREFIX) else dict(state.tensors)
    weights = original_vae_weights(weights)
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
        folder = normalise_text_encoder(path)
        assert folder.text is not None
        return _text_encoder(folder.state, folder.text, cache, dtype, device).to(device)
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
    return _text_encoder(state, info.text_encoder, cache, dtype, device).to(device)


