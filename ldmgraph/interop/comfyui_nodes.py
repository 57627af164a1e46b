"""The table that maps ComfyUI's core nodes onto ldmgraph's nodes.

Each entry says which of our node types a ComfyUI class becomes, how its input names translate, what
its outputs are called here (ComfyUI addresses outputs by index, we by name), and the order of its
widgets, which is how the editor's UI format stores literal values (`widgets_values`, by position).
Input orders are those of ComfyUI's node declarations; they are facts about
the file format, nothing of ComfyUI's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SEED_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
"""The editor stores one extra widget value after a seed: what to do with it after each run."""


def _enable_flag(value: Any) -> Any:
    """ComfyUI's "enable"/"disable" combo becomes our BOOLEAN."""
    if isinstance(value, str) and value in ("enable", "disable"):
        return value == "enable"
    return value


def _image_filter(value: Any) -> Any:
    """ComfyUI's image filter names onto ours (Pillow filters): "nearest-exact" is our "nearest"."""
    return "nearest" if value == "nearest-exact" else value


COMFYUI_CONVENTION: dict[str, Any] = {"convention": "comfyui"}
"""Set on every imported node that draws noise: ComfyUI's batch and ancestral noise and its
integer timesteps (see ldmgraph/diffusion/noise.py), so an imported graph gives ComfyUI's images."""


@dataclass(frozen=True)
class NodeMapping:
    """How one ComfyUI class becomes one ldmgraph node."""

    our_type: str
    inputs: dict[str, str]
    """ComfyUI input name -> our input name (inputs not listed are dropped, e.g. upload buttons)."""
    outputs: tuple[str, ...]
    """Our output names, in ComfyUI's output order."""
    widgets: tuple[str, ...] = ()
    """ComfyUI widget names in `widgets_values` order (linked inputs such as MODEL are not widgets)."""
    seed_widgets: frozenset[str] = frozenset()
    """Widgets followed by the editor's extra "control after generate" value."""
    convert: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    """Value converters by ComfyUI input name (e.g. "enable" -> True)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Literal inputs our node gets that ComfyUI's has no counterpart for."""
    wants_vae_geometry: bool = False
    """Our node takes an optional VAE to turn pixels into latent pixels (ComfyUI assumes a factor of 8)."""


COMFYUI_NODES: dict[str, NodeMapping] = {
    "CheckpointLoaderSimple": NodeMapping(
        "CheckpointLoader", {"ckpt_name": "ckpt_name"}, ("model", "text_encoder", "vae"), ("ckpt_name",)
    ),
    "VAELoader": NodeMapping("VAELoader", {"vae_name": "vae_name"}, ("vae",), ("vae_name",)),
    "ControlNetLoader": NodeMapping(
        "ControlNetLoader", {"control_net_name": "control_net_name"}, ("control_net",), ("control_net_name",)
    ),
    "ControlNetApply": NodeMapping(
        "ControlNetApply",
        {"conditioning": "conditioning", "control_net": "control_net", "image": "image", "strength": "strength"},
        ("conditioning",),
        ("strength",),
    ),
    "ControlNetApplyAdvanced": NodeMapping(
        "ControlNetApplyAdvanced",
        {
            "positive": "positive",
            "negative": "negative",
            "control_net": "control_net",
            "image": "image",
            "strength": "strength",
            "start_percent": "start_percent",
            "end_percent": "end_percent",
        },
        ("positive", "negative"),
        ("strength", "start_percent", "end_percent"),
    ),
    "Canny": NodeMapping(
        "Canny",
        {"image": "image", "low_threshold": "low_threshold", "high_threshold": "high_threshold"},
        ("image",),
        ("low_threshold", "high_threshold"),
    ),
    "CLIPTextEncode": NodeMapping(
        "TextEncode", {"text": "text", "clip": "text_encoder"}, ("conditioning",), ("text",)
    ),
    "EmptyLatentImage": NodeMapping(
        "EmptyLatent",
        {"width": "width", "height": "height", "batch_size": "batch_size"},
        ("latent",),
        ("width", "height", "batch_size"),
        wants_vae_geometry=True,
    ),
    "KSampler": NodeMapping(
        "Sampler",
        {
            "model": "model",
            "seed": "seed",
            "steps": "steps",
            "cfg": "cfg",
            "sampler_name": "sampler",
            "scheduler": "schedule",
            "positive": "positive",
            "negative": "negative",
            "latent_image": "latent",
            "denoise": "denoise",
        },
        ("latent",),
        ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
        seed_widgets=frozenset({"seed"}),
        extra=dict(COMFYUI_CONVENTION),
    ),
    "KSamplerAdvanced": NodeMapping(
        "SamplerAdvanced",
        {
            "model": "model",
            "add_noise": "add_noise",
            "noise_seed": "seed",
            "steps": "steps",
            "cfg": "cfg",
            "sampler_name": "sampler",
            "scheduler": "schedule",
            "positive": "positive",
            "negative": "negative",
            "latent_image": "latent",
            "start_at_step": "start_step",
            "end_at_step": "end_step",
            "return_with_leftover_noise": "return_with_leftover_noise",
        },
        ("latent",),
        (
            "add_noise",
            "noise_seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        ),
        seed_widgets=frozenset({"noise_seed"}),
        convert={"add_noise": _enable_flag, "return_with_leftover_noise": _enable_flag},
        extra=dict(COMFYUI_CONVENTION),
    ),
    # custom sampling (comfy_extras/nodes_custom_sampler.py): SIGMAS, SAMPLER, GUIDER, NOISE
    "KSamplerSelect": NodeMapping("SamplerSelect", {"sampler_name": "sampler"}, ("sampler",), ("sampler_name",)),
    "SamplerEulerAncestral": NodeMapping(
        "SamplerSelect.euler_ancestral", {"eta": "eta", "s_noise": "s_noise"}, ("sampler",), ("eta", "s_noise")
    ),
    "SamplerDPMPP_2M_SDE": NodeMapping(
        "SamplerSelect.dpmpp_2m_sde",
        {"solver_type": "solver_type", "eta": "eta", "s_noise": "s_noise"},
        ("sampler",),
        ("solver_type", "eta", "s_noise", "noise_device"),
    ),
    "BasicScheduler": NodeMapping(
        "Scheduler",
        {"model": "model", "scheduler": "schedule", "steps": "steps", "denoise": "denoise"},
        ("sigmas",),
        ("scheduler", "steps", "denoise"),
    ),
    "KarrasScheduler": NodeMapping(
        "KarrasScheduler",
        {"steps": "steps", "sigma_max": "sigma_max", "sigma_min": "sigma_min", "rho": "rho"},
        ("sigmas",),
        ("steps", "sigma_max", "sigma_min", "rho"),
    ),
    "ExponentialScheduler": NodeMapping(
        "ExponentialScheduler",
        {"steps": "steps", "sigma_max": "sigma_max", "sigma_min": "sigma_min"},
        ("sigmas",),
        ("steps", "sigma_max", "sigma_min"),
    ),
    "SplitSigmas": NodeMapping(
        "SplitSigmas", {"sigmas": "sigmas", "step": "step"}, ("high_sigmas", "low_sigmas"), ("step",)
    ),
    "FlipSigmas": NodeMapping("FlipSigmas", {"sigmas": "sigmas"}, ("sigmas",)),
    "CFGGuider": NodeMapping(
        "CFGGuider",
        {"model": "model", "positive": "positive", "negative": "negative", "cfg": "cfg"},
        ("guider",),
        ("cfg",),
    ),
    "BasicGuider": NodeMapping("BasicGuider", {"model": "model", "conditioning": "conditioning"}, ("guider",)),
    "DualCFGGuider": NodeMapping(
        "DualCFGGuider",
        {
            "model": "model",
            "cond1": "cond1",
            "cond2": "cond2",
            "negative": "negative",
            "cfg_conds": "cfg_conds",
            "cfg_cond2_negative": "cfg_cond2_negative",
        },
        ("guider",),
        ("cfg_conds", "cfg_cond2_negative"),
    ),
    "RandomNoise": NodeMapping(
        "RandomNoise",
        {"noise_seed": "noise_seed"},
        ("noise",),
        ("noise_seed",),
        seed_widgets=frozenset({"noise_seed"}),
        extra=dict(COMFYUI_CONVENTION),
    ),
    "DisableNoise": NodeMapping("DisableNoise", {}, ("noise",), extra=dict(COMFYUI_CONVENTION)),
    "SamplerCustom": NodeMapping(
        "SamplerCustom",
        {
            "model": "model",
            "add_noise": "add_noise",
            "noise_seed": "noise_seed",
            "cfg": "cfg",
            "positive": "positive",
            "negative": "negative",
            "sampler": "sampler",
            "sigmas": "sigmas",
            "latent_image": "latent",
        },
        ("output", "denoised_output"),
        ("add_noise", "noise_seed", "cfg"),
        seed_widgets=frozenset({"noise_seed"}),
        convert={"add_noise": _enable_flag},
        extra=dict(COMFYUI_CONVENTION),
    ),
    "SamplerCustomAdvanced": NodeMapping(
        "SamplerCustomAdvanced",
        {"noise": "noise", "guider": "guider", "sampler": "sampler", "sigmas": "sigmas", "latent_image": "latent"},
        ("output", "denoised_output"),
    ),
    "VAEEncode": NodeMapping("VAEEncode", {"pixels": "image", "vae": "vae"}, ("latent",)),
    "VAEDecode": NodeMapping("VAEDecode", {"samples": "latent", "vae": "vae"}, ("image",)),
    "VAEEncodeForInpaint": NodeMapping(
        "VAEEncodeForInpaint",
        {"pixels": "image", "vae": "vae", "mask": "mask", "grow_mask_by": "grow_mask_by"},
        ("latent",),
        ("grow_mask_by",),
    ),
    "SetLatentNoiseMask": NodeMapping(
        "SetLatentNoiseMask", {"samples": "latent", "mask": "mask"}, ("latent",)
    ),
    "InpaintModelConditioning": NodeMapping(
        "InpaintConditioning",
        {
            "positive": "positive",
            "negative": "negative",
            "vae": "vae",
            "pixels": "image",
            "mask": "mask",
            "noise_mask": "noise_mask",
        },
        ("positive", "negative", "latent"),
        ("noise_mask",),
        extra={"layout": "sd"},
    ),
    "ConditioningCombine": NodeMapping(
        "ConditioningCombine",
        {"conditioning_1": "conditioning_1", "conditioning_2": "conditioning_2"},
        ("conditioning",),
    ),
    "ConditioningAverage": NodeMapping(
        "ConditioningAverage",
        {
            "conditioning_to": "conditioning_to",
            "conditioning_from": "conditioning_from",
            "conditioning_to_strength": "to_strength",
        },
        ("conditioning",),
        ("conditioning_to_strength",),
    ),
    "ConditioningConcat": NodeMapping(
        "ConditioningConcat",
        {"conditioning_to": "conditioning_to", "conditioning_from": "conditioning_from"},
        ("conditioning",),
    ),
    "ConditioningSetArea": NodeMapping(
        "ConditioningSetArea",
        {
            "conditioning": "conditioning",
            "width": "width",
            "height": "height",
            "x": "x",
            "y": "y",
            "strength": "strength",
        },
        ("conditioning",),
        ("width", "height", "x", "y", "strength"),
        wants_vae_geometry=True,
    ),
    "LatentUpscale": NodeMapping(
        "LatentUpscale",
        {
            "samples": "latent",
            "upscale_method": "method",
            "width": "width",
            "height": "height",
            "crop": "crop",
        },
        ("latent",),
        ("upscale_method", "width", "height", "crop"),
        wants_vae_geometry=True,
    ),
    "LatentUpscaleBy": NodeMapping(
        "LatentUpscaleBy",
        {"samples": "latent", "upscale_method": "method", "scale_by": "scale_by"},
        ("latent",),
        ("upscale_method", "scale_by"),
    ),
    "ImageScale": NodeMapping(
        "ImageScale",
        {
            "image": "image",
            "upscale_method": "upscale_method",
            "width": "width",
            "height": "height",
            "crop": "crop",
        },
        ("image",),
        ("upscale_method", "width", "height", "crop"),
        convert={"upscale_method": _image_filter},
    ),
    "LoadImage": NodeMapping("LoadImage", {"image": "image"}, ("image", "mask"), ("image", "upload")),
    "SaveImage": NodeMapping(
        "SaveImage",
        {"images": "images", "filename_prefix": "filename_prefix"},
        (),
        ("filename_prefix",),
        extra={"quantize": "truncate"},  # ComfyUI writes clip(255 x) truncated to uint8
    ),
    "PreviewImage": NodeMapping("PreviewImage", {"images": "images"}, ()),
    "SaveImageWebsocket": NodeMapping(
        "SaveImageWebsocket", {"images": "images"}, (), extra={"quantize": "truncate"}  # as ComfyUI's clip(255 x)
    ),
}
"""ComfyUI class -> our node. `CLIPSetLastLayer` is not here: it folds into `TextEncode.clip_skip`."""

PASS_THROUGH_CLASSES = frozenset({"CLIPSetLastLayer"})
"""Classes that vanish on import: their effect moves into the nodes downstream."""

EDITOR_ONLY_CLASSES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
"""Classes that exist only in the editor's UI format, never in the API format."""

VAE_SOURCES = ("VAELoader", "CheckpointLoaderSimple")
"""Where an imported EmptyLatent / LatentUpscale takes its latent geometry from, in preference order."""
