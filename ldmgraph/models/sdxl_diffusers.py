"""SDXL diffusers folders, normalised (the normalise step of loading for `text_encoder_2/`).

An SDXL base folder holds `unet/` (`addition_embed_type="text_time"`: the `adm` MLP is
`add_embedding`, `addition_time_embed_dim` the width of each size number's features),
`text_encoder/` (CLIP ViT-L, `CLIPTextModel`), `text_encoder_2/` (OpenCLIP ViT-bigG as
`CLIPTextModelWithProjection`: `text_projection.weight` [P, D]), `tokenizer/` and `tokenizer_2/`
(bigG's pads with "!", id 0). A refiner folder has `text_encoder_2/` alone. The text weights keep
transformers' names, under `conditioner.embedders.0.transformer.` (ViT-L) and
`conditioner.embedders.1.transformer.` (bigG); `sdxl.build_text_encoder` reads either naming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldmgraph.models import sdxl
from ldmgraph.models.files import UnknownArchitectureError

_TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim")


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


def _read(path: Path) -> dict[str, Any]:
    from ldmgraph.models.diffusers_folder import _read_json

    return _read_json(path)


def _text_kwargs(text_dir: Path) -> dict[str, Any]:
    cfg = _read(text_dir / "config.json")
    cfg = cfg.get("text_config", cfg)
    return {k: cfg[k] for k in _TEXT_CONFIG_KEYS if k in cfg}


def add_sdxl(folder: Any, path: Path, *, text_encoder: bool = True) -> None:
    """Fill an SDXL `DiffusersFolder` (its U-Net already read): family, vector layout, text encoders."""
    from ldmgraph.models.diffusers_folder import read_component_weights

    unet_cfg = _read(path / "unet" / "config.json") if (path / "unet").is_dir() else {}
    has_l = (path / "text_encoder").is_dir()
    family = "sdxl-base" if has_l or (folder.unet or {}).get("context_dim") == 2048 else "sdxl-refiner"
    adm = int((folder.unet or {}).get("adm_in_channels") or 0)
    if not adm:
        raise UnknownArchitectureError(path / "unet", "an SDXL folder whose U-Net has no text_time embedding")
    time_dim = int(unet_cfg.get("addition_time_embed_dim", sdxl.FOURIER_DIM))
    numbers = sdxl.REFINER_NUMBERS if family == "sdxl-refiner" else sdxl.BASE_NUMBERS
    layout = sdxl.VectorLayout(numbers, adm - len(numbers) * time_dim, time_dim)
    folder.family = family
    folder.metadata = {"family": family, "vector_layout": sdxl.layout_dict(layout)}
    if not text_encoder or not (path / "text_encoder_2").is_dir():
        return
    encoders: dict[str, Any] = {}
    for name, sub, prefix in (("l", "text_encoder", sdxl.L_PREFIX), ("g", "text_encoder_2", sdxl.HF_G_PREFIX)):
        text_dir = path / sub
        if not text_dir.is_dir():
            continue
        weights = read_component_weights(text_dir, "model")
        folder.state.tensors.update({prefix + k: v for k, v in weights.items()})
        encoders[name] = {"prefix": prefix, "naming": "hf", "config": _text_kwargs(text_dir)}
    folder.text = {"kind": family, "encoders": encoders}
