"""The original latent-diffusion YAML configs, read as data (never as code).

The original repository builds a model with `instantiate_from_config`: `target` names a class,
`params` its keyword arguments. Here the YAML is parsed with `yaml.safe_load` and the targets are
matched against the few classes the paper's releases use; nothing is imported from a `target`.
A `model.target` of `LatentDiffusion` gives the U-Net (`unet_config`), the first stage
(`first_stage_config`: `AutoencoderKL` or `VQModelInterface`), the conditioning model
(`cond_stage_config`) and the training schedule; a first-stage config alone (the releases'
`models/first_stage_models/<name>/config.yaml`) gives just the autoencoder.

Facts from the original `ldm/models/diffusion/ddpm.py`: `conditioning_key` defaults to "concat" when
`concat_mode` (default true) and "crossattn" otherwise, and is None for `__is_unconditional__`;
`scale_factor` defaults to 1.0; the beta schedule defaults to "linear" (linspace over sqrt(beta)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmgraph.models.errors import ModelError

LDM_CONFIG_KEY = "ldm_config"
"""The safetensors metadata key under which `ldmgraph convert` stores the original YAML."""

_UNET_DROPPED = {"use_checkpoint", "use_fp16", "image_size", "n_embed"}
_COND_KINDS = {
    "BERTEmbedder": "ldm-bert",
    "ClassEmbedder": "class-embedder",
    "SpatialRescaler": "spatial-rescaler",
    "Identity": "identity",
}


@dataclass
class LdmConfig:
    """What an original config says: builder kwargs (original names) and the sampling facts."""

    first_stage: dict[str, Any]  # AutoencoderKL / VQModel kwargs (VQ ones carry n_embed)
    unet: dict[str, Any] | None = None
    cond_stage: dict[str, Any] | None = None  # {"kind": ..., "params": {...}} or None (unconditional)
    conditioning_key: str | None = None
    scale_factor: float = 1.0
    scale_by_std: bool = False
    schedule: dict[str, Any] = field(default_factory=dict)
    parameterization: str = "eps"


def _fail(path: str | Path, message: str) -> ModelError:
    return ModelError(path, f"config: {message}")


def _params(node: Any, path: str | Path, where: str) -> dict[str, Any]:
    if not isinstance(node, dict) or not isinstance(node.get("params", {}), dict):
        raise _fail(path, f"{where} must be a mapping with 'target' and 'params'")
    return dict(node.get("params") or {})


def _target(node: Any) -> str:
    return str(node.get("target", "")) if isinstance(node, dict) else str(node)


def _first_stage(node: Any, path: str | Path) -> dict[str, Any]:
    target = _target(node).rsplit(".", 1)[-1]
    params = _params(node, path, "first_stage_config")
    if not isinstance(params.get("ddconfig"), dict) or "embed_dim" not in params:
        raise _fail(path, "the first stage needs ddconfig and embed_dim")
    out: dict[str, Any] = {"ddconfig": dict(params["ddconfig"]), "embed_dim": int(params["embed_dim"])}
    if target.startswith("VQModel"):
        if "n_embed" not in params:
            raise _fail(path, f"the VQ first stage ({target}) needs n_embed")
        out["n_embed"] = int(params["n_embed"])
        out["ddconfig"].setdefault("double_z", False)
    elif target != "AutoencoderKL":
        raise _fail(path, f"first stage {_target(node)!r} is not one the paper released (AutoencoderKL, VQModel)")
    return out


def _cond_stage(node: Any, path: str | Path) -> dict[str, Any] | None:
    if node in ("__is_unconditional__", None):
        return None
    if node == "__is_first_stage__":
        return {"kind": "first-stage", "params": {}}
    name = _target(node).rsplit(".", 1)[-1]
    # other conditioning models (Stable Diffusion's CLIP, ...) are the general loader's business
    kind = _COND_KINDS.get(name, f"other:{name}")
    return {"kind": kind, "params": _params(node, path, "cond_stage_config")}


def parse_ldm_config(data: Any, path: str | Path) -> LdmConfig:
    """An `LdmConfig` from a parsed YAML document (a LatentDiffusion or a first-stage config)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise _fail(path, "no 'model' section: not a latent-diffusion config")
    target = _target(model).rsplit(".", 1)[-1]
    params = _params(model, path, "model")
    if target in ("AutoencoderKL", "VQModel", "VQModelInterface"):
        return LdmConfig(first_stage=_first_stage(model, path))
    if target not in ("LatentDiffusion", "DDPM"):
        raise _fail(path, f"model target {_target(model)!r} is not LatentDiffusion or an autoencoder")
    if "unet_config" not in params or "first_stage_config" not in params:
        raise _fail(path, "a LatentDiffusion config needs unet_config and first_stage_config")
    cond = _cond_stage(params.get("cond_stage_config"), path)
    key = params.get("conditioning_key")
    if key is None:
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    if cond is None:
        key = None
    unet = {k: v for k, v in _params(params["unet_config"], path, "unet_config").items() if k not in _UNET_DROPPED}
    return LdmConfig(
        first_stage=_first_stage(params["first_stage_config"], path),
        unet=unet,
        cond_stage=cond,
        conditioning_key=key,
        scale_factor=float(params.get("scale_factor", 1.0)),
        scale_by_std=bool(params.get("scale_by_std", False)),
        schedule={
            "beta_schedule": str(params.get("beta_schedule", "linear")),
            "linear_start": float(params.get("linear_start", 1e-4)),
            "linear_end": float(params.get("linear_end", 2e-2)),
            "timesteps": int(params.get("timesteps", 1000)),
        },
        parameterization=str(params.get("parameterization", "eps")),
    )


MAX_CONFIG_BYTES = 1 << 20
"""The releases' configs are a few KB; a larger file is refused before it is read."""
MAX_CONFIG_DEPTH = 64
"""Deepest nesting of mappings and lists accepted (the releases' configs reach 6)."""


class ConfigTooDeepError(ModelError):
    """A YAML config nested deeper than MAX_CONFIG_DEPTH (refused before it is built, so no recursion)."""


def read_ldm_config(text: str, path: str | Path) -> LdmConfig:
    """Parse YAML text (safe loader: plain data only) into an `LdmConfig`.

    The nesting depth is measured on the parser's event stream (a loop, not a recursion) before the
    document is built, so a config of 50,000 nested lists is a clear error rather than a crash.
    """
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise _fail(path, f"{len(text)} characters; a model config is a few KB (at most {MAX_CONFIG_BYTES})")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise ConfigTooDeepError(path, f"config: nested deeper than {MAX_CONFIG_DEPTH} levels; "
                                                   "not a model config")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML ({str(exc)[:200]})") from exc
    return parse_ldm_config(data, path)


def read_config_file(path: str | Path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES (never a FIFO or device)."""
    import stat

    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise ModelError(path, "no such config file (the config input names a YAML file)") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ModelError(path, "config: not a regular file (a folder, device or FIFO)")
    if info.st_size > MAX_CONFIG_BYTES:
        raise _fail(path, f"{info.st_size} bytes; a model config is a few KB (at most {MAX_CONFIG_BYTES})")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read it as UTF-8 text ({exc})") from exc


def config_for(path: str | Path, metadata: dict[str, str], given: str | Path | None = None) -> LdmConfig | None:
    """The config that applies to a checkpoint: `given`, else `config.yaml` beside the file, else the
    YAML that `ldmgraph convert` stored in its metadata; None when there is none."""
    if given is not None:
        given = Path(given)
        return read_ldm_config(read_config_file(given), given)
    beside = Path(path).parent / "config.yaml"
    if Path(path).is_file() and beside.is_file():
        return read_ldm_config(read_config_file(beside), beside)
    if LDM_CONFIG_KEY in metadata:
        return read_ldm_config(metadata[LDM_CONFIG_KEY], f"{path} (stored config)")
    return None
