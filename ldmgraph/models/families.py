"""The table of model families: which checkpoint a set of tensor names is, tried in order.

Each entry is one small object: its key signature (a predicate over the file's tensor names and
shapes), the dotted name of its config reader (`StateDict -> CheckpointInfo`) and of its key
normaliser (`StateDict -> StateDict` in the original layout), or, for a family ldmgraph does not
run, a refusal that names it. Adding a family is adding an entry; `detection.detect` and the header
check that validation runs (`header.inspect_model`) both walk this one table.

Torch-free (validation reads headers only): signatures see names and shapes, never values, and
readers are imported only when an entry is chosen.

Key facts (from the released files of each family):
- SDXL base: U-Net `model.diffusion_model.label_emb.0.0.weight` (the `adm` vector: pooled text
  embedding + Fourier features of size and crop numbers), CLIP ViT-L under
  `conditioner.embedders.0.transformer.`, OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`.
- SDXL refiner: the same `label_emb`, OpenCLIP ViT-bigG alone under `conditioner.embedders.0.model.`
  (cross-attention context 1280).
- SD3 / SD3.5 (MMDiT): `joint_blocks.N.`; Flux: `double_blocks.N.` and `single_blocks.N.`;
  Stable Cascade: `clip_txt_mapper.`, `effnet_mapper.` or `down_blocks.N.N.channelwise.`;
  PixArt: `t_block.` with `y_embedder.`; Hunyuan-DiT: `mlp_t5.` or `text_embedding_padding`;
  Kolors: an SDXL-like U-Net with `encoder_hid_proj.` (ChatGLM3 context); AuraFlow:
  `double_layers.N.` or `cond_seq_linear.`; video U-Nets (SVD): `time_stack.` / `time_mixer.`;
  diffusers transformer folders (`transformer/` instead of `unet/`) are DiT families too.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmgraph.models.errors import UnknownArchitectureError

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")

Shapes = Mapping[str, tuple[int, ...]]
"""Tensor name -> shape (a safetensors header, or a state dict's shapes)."""


@dataclass(frozen=True)
class Family:
    """One model family: how to recognise it and how to read it (or why it is refused)."""

    name: str
    label: str
    signature: Callable[[Shapes], bool]
    reader: str | None = None  # "module:function" taking (StateDict, prediction_type=...) -> CheckpointInfo
    normaliser: str | None = None  # "module:function" taking a StateDict, giving the original layout
    refusal: str | None = None  # why ldmgraph does not run it (None: supported)

    @property
    def supported(self) -> bool:
        return self.refusal is None

    def read(self, state: Any, **options: Any) -> Any:
        """The `CheckpointInfo` of `state` (normalised first when the family has a normaliser)."""
        if self.reader is None:
            raise TypeError(f"the {self.label} family has no reader")
        if self.normaliser is not None:
            state = _resolve(self.normaliser)(state)
        return _resolve(self.reader)(state, **options)


def _resolve(dotted: str) -> Callable[..., Any]:
    module, name = dotted.split(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _any_key(shapes: Iterable[str], *patterns: str) -> bool:
    """A tensor name, with or without a diffusion-model prefix, starts with one of the patterns
    (a pattern may hold a `N` standing for a block number)."""
    regexes = [re.compile("(?:" + "|".join(map(re.escape, _PREFIXES)) + ")" +
                          re.escape(p).replace("N", r"\d+")) for p in patterns]
    return any(r.match(k) for k in shapes for r in regexes)


def _unet(shapes: Shapes, key: str) -> tuple[int, ...] | None:
    return shapes.get("model.diffusion_model." + key)


def _sdxl_unet(shapes: Shapes) -> bool:
    """An SDXL-shaped U-Net: an `adm` MLP (`label_emb.0.0`) beside cross-attention (the context width
    then tells base from refiner)."""
    return _unet(shapes, "label_emb.0.0.weight") is not None and any(
        k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight") for k in shapes
    )


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _context_width(shapes: Shapes) -> int | None:
    for key, shape in shapes.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def is_sdxl_base(shapes: Shapes) -> bool:
    """SDXL base or a fine-tune of it: the two text encoders, or an SDXL U-Net reading a 2048 context."""
    if not _sdxl_unet(shapes):
        return False
    if _has(shapes, "conditioner.embedders.1.model."):
        return True
    return not _has(shapes, "conditioner.embedders.0.model.") and _context_width(shapes) == 2048


def is_sdxl_refiner(shapes: Shapes) -> bool:
    """SDXL refiner: OpenCLIP ViT-bigG alone (first embedder), or an SDXL U-Net reading a 1280 context."""
    if not _sdxl_unet(shapes):
        return False
    if _has(shapes, "conditioner.embedders.0.model."):
        return True
    return not _has(shapes, "conditioner.embedders.") and _context_width(shapes) == 1280


def _refused(name: str, label: str, why: str, signature: Callable[[Shapes], bool]) -> Family:
    return Family(name, label, signature, refusal=why)


_DIT = "a transformer (DiT) model, not a latent-diffusion U-Net"

FAMILIES: tuple[Family, ...] = (
    _refused("sd3", "Stable Diffusion 3", f"{_DIT} (MMDiT, three text encoders)",
             lambda s: _any_key(s, "joint_blocks.N.")),
    _refused("flux", "Flux", f"{_DIT} (double- and single-stream blocks, T5 text encoder)",
             lambda s: _any_key(s, "double_blocks.N.", "single_blocks.N.")),
    _refused("auraflow", "AuraFlow", _DIT, lambda s: _any_key(s, "double_layers.N.", "cond_seq_linear.")),
    _refused("stable-cascade", "Stable Cascade", "a three-stage Wuerstchen model (stage C/B), not a latent-diffusion U-Net",
             lambda s: _any_key(s, "clip_txt_mapper.", "effnet_mapper.", "down_blocks.N.N.channelwise.")),
    _refused("pixart", "PixArt", f"{_DIT} (T5 text encoder)", lambda s: _any_key(s, "t_block.") and _any_key(s, "y_embedder.")),
    _refused("hunyuan-dit", "Hunyuan-DiT", f"{_DIT} (bilingual CLIP + mT5)",
             lambda s: _any_key(s, "mlp_t5.", "text_embedding_padding")),
    _refused("kolors", "Kolors", "an SDXL-like U-Net conditioned on the ChatGLM3 language model, which ldmgraph does not run",
             lambda s: _any_key(s, "encoder_hid_proj.")),
    _refused("video", "Stable Video Diffusion", "a video U-Net (temporal layers), not an image model",
             lambda s: _any_key(s, "input_blocks.N.0.time_stack.", "input_blocks.N.1.time_stack.", "time_mixer.")),
    Family("sdxl-refiner", "SDXL refiner", is_sdxl_refiner, reader="ldmgraph.models.detection:detect_sdxl"),
    Family("sdxl-base", "SDXL base", is_sdxl_base, reader="ldmgraph.models.detection:detect_sdxl"),
    Family("sd1", "Stable Diffusion 1.x (and its inpainting model)",
           lambda s: _has(s, "cond_stage_model.transformer.text_model.") and _context_width(s) == 768,
           reader="ldmgraph.models.detection:detect_ldm"),
    Family("sd2", "Stable Diffusion 2.x (and its inpainting model; 768-v files need prediction_type v)",
           lambda s: _has(s, "cond_stage_model.model.") and _context_width(s) == 1024,
           reader="ldmgraph.models.detection:detect_ldm"),
    Family("ldm", "the latent-diffusion paper's models and other original-layout U-Nets",
           lambda s: True, reader="ldmgraph.models.detection:detect_ldm"),
)
"""Tried in order; the first whose signature matches decides (the last matches everything)."""

DIFFUSERS_PIPELINES: dict[str, str] = {
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3", "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux", "FluxFillPipeline": "flux", "AuraFlowPipeline": "auraflow",
    "StableCascadePriorPipeline": "stable-cascade", "StableCascadeDecoderPipeline": "stable-cascade",
    "StableCascadeCombinedPipeline": "stable-cascade", "WuerstchenPriorPipeline": "stable-cascade",
    "PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart", "HunyuanDiTPipeline": "hunyuan-dit",
    "KolorsPipeline": "kolors", "KolorsImg2ImgPipeline": "kolors", "StableVideoDiffusionPipeline": "video",
}
"""diffusers `model_index.json` `_class_name` -> the refused family it belongs to."""


def family_named(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def match_family(shapes: Shapes) -> Family:
    """The first family of the table whose signature matches these tensor names and shapes."""
    return next(f for f in FAMILIES if f.signature(shapes))


def refusal_message(family: Family) -> str:
    """What validation and the loader say about a refused family."""
    supported = "SD 1.x, SD 2.x, SDXL base and refiner (and their fine-tunes), the latent-diffusion paper's models"
    return (f"this is a {family.label} checkpoint: {family.refusal}. ldmgraph runs {supported}; "
            f"{family.label} is not supported (see docs/sdxl.md for the list)")


class UnsupportedFamilyError(UnknownArchitectureError):
    """The checkpoint is of a known family that ldmgraph does not run (SD3, Flux, ...); `family` names it."""

    def __init__(self, path: str | Path, family: Family) -> None:
        self.family = family.name
        super().__init__(path, refusal_message(family))


def refuse(path: str | Path, shapes: Shapes) -> Family:
    """The family of these tensors; raises `UnsupportedFamilyError` for a refused one."""
    family = match_family(shapes)
    if not family.supported:
        raise UnsupportedFamilyError(path, family)
    return family


def diffusers_family(model_index: Mapping[str, Any], has_transformer: bool) -> Family | None:
    """The refused family of a diffusers folder from its `model_index.json`, else None."""
    name = DIFFUSERS_PIPELINES.get(str(model_index.get("_class_name", "")))
    if name is not None:
        return family_named(name)
    if has_transformer:
        return Family("dit", "diffusion-transformer", lambda s: False, refusal=_DIT + " (a `transformer/` folder)")
    return None
