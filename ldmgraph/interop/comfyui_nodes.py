"""The one table of ComfyUI's core nodes: how each becomes an ldmgraph node, and how it is served.

`COMFYUI_NODES` drives two things. The importer (`ldmgraph.interop.comfyui`) reads each entry's
`our_type`, `inputs`, `outputs`, `widgets`, `convert` and `extra` to turn a ComfyUI graph into an
ldmgraph workflow. The server (`ldmgraph.server.protocol`) reads each entry's `shape` to answer
`/object_info` for the class exactly as ComfyUI declares it, so the editor and clients see the
widgets, bounds and outputs they know, and what they queue comes back here through the importer.
A class that is not in the table is not served: ldmgraph never lists a node it cannot honour.

The shapes are facts about ComfyUI 0.3.64 (input names, types, order, defaults, bounds, choices,
widget options, output types and names, category, display name, module), checked against its node
declarations; nothing of its code or prose is here (tooltips are left out; descriptions are ours).

Adding a ComfyUI class is adding one entry::

    "FreeU": NodeMapping(
        "FreeU", {"model": "model", "b1": "b1", "b2": "b2", "s1": "s1", "s2": "s2"}, ("model",),
        shape=ComfyShape(
            "model_patches/unet",
            (link("model", "MODEL"), widget("b1", "FLOAT", default=1.1, min=0.0, max=10.0, step=0.01), ...),
            ("MODEL",),
            python_module="comfy_extras.nodes_freelunch",
        ),
    ),

* `link(name, TYPE)` for an input that takes a connection, `widget(name, TYPE, **options)` for an
  INT / FLOAT / STRING / BOOLEAN widget, `choice(name, values)` for a list, `choice(name,
  Files(folder))` for a file list the server fills in, `seed(name)` for ComfyUI's 64-bit seed
  widget; each in ComfyUI's declaration order, with `optional=True` for its optional inputs.
  `declared=True` keeps ComfyUI's (empty once its tooltip is dropped) options object where the
  class declares one, so the served JSON has ComfyUI's exact form (`["MODEL", {}]` vs `["MODEL"]`).
* `widgets` and `seed_widgets` may be left out: they follow from the shape (the order in which the
  editor stores `widgets_values`). `tests/interop/test_comfyui_catalogue.py` checks every entry:
  a shape, outputs that match, widgets that match, and choices that ldmgraph accepts.
* Choices are served as far as ldmgraph honours them: a value that the mapped input of our node
  refuses is left out of the list (e.g. `bislerp`); `honoured=` restricts a widget that our node
  has no input for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldmgraph.graph.node import InputSpec, NodeSpec

SEED_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
"""The editor stores one extra widget value after a seed: what to do with it after each run."""

SEED_MAX = 0xFFFFFFFFFFFFFFFF
"""ComfyUI's seeds are unsigned 64-bit integers."""

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})
"""Scalar input types that the editor draws as widgets (a list of choices is one too)."""

COMFYUI_SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip
"""ComfyUI's sampler names in its order; the catalogue serves those ldmgraph's samplers accept."""

COMFYUI_SCHEDULERS = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)  # fmt: skip
"""ComfyUI's scheduler names in its order; served as far as ldmgraph's schedules accept them."""


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


# -- ComfyUI's side of an entry: what /object_info says about the class ---------------------------
@dataclass(frozen=True)
class Files:
    """A list of files the server has, filled in when the catalogue is served.

    `folder` is "input" (the input folder: uploads) or a model kind ("checkpoints", "vae",
    "controlnet", "loras", ...): ldmgraph looks for every model kind in its model folders.
    """

    folder: str


@dataclass(frozen=True)
class ComfyInput:
    """One input of a ComfyUI class, as its declaration gives it."""

    name: str
    type: str | tuple[Any, ...] | Files
    """A type name ("MODEL", "INT", ...), a tuple of choices, or a file list."""
    options: dict[str, Any] | None = None
    """ComfyUI's options object (default, min, max, step, ...); None where it declares none."""
    optional: bool = False
    honoured: tuple[Any, ...] | None = None
    """For a list that our node has no input for: the values ldmgraph honours (only those are served)."""

    @property
    def is_widget(self) -> bool:
        """The editor draws it as a widget and stores its value in `widgets_values`."""
        return not isinstance(self.type, str) or self.type in WIDGET_TYPES


def link(name: str, type_name: str, *, declared: bool = False, optional: bool = False) -> ComfyInput:
    """An input that takes a connection (MODEL, LATENT, ...)."""
    return ComfyInput(name, type_name, {} if declared else None, optional)


def widget(name: str, type_name: str, *, optional: bool = False, **options: Any) -> ComfyInput:
    """An INT / FLOAT / STRING / BOOLEAN widget with ComfyUI's options (default, min, max, step, ...)."""
    return ComfyInput(name, type_name, dict(options), optional)


def seed(name: str) -> ComfyInput:
    """ComfyUI's seed widget: 0..2^64-1, with the editor's "control after generate" companion."""
    return widget(name, "INT", default=0, min=0, max=SEED_MAX, control_after_generate=True)


def choice(
    name: str,
    values: tuple[Any, ...] | Files,
    *,
    declared: bool = False,
    optional: bool = False,
    honoured: tuple[Any, ...] | None = None,
    **options: Any,
) -> ComfyInput:
    """A list widget: ComfyUI's values (or a file list), served as far as ldmgraph honours them."""
    return ComfyInput(name, values, dict(options) if options or declared else None, optional, honoured)


@dataclass(frozen=True)
class ComfyShape:
    """A ComfyUI class as `/object_info` describes it (see `ldmgraph.server.protocol.comfy_node_info`)."""

    category: str
    inputs: tuple[ComfyInput, ...]
    """In declaration order, required then optional."""
    outputs: tuple[str, ...]
    """Output types, in order."""
    output_names: tuple[str, ...] | None = None
    """ComfyUI's output names where it declares them (otherwise the types are the names)."""
    display_name: str | None = ""
    """The editor's title; "" means the class name, None is served as null (ComfyUI's newer schema)."""
    description: str = ""
    python_module: str = "nodes"
    output_node: bool = False
    hidden: tuple[tuple[str, str], ...] = ()
    """Hidden inputs the server fills in (e.g. ("prompt", "PROMPT") on the nodes that save images)."""
    output_tooltips: bool | int = False
    """ComfyUI lists output tooltips for the class (we serve our own output descriptions); a number when
    it lists another count than its outputs (LoraLoaderModelOnly inherits LoraLoader's two)."""
    deprecated: bool = False
    schema_v3: bool = False
    """Declared with ComfyUI's newer node schema, whose info also carries deprecated / experimental /
    api_node flags and one output tooltip (null) per output."""

    def widget_names(self) -> tuple[str, ...]:
        """Names in `widgets_values` order; the editor adds an image upload's "upload" button last."""
        names = [item.name for item in self.inputs if item.is_widget]
        uploads = any((item.options or {}).get("image_upload") for item in self.inputs)
        return (*names, "upload") if uploads else tuple(names)

    def seed_names(self) -> frozenset[str]:
        return frozenset(i.name for i in self.inputs if (i.options or {}).get("control_after_generate"))


@dataclass(frozen=True)
class NodeMapping:
    """How one ComfyUI class becomes one ldmgraph node, and how the class is served."""

    our_type: str
    inputs: dict[str, str]
    """ComfyUI input name -> our input name (inputs not listed are dropped, e.g. upload buttons)."""
    outputs: tuple[str, ...]
    """Our output names, in ComfyUI's output order."""
    widgets: tuple[str, ...] = ()
    """ComfyUI widget names in `widgets_values` order (linked inputs such as MODEL are not widgets);
    left empty, they follow from `shape`."""
    seed_widgets: frozenset[str] = frozenset()
    """Widgets followed by the editor's extra "control after generate" value (default: from `shape`)."""
    convert: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    """Value converters by ComfyUI input name (e.g. "enable" -> True)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Literal inputs our node gets that ComfyUI's has no counterpart for."""
    wants_vae_geometry: bool = False
    """Our node takes an optional VAE to turn pixels into latent pixels (ComfyUI assumes a factor of 8)."""
    shape: ComfyShape | None = None
    """ComfyUI's declaration of the class: what `/object_info` serves. Every entry has one."""

    def __post_init__(self) -> None:
        if self.shape is not None and not self.widgets:
            object.__setattr__(self, "widgets", self.shape.widget_names())
        if self.shape is not None and not self.seed_widgets:
            object.__setattr__(self, "seed_widgets", self.shape.seed_names())


_CONDITIONING = "CONDITIONING"
_CUSTOM_SAMPLER = "comfy_extras.nodes_custom_sampler"
_CFG = {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}
_STEPS = {"default": 20, "min": 1, "max": 10000}
_SIGMA = {"min": 0.0, "max": 5000.0, "step": 0.01, "round": False}
_SAVES_GRAPH = (("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO"))
_LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")

COMFYUI_NODES: dict[str, NodeMapping] = {
    "CheckpointLoaderSimple": NodeMapping(
        "CheckpointLoader",
        {"ckpt_name": "ckpt_name"},
        ("model", "text_encoder", "vae"),
        ("ckpt_name",),
        shape=ComfyShape(
            "loaders",
            (choice("ckpt_name", Files("checkpoints"), declared=True),),
            ("MODEL", "CLIP", "VAE"),
            display_name="Load Checkpoint",
            description="Loads a checkpoint file: its denoising U-Net, its text encoder and its autoencoder.",
            output_tooltips=True,
        ),
    ),
    "VAELoader": NodeMapping(
        "VAELoader",
        {"vae_name": "vae_name"},
        ("vae",),
        ("vae_name",),
        shape=ComfyShape("loaders", (choice("vae_name", Files("vae")),), ("VAE",), display_name="Load VAE"),
    ),
    "ControlNetLoader": NodeMapping(
        "ControlNetLoader",
        {"control_net_name": "control_net_name"},
        ("control_net",),
        ("control_net_name",),
        shape=ComfyShape(
            "loaders",
            (choice("control_net_name", Files("controlnet")),),
            ("CONTROL_NET",),
            display_name="Load ControlNet Model",
        ),
    ),
    "ControlNetApply": NodeMapping(
        "ControlNetApply",
        {
            "conditioning": "conditioning",
            "control_net": "control_net",
            "image": "image",
            "strength": "strength",
        },
        ("conditioning",),
        ("strength",),
        shape=ComfyShape(
            "conditioning/controlnet",
            (
                link("conditioning", _CONDITIONING),
                link("control_net", "CONTROL_NET"),
                link("image", "IMAGE"),
                widget("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
            ),
            (_CONDITIONING,),
            display_name="Apply ControlNet (OLD)",
            deprecated=True,
        ),
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
        shape=ComfyShape(
            "conditioning/controlnet",
            (
                link("positive", _CONDITIONING),
                link("negative", _CONDITIONING),
                link("control_net", "CONTROL_NET"),
                link("image", "IMAGE"),
                widget("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
                widget("start_percent", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
                widget("end_percent", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001),
                link("vae", "VAE", optional=True),
            ),
            (_CONDITIONING, _CONDITIONING),
            output_names=("positive", "negative"),
            display_name="Apply ControlNet",
        ),
    ),
    "Canny": NodeMapping(
        "Canny",
        {"image": "image", "low_threshold": "low_threshold", "high_threshold": "high_threshold"},
        ("image",),
        ("low_threshold", "high_threshold"),
        shape=ComfyShape(
            "image/preprocessors",
            (
                link("image", "IMAGE", declared=True),
                widget("low_threshold", "FLOAT", default=0.4, min=0.01, max=0.99, step=0.01),
                widget("high_threshold", "FLOAT", default=0.8, min=0.01, max=0.99, step=0.01),
            ),
            ("IMAGE",),
            display_name=None,
            python_module="comfy_extras.nodes_canny",
            schema_v3=True,
        ),
    ),
    "CLIPTextEncode": NodeMapping(
        "TextEncode",
        {"text": "text", "clip": "text_encoder"},
        ("conditioning",),
        ("text",),
        # ComfyUI reads BREAK as a word, not as a new 75-token window, and [word] as text, not a weight
        extra={"breaks": False, "brackets": False},
        shape=ComfyShape(
            "conditioning",
            (
                widget("text", "STRING", multiline=True, dynamicPrompts=True),
                link("clip", "CLIP", declared=True),
            ),
            (_CONDITIONING,),
            display_name="CLIP Text Encode (Prompt)",
            description="Encodes a prompt with the checkpoint's text encoder into the conditioning that steers "
            "the denoiser.",
            output_tooltips=True,
        ),
    ),
    "EmptyLatentImage": NodeMapping(
        "EmptyLatent",
        {"width": "width", "height": "height", "batch_size": "batch_size"},
        ("latent",),
        ("width", "height", "batch_size"),
        wants_vae_geometry=True,
        shape=ComfyShape(
            "latent",
            (
                widget("width", "INT", default=512, min=16, max=16384, step=8),
                widget("height", "INT", default=512, min=16, max=16384, step=8),
                widget("batch_size", "INT", default=1, min=1, max=4096),
            ),
            ("LATENT",),
            display_name="Empty Latent Image",
            description="A batch of all-zero latents for images of the given size: where text-to-image "
            "sampling starts.",
            output_tooltips=True,
        ),
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
        shape=ComfyShape(
            "sampling",
            (
                link("model", "MODEL", declared=True),
                seed("seed"),
                widget("steps", "INT", **_STEPS),
                widget("cfg", "FLOAT", **_CFG),
                choice("sampler_name", COMFYUI_SAMPLERS, declared=True),
                choice("scheduler", COMFYUI_SCHEDULERS, declared=True),
                link("positive", _CONDITIONING, declared=True),
                link("negative", _CONDITIONING, declared=True),
                link("latent_image", "LATENT", declared=True),
                widget("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
            ),
            ("LATENT",),
            description="Denoises the latent with the model, guided by the positive and negative conditioning.",
            output_tooltips=True,
        ),
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
        shape=ComfyShape(
            "sampling",
            (
                link("model", "MODEL"),
                choice("add_noise", ("enable", "disable")),
                seed("noise_seed"),
                widget("steps", "INT", **_STEPS),
                widget("cfg", "FLOAT", **_CFG),
                choice("sampler_name", COMFYUI_SAMPLERS),
                choice("scheduler", COMFYUI_SCHEDULERS),
                link("positive", _CONDITIONING),
                link("negative", _CONDITIONING),
                link("latent_image", "LATENT"),
                widget("start_at_step", "INT", default=0, min=0, max=10000),
                widget("end_at_step", "INT", default=10000, min=0, max=10000),
                choice("return_with_leftover_noise", ("disable", "enable")),
            ),
            ("LATENT",),
            display_name="KSampler (Advanced)",
        ),
    ),
    # custom sampling (ComfyUI's comfy_extras module of that name): SIGMAS, SAMPLER, GUIDER, NOISE
    "KSamplerSelect": NodeMapping(
        "SamplerSelect",
        {"sampler_name": "sampler"},
        ("sampler",),
        ("sampler_name",),
        shape=ComfyShape(
            "sampling/custom_sampling/samplers",
            (choice("sampler_name", COMFYUI_SAMPLERS),),
            ("SAMPLER",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "SamplerEulerAncestral": NodeMapping(
        "SamplerSelect.euler_ancestral",
        {"eta": "eta", "s_noise": "s_noise"},
        ("sampler",),
        ("eta", "s_noise"),
        shape=ComfyShape(
            "sampling/custom_sampling/samplers",
            (
                widget("eta", "FLOAT", default=1.0, min=0.0, max=100.0, step=0.01, round=False),
                widget("s_noise", "FLOAT", default=1.0, min=0.0, max=100.0, step=0.01, round=False),
            ),
            ("SAMPLER",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "SamplerDPMPP_2M_SDE": NodeMapping(
        "SamplerSelect.dpmpp_2m_sde",
        {"solver_type": "solver_type", "eta": "eta", "s_noise": "s_noise"},
        ("sampler",),
        ("solver_type", "eta", "s_noise", "noise_device"),
        shape=ComfyShape(
            "sampling/custom_sampling/samplers",
            (
                choice("solver_type", ("midpoint", "heun")),
                widget("eta", "FLOAT", default=1.0, min=0.0, max=100.0, step=0.01, round=False),
                widget("s_noise", "FLOAT", default=1.0, min=0.0, max=100.0, step=0.01, round=False),
                # ldmgraph draws noise on the CPU, as ComfyUI's "cpu"; its GPU noise stream is another
                choice("noise_device", ("gpu", "cpu"), honoured=("cpu",)),
            ),
            ("SAMPLER",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "BasicScheduler": NodeMapping(
        "Scheduler",
        {"model": "model", "scheduler": "schedule", "steps": "steps", "denoise": "denoise"},
        ("sigmas",),
        ("scheduler", "steps", "denoise"),
        shape=ComfyShape(
            "sampling/custom_sampling/schedulers",
            (
                link("model", "MODEL"),
                choice("scheduler", COMFYUI_SCHEDULERS),
                widget("steps", "INT", **_STEPS),
                widget("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
            ),
            ("SIGMAS",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "KarrasScheduler": NodeMapping(
        "KarrasScheduler",
        {"steps": "steps", "sigma_max": "sigma_max", "sigma_min": "sigma_min", "rho": "rho"},
        ("sigmas",),
        ("steps", "sigma_max", "sigma_min", "rho"),
        shape=ComfyShape(
            "sampling/custom_sampling/schedulers",
            (
                widget("steps", "INT", **_STEPS),
                widget("sigma_max", "FLOAT", default=14.614642, **_SIGMA),
                widget("sigma_min", "FLOAT", default=0.0291675, **_SIGMA),
                widget("rho", "FLOAT", default=7.0, min=0.0, max=100.0, step=0.01, round=False),
            ),
            ("SIGMAS",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "ExponentialScheduler": NodeMapping(
        "ExponentialScheduler",
        {"steps": "steps", "sigma_max": "sigma_max", "sigma_min": "sigma_min"},
        ("sigmas",),
        ("steps", "sigma_max", "sigma_min"),
        shape=ComfyShape(
            "sampling/custom_sampling/schedulers",
            (
                widget("steps", "INT", **_STEPS),
                widget("sigma_max", "FLOAT", default=14.614642, **_SIGMA),
                widget("sigma_min", "FLOAT", default=0.0291675, **_SIGMA),
            ),
            ("SIGMAS",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "SplitSigmas": NodeMapping(
        "SplitSigmas",
        {"sigmas": "sigmas", "step": "step"},
        ("high_sigmas", "low_sigmas"),
        ("step",),
        shape=ComfyShape(
            "sampling/custom_sampling/sigmas",
            (link("sigmas", "SIGMAS"), widget("step", "INT", default=0, min=0, max=10000)),
            ("SIGMAS", "SIGMAS"),
            output_names=("high_sigmas", "low_sigmas"),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "FlipSigmas": NodeMapping(
        "FlipSigmas",
        {"sigmas": "sigmas"},
        ("sigmas",),
        shape=ComfyShape(
            "sampling/custom_sampling/sigmas",
            (link("sigmas", "SIGMAS"),),
            ("SIGMAS",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "CFGGuider": NodeMapping(
        "CFGGuider",
        {"model": "model", "positive": "positive", "negative": "negative", "cfg": "cfg"},
        ("guider",),
        ("cfg",),
        shape=ComfyShape(
            "sampling/custom_sampling/guiders",
            (
                link("model", "MODEL"),
                link("positive", _CONDITIONING),
                link("negative", _CONDITIONING),
                widget("cfg", "FLOAT", **_CFG),
            ),
            ("GUIDER",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "BasicGuider": NodeMapping(
        "BasicGuider",
        {"model": "model", "conditioning": "conditioning"},
        ("guider",),
        shape=ComfyShape(
            "sampling/custom_sampling/guiders",
            (link("model", "MODEL"), link("conditioning", _CONDITIONING)),
            ("GUIDER",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
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
        ("cfg_conds", "cfg_cond2_negative", "style"),
        shape=ComfyShape(
            "sampling/custom_sampling/guiders",
            (
                link("model", "MODEL"),
                link("cond1", _CONDITIONING),
                link("cond2", _CONDITIONING),
                link("negative", _CONDITIONING),
                widget("cfg_conds", "FLOAT", **_CFG),
                widget("cfg_cond2_negative", "FLOAT", **_CFG),
                # ldmgraph's guider is ComfyUI's "regular" formula; "nested" is not implemented
                choice("style", ("regular", "nested"), honoured=("regular",)),
            ),
            ("GUIDER",),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "RandomNoise": NodeMapping(
        "RandomNoise",
        {"noise_seed": "noise_seed"},
        ("noise",),
        ("noise_seed",),
        seed_widgets=frozenset({"noise_seed"}),
        extra=dict(COMFYUI_CONVENTION),
        shape=ComfyShape(
            "sampling/custom_sampling/noise", (seed("noise_seed"),), ("NOISE",), python_module=_CUSTOM_SAMPLER
        ),
    ),
    "DisableNoise": NodeMapping(
        "DisableNoise",
        {},
        ("noise",),
        extra=dict(COMFYUI_CONVENTION),
        shape=ComfyShape("sampling/custom_sampling/noise", (), ("NOISE",), python_module=_CUSTOM_SAMPLER),
    ),
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
        shape=ComfyShape(
            "sampling/custom_sampling",
            (
                link("model", "MODEL"),
                widget("add_noise", "BOOLEAN", default=True),
                seed("noise_seed"),
                widget("cfg", "FLOAT", **_CFG),
                link("positive", _CONDITIONING),
                link("negative", _CONDITIONING),
                link("sampler", "SAMPLER"),
                link("sigmas", "SIGMAS"),
                link("latent_image", "LATENT"),
            ),
            ("LATENT", "LATENT"),
            output_names=("output", "denoised_output"),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "SamplerCustomAdvanced": NodeMapping(
        "SamplerCustomAdvanced",
        {
            "noise": "noise",
            "guider": "guider",
            "sampler": "sampler",
            "sigmas": "sigmas",
            "latent_image": "latent",
        },
        ("output", "denoised_output"),
        shape=ComfyShape(
            "sampling/custom_sampling",
            (
                link("noise", "NOISE"),
                link("guider", "GUIDER"),
                link("sampler", "SAMPLER"),
                link("sigmas", "SIGMAS"),
                link("latent_image", "LATENT"),
            ),
            ("LATENT", "LATENT"),
            output_names=("output", "denoised_output"),
            python_module=_CUSTOM_SAMPLER,
        ),
    ),
    "VAEEncode": NodeMapping(
        "VAEEncode",
        {"pixels": "image", "vae": "vae"},
        ("latent",),
        shape=ComfyShape(
            "latent", (link("pixels", "IMAGE"), link("vae", "VAE")), ("LATENT",), display_name="VAE Encode"
        ),
    ),
    "VAEDecode": NodeMapping(
        "VAEDecode",
        {"samples": "latent", "vae": "vae"},
        ("image",),
        shape=ComfyShape(
            "latent",
            (link("samples", "LATENT", declared=True), link("vae", "VAE", declared=True)),
            ("IMAGE",),
            display_name="VAE Decode",
            description="Turns latents back into pixels with the autoencoder's decoder.",
            output_tooltips=True,
        ),
    ),
    "VAEEncodeForInpaint": NodeMapping(
        "VAEEncodeForInpaint",
        {"pixels": "image", "vae": "vae", "mask": "mask", "grow_mask_by": "grow_mask_by"},
        ("latent",),
        ("grow_mask_by",),
        shape=ComfyShape(
            "latent/inpaint",
            (
                link("pixels", "IMAGE"),
                link("vae", "VAE"),
                link("mask", "MASK"),
                widget("grow_mask_by", "INT", default=6, min=0, max=64, step=1),
            ),
            ("LATENT",),
            display_name="VAE Encode (for Inpainting)",
        ),
    ),
    "SetLatentNoiseMask": NodeMapping(
        "SetLatentNoiseMask",
        {"samples": "latent", "mask": "mask"},
        ("latent",),
        shape=ComfyShape(
            "latent/inpaint",
            (link("samples", "LATENT"), link("mask", "MASK")),
            ("LATENT",),
            display_name="Set Latent Noise Mask",
        ),
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
        shape=ComfyShape(
            "conditioning/inpaint",
            (
                link("positive", _CONDITIONING),
                link("negative", _CONDITIONING),
                link("vae", "VAE"),
                link("pixels", "IMAGE"),
                link("mask", "MASK"),
                widget("noise_mask", "BOOLEAN", default=True),
            ),
            (_CONDITIONING, _CONDITIONING, "LATENT"),
            output_names=("positive", "negative", "latent"),
        ),
    ),
    "ConditioningCombine": NodeMapping(
        "ConditioningCombine",
        {"conditioning_1": "conditioning_1", "conditioning_2": "conditioning_2"},
        ("conditioning",),
        shape=ComfyShape(
            "conditioning",
            (link("conditioning_1", _CONDITIONING), link("conditioning_2", _CONDITIONING)),
            (_CONDITIONING,),
            display_name="Conditioning (Combine)",
        ),
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
        shape=ComfyShape(
            "conditioning",
            (
                link("conditioning_to", _CONDITIONING),
                link("conditioning_from", _CONDITIONING),
                widget("conditioning_to_strength", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
            ),
            (_CONDITIONING,),
        ),
    ),
    "ConditioningConcat": NodeMapping(
        "ConditioningConcat",
        {"conditioning_to": "conditioning_to", "conditioning_from": "conditioning_from"},
        ("conditioning",),
        shape=ComfyShape(
            "conditioning",
            (link("conditioning_to", _CONDITIONING), link("conditioning_from", _CONDITIONING)),
            (_CONDITIONING,),
            display_name="Conditioning (Concat)",
        ),
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
        shape=ComfyShape(
            "conditioning",
            (
                link("conditioning", _CONDITIONING),
                widget("width", "INT", default=64, min=64, max=16384, step=8),
                widget("height", "INT", default=64, min=64, max=16384, step=8),
                widget("x", "INT", default=0, min=0, max=16384, step=8),
                widget("y", "INT", default=0, min=0, max=16384, step=8),
                widget("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
            ),
            (_CONDITIONING,),
            display_name="Conditioning (Set Area)",
        ),
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
        shape=ComfyShape(
            "latent",
            (
                link("samples", "LATENT"),
                choice("upscale_method", _LATENT_METHODS),
                widget("width", "INT", default=512, min=0, max=16384, step=8),
                widget("height", "INT", default=512, min=0, max=16384, step=8),
                choice("crop", ("disabled", "center")),
            ),
            ("LATENT",),
            display_name="Upscale Latent",
        ),
    ),
    "LatentUpscaleBy": NodeMapping(
        "LatentUpscaleBy",
        {"samples": "latent", "upscale_method": "method", "scale_by": "scale_by"},
        ("latent",),
        ("upscale_method", "scale_by"),
        shape=ComfyShape(
            "latent",
            (
                link("samples", "LATENT"),
                choice("upscale_method", _LATENT_METHODS),
                widget("scale_by", "FLOAT", default=1.5, min=0.01, max=8.0, step=0.01),
            ),
            ("LATENT",),
            display_name="Upscale Latent By",
        ),
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
        shape=ComfyShape(
            "image/upscaling",
            (
                link("image", "IMAGE"),
                choice("upscale_method", ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")),
                widget("width", "INT", default=512, min=0, max=16384, step=1),
                widget("height", "INT", default=512, min=0, max=16384, step=1),
                choice("crop", ("disabled", "center")),
            ),
            ("IMAGE",),
            display_name="Upscale Image",
        ),
    ),
    "LoadImage": NodeMapping(
        "LoadImage",
        {"image": "image"},
        ("image", "mask"),
        ("image", "upload"),
        shape=ComfyShape(
            "image",
            (choice("image", Files("input"), image_upload=True),),
            ("IMAGE", "MASK"),
            display_name="Load Image",
        ),
    ),
    "SaveImage": NodeMapping(
        "SaveImage",
        {"images": "images", "filename_prefix": "filename_prefix"},
        (),
        ("filename_prefix",),
        extra={"quantize": "truncate"},  # ComfyUI writes clip(255 x) truncated to uint8
        shape=ComfyShape(
            "image",
            (link("images", "IMAGE", declared=True), widget("filename_prefix", "STRING", default="ComfyUI")),
            (),
            display_name="Save Image",
            description="Writes the images as PNG files, with the graph that made them, into the output folder.",
            output_node=True,
            hidden=_SAVES_GRAPH,
        ),
    ),
    "PreviewImage": NodeMapping(
        "PreviewImage",
        {"images": "images"},
        (),
        extra={"quantize": "truncate"},  # as ComfyUI's clip(255 x)
        shape=ComfyShape(
            "image",
            (link("images", "IMAGE"),),
            (),
            display_name="Preview Image",
            description="Shows the images in the editor; they go to the temporary folder, not the output folder.",
            output_node=True,
            hidden=_SAVES_GRAPH,
        ),
    ),
    "SaveImageWebsocket": NodeMapping(
        "SaveImageWebsocket",
        {"images": "images"},
        (),
        extra={"quantize": "truncate"},  # as ComfyUI's clip(255 x)
        shape=ComfyShape(
            "api/image",
            (link("images", "IMAGE"),),
            (),
            output_node=True,
            python_module="custom_nodes.websocket_image_save",
        ),
    ),
    "CLIPTextEncodeSDXL": NodeMapping(
        "CLIPTextEncodeSDXL",
        {"clip": "text_encoder", **{n: n for n in ("width", "height", "crop_w", "crop_h", "target_width",
                                                   "target_height", "text_g", "text_l")}},
        ("conditioning",),
        shape=ComfyShape(
            "advanced/conditioning",
            (
                link("clip", "CLIP", declared=True),
                *(
                    widget(n, "INT", default=d, min=0, max=16384)
                    for n, d in (
                        ("width", 1024),
                        ("height", 1024),
                        ("crop_w", 0),
                        ("crop_h", 0),
                        ("target_width", 1024),
                        ("target_height", 1024),
                    )
                ),
                widget("text_g", "STRING", multiline=True, dynamicPrompts=True),
                widget("text_l", "STRING", multiline=True, dynamicPrompts=True),
            ),
            (_CONDITIONING,),
            display_name=None,
            python_module="comfy_extras.nodes_clip_sdxl",
            schema_v3=True,
        ),
    ),
    "CLIPTextEncodeSDXLRefiner": NodeMapping(
        "CLIPTextEncodeSDXLRefiner",
        {"ascore": "ascore", "width": "width", "height": "height", "text": "text", "clip": "text_encoder"},
        ("conditioning",),
        shape=ComfyShape(
            "advanced/conditioning",
            (
                widget("ascore", "FLOAT", default=6.0, min=0.0, max=1000.0, step=0.01),
                widget("width", "INT", default=1024, min=0, max=16384),
                widget("height", "INT", default=1024, min=0, max=16384),
                widget("text", "STRING", multiline=True, dynamicPrompts=True),
                link("clip", "CLIP", declared=True),
            ),
            (_CONDITIONING,),
            display_name=None,
            python_module="comfy_extras.nodes_clip_sdxl",
            schema_v3=True,
        ),
    ),
    # LoRA and model patches (ldmgraph/nodes/lora.py, ldmgraph/nodes/patches.py)
    "LoraLoader": NodeMapping(
        "LoraLoader",
        {"model": "model", "clip": "text_encoder", "lora_name": "lora_name", "strength_model": "strength_model",
         "strength_clip": "strength_clip"},
        ("model", "text_encoder"),
        shape=ComfyShape(
            "loaders",
            (
                link("model", "MODEL", declared=True),
                link("clip", "CLIP", declared=True),
                choice("lora_name", Files("loras"), declared=True),
                widget("strength_model", "FLOAT", default=1.0, min=-100.0, max=100.0, step=0.01),
                widget("strength_clip", "FLOAT", default=1.0, min=-100.0, max=100.0, step=0.01),
            ),
            ("MODEL", "CLIP"),
            display_name="Load LoRA",
            description="Patches a diffusion model and its text encoder with a LoRA file (no copy of the model).",
            output_tooltips=True,
        ),
    ),
    "LoraLoaderModelOnly": NodeMapping(
        "LoraLoaderModelOnly",
        {"model": "model", "lora_name": "lora_name", "strength_model": "strength_model"},
        ("model",),
        shape=ComfyShape(
            "loaders",
            (
                link("model", "MODEL"),
                choice("lora_name", Files("loras")),
                widget("strength_model", "FLOAT", default=1.0, min=-100.0, max=100.0, step=0.01),
            ),
            ("MODEL",),
            description="Patches a diffusion model with a LoRA file (its text-encoder keys are left aside).",
            output_tooltips=2,  # ComfyUI's class inherits LoraLoader's two output tooltips
        ),
    ),
    **{
        name: NodeMapping(
            name, {"model": "model", "b1": "b1", "b2": "b2", "s1": "s1", "s2": "s2"}, ("model",),
            extra={"rule": "channels"},  # ComfyUI picks FreeU's blocks by their backbone width
            shape=ComfyShape(
                "model_patches/unet",
                (
                    link("model", "MODEL"),
                    *(widget(n, "FLOAT", default=d, min=0.0, max=10.0, step=0.01)
                      for n, d in zip(("b1", "b2", "s1", "s2"), defaults, strict=True)),
                ),
                ("MODEL",),
                python_module="comfy_extras.nodes_freelunch",
            ),
        )
        for name, defaults in (("FreeU", (1.1, 1.2, 0.9, 0.2)), ("FreeU_V2", (1.3, 1.4, 0.9, 0.2)))
    },
}
"""ComfyUI class -> our node. `CLIPSetLastLayer` is not here: it folds into `TextEncode.clip_skip`."""

PASS_THROUGH_CLASSES = frozenset({"CLIPSetLastLayer"})
"""Classes that vanish on import: their effect moves into the nodes downstream."""

PASS_THROUGH_SHAPES: dict[str, ComfyShape] = {
    "CLIPSetLastLayer": ComfyShape(
        "conditioning",
        (link("clip", "CLIP"), widget("stop_at_clip_layer", "INT", default=-1, min=-24, max=-1, step=1)),
        ("CLIP",),
        display_name="CLIP Set Last Layer",
    ),
}
"""How the pass-through classes are served: the editor draws and queues them like any other class."""

UNMAPPED_COMFYUI_CLASSES = frozenset(
    {
        "CheckpointLoader",
        "ConditioningZeroOut",
        "ImageBlend",
        "ImageCompositeMasked",
        "ImageCrop",
        "ImageInvert",
        "ImagePadForOutpaint",
        "ImageScaleBy",
        "LatentFromBatch",
        "ModelSamplingDiscrete",
        "RepeatLatentBatch",
    }
)
"""ComfyUI core classes that the table does not map but whose names ldmgraph's own node types use.
The catalogue serves those node types as `ldmgraph.<name>`, so that no ComfyUI class name describes
a node of another shape; a row added to the table for one of them takes its name off this list."""

EDITOR_ONLY_CLASSES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
"""Classes that exist only in the editor's UI format, never in the API format."""

VAE_SOURCES = ("VAELoader", "CheckpointLoaderSimple")
"""Where an imported EmptyLatent / LatentUpscale takes its latent geometry from, in preference order."""


# -- ldmgraph's own node types, as the editor shows them beside ComfyUI's classes -------------------
NATIVE_PREFIX = "ldmgraph."
"""An ldmgraph node type named like a ComfyUI class is shown as `ldmgraph.<name>`."""

SEED_INPUTS = frozenset({"seed", "noise_seed"})
"""ldmgraph's INT inputs that the editor draws as seeds (followed by "control after generate")."""

UPLOAD_INPUTS = frozenset({("LoadImage", "image"), ("LoadMask", "image")})
"""ldmgraph's inputs that name an uploaded file: the editor adds an "upload" button widget to the node."""


def taken_names() -> frozenset[str]:
    """ComfyUI class names, which ldmgraph's own node types do not use in the editor."""
    return frozenset(COMFYUI_NODES) | PASS_THROUGH_CLASSES | UNMAPPED_COMFYUI_CLASSES


def served_name(type_name: str) -> str:
    """The editor's name of an ldmgraph node type: its own, unless a ComfyUI class has that name."""
    return NATIVE_PREFIX + type_name if type_name in taken_names() else type_name


def native_name(class_type: str) -> str:
    """The ldmgraph node type behind an editor name (the inverse of `served_name`)."""
    bare = class_type[len(NATIVE_PREFIX) :] if class_type.startswith(NATIVE_PREFIX) else None
    return bare if bare is not None and bare in taken_names() else class_type


def editor_required(item: InputSpec) -> bool:
    """ComfyUI's "required" means "always has a value": declared required, or a widget with a default."""
    return item.required or (item.socket.literal and item.default is not None)


def native_mapping(spec: NodeSpec) -> NodeMapping:
    """An ldmgraph node type mapped to itself, with the widget order in which the editor draws it
    (required inputs first, then optional ones; a seed's "control after generate"; an upload button last)
    and so stores its `widgets_values`: what lets the importer read a graph saved from the editor that
    uses ldmgraph's own nodes."""
    ordered = sorted(spec.inputs.values(), key=lambda item: not editor_required(item))
    widgets = [item.name for item in ordered if item.socket.literal]
    if any((spec.type_name, name) in UPLOAD_INPUTS for name in widgets):
        widgets.append("upload")  # the editor adds the upload button after the node's other widgets
    seeds = frozenset(i.name for i in ordered if i.socket.name == "INT" and i.name in SEED_INPUTS)
    return NodeMapping(spec.type_name, {n: n for n in spec.inputs}, tuple(spec.outputs), tuple(widgets), seeds)
