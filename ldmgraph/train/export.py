"""Export trained runs as bundled checkpoints: one safetensors file per model, original layout.

Keys ``model.diffusion_model.*`` (the U-Net's EMA weights) and ``first_stage_model.*`` (the
autoencoder's EMA weights), plus the metadata key ``ldmgraph`` with the JSON that the loader
rebuilds the models from (docs/INTERFACES.md, "Bundled checkpoints").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldmgraph.models.autoencoder import AutoencoderKL
from ldmgraph.models.single_file import save_single_file
from ldmgraph.models.unet import UNetModel

from .common import load_ema_weights
from .ldm import CONCAT, SCHEDULE

BUNDLED_NAMES = {
    "ldm": "ldmgraph-shapes-txt2img.safetensors",
    "superres": "ldmgraph-shapes-superres.safetensors",
    "inpaint": "ldmgraph-shapes-inpaint.safetensors",
}
BUNDLED_KIND = {"ldm": "txt2img", "superres": "superres", "inpaint": "inpaint"}
CONCAT_FORMAT = {
    "lowres-image": "the 16x16 low-resolution RGB image in -1..1 (4x4 box-downsampled 64x64 image), "
    "stacked after z_t: [z_t, image]",
    "inpaint-mask-latent": "[z_t, mask, masked-image latent]: mask 1 = repaint at latent resolution "
    "(max-pooled), masked image = pixels in -1..1 set to 0 (grey) inside the mask, encoded by the "
    "posterior mean, times scale_factor",
}


def assets_dir() -> Path:
    """The package folder of the shipped weights (``ldmgraph/assets/models``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "models"


def load_autoencoder(folder: Path) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The EMA autoencoder of a run folder and its run state."""
    state = json.loads((folder / "state.json").read_text())
    cfg = state["config"]
    ae = AutoencoderKL(ddconfig=dict(cfg["ddconfig"]), embed_dim=cfg["embed_dim"])
    load_ema_weights(folder, ae)
    return ae.eval(), state


def load_unet(folder: Path) -> tuple[UNetModel, dict[str, Any]]:
    """The EMA U-Net of a diffusion run folder and its run state."""
    state = json.loads((folder / "state.json").read_text())
    unet = UNetModel(**state["config"]["unet"])
    if state["config"].get("text_encoder") == "transformer":  # a JointModel run: its U-Net part
        from .common import prefixed_tensors

        unet.load_state_dict(prefixed_tensors(folder / "checkpoint.safetensors", "ema.unet."))
    else:
        load_ema_weights(folder, unet)
    return unet.eval(), state


def text_transformer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a run's jointly trained text transformer (empty for a frozen-MiniLM run)."""
    from .common import prefixed_tensors

    return prefixed_tensors(folder / "checkpoint.safetensors", "ema.text.")


def bundled_metadata(kind: str, unet_state: dict[str, Any], ae_state: dict[str, Any],
                     scale_factor: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``ldmgraph`` metadata JSON of one bundled model."""
    cfg = unet_state["config"]
    concat = CONCAT[kind]
    return {
        "format": "ldmgraph-bundled/1",
        "kind": BUNDLED_KIND[kind],
        "unet": cfg["unet"],
        "vae": {"ddconfig": ae_state["config"]["ddconfig"], "embed_dim": ae_state["config"]["embed_dim"]},
        "scale_factor": scale_factor,
        "text_encoder": None if kind == "superres" else
        ("ldm-bert" if cfg.get("text_encoder") == "transformer" else "minilm-l6-v2"),
        **({"clause_tokens": int(cfg["clause_tokens"])} if cfg.get("clause_tokens") else {}),
        **({"clause_only": True} if cfg.get("clause_tokens") and cfg.get("clause_only") else {}),
        "concat": concat,
        "concat_format": CONCAT_FORMAT.get(concat or "", None),
        "schedule": dict(SCHEDULE),
        "prediction_type": "eps",
        "training": {
            "dataset": "ldmgraph procedural shapes (ldmgraph.train.data), 64x64, training split "
            "(a quarter of one-object colour-shape-position combinations held out)",
            "steps": unet_state["step"],
            "batch_size": cfg["batch_size"],
            "seed": cfg["seed"],
            "seconds": round(float(unet_state.get("seconds", 0.0))),
            "autoencoder_steps": ae_state["step"],
            "loss": "||eps - eps_theta(z_t, t, c)||^2 (Rombach et al. 2022, eq. 2)",
            "lr": cfg.get("lr"),
            **fine_tuned_from(cfg.get("init_from") or "", unet_state.get("init_from_step")),
            **(extra or {}),
        },
    }


def fine_tuned_from(source: str, step: int | None = None) -> dict[str, Any]:
    """Where a fine-tuned run started: the source's name and, for a bundled file, its own training record
    (so a chain of fine-tunes keeps the whole history); {} for a run trained from scratch. ``step``: the
    source run's step when the fine-tune started (else the step it is at now)."""
    if not source:
        return {}
    path = Path(source)
    record: dict[str, Any] = {"from": path.name}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("ldmgraph", "{}"))
        if isinstance(meta.get("training"), dict):
            record["training"] = meta["training"]
    elif (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        record["steps"] = step if step is not None else state.get("step")
        record.update(fine_tuned_from(state.get("config", {}).get("init_from") or "", state.get("init_from_step")))
    return {"fine_tuned_from": record}


def export_bundled(kind: str, unet_folder: Path, ae_folder: Path, scale_factor: float, out: Path,
                   dtype: torch.dtype = torch.float32, extra: dict[str, Any] | None = None) -> Path:
    """Write one bundled checkpoint (atomically) and return its path."""
    unet, unet_state = load_unet(unet_folder)
    ae, ae_state = load_autoencoder(ae_folder)
    # a jointly trained text transformer (paper layout, as the released LDM checkpoints key it)
    text = {f"cond_stage_model.transformer.{k}": v for k, v in text_transformer_tensors(unet_folder).items()}
    meta = bundled_metadata(kind, unet_state, ae_state, scale_factor, extra)
    cfg = unet_state["config"]
    if cfg.get("text_encoder", "minilm") != "minilm" or cfg.get("route", "crossattn") != "crossattn" \
            or cfg.get("cross_attention", "all") != "all":
        meta["conditioning"] = {k: cfg[k] for k in ("text_encoder", "route", "cross_attention", "context_length")}
        if cfg.get("text_transformer"):
            meta["text_transformer"] = cfg["text_transformer"]
    return save_single_file(out, unet=unet, vae=ae, extra=text, metadata={"ldmgraph": meta}, dtype=dtype)
