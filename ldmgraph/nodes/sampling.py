"""Sampling nodes: the convenience samplers, and sampling from its parts (SIGMAS, SAMPLER,
GUIDER, NOISE) as ComfyUI's custom-sampling nodes build it.

Everything runs through `ldmgraph.diffusion.sampling.run_sampling`: `Sampler` and
`SamplerAdvanced` build the same guider, sampler, noise and sigmas that a `SamplerCustomAdvanced`
graph wires by hand, so the two give the same latent bit for bit. Noise is drawn on the CPU from
the seed by a named convention ("ldmgraph": image k of a batch uses seed + k; "comfyui": one
generator for the batch, integer timesteps; "diffusers": a pipeline's one generator, which first
samples the VAE posterior of an encoded image as diffusers' img2img does), classifier-free guidance is D = D_neg + cfg (D_pos -
D_neg) (Ho & Salimans 2022), and `denoise` < 1 runs the tail of a longer schedule (img2img,
SDEdit, Meng et al. 2022). Each step reports progress through the node context, which is also
where cancellation is checked, with a latent preview when the run asked for previews. The device is the node's choice, else the run's `--device`, else
CUDA, then MPS, then the CPU. A sampler's own options are inputs of its `SamplerSelect.<name>`
node, made from the options the sampler declares (ldmgraph/diffusion/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import create_model

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs, codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import (
    BOOLEAN,
    CONDITIONING,
    ENUM,
    FLOAT,
    GUIDER,
    INT,
    LATENT,
    MODEL,
    NOISE,
    SAMPLER,
    SIGMAS,
    Socket,
)
from ldmgraph.nodes.common import DEVICES, device_problem, pick_device, step_reporter
from ldmgraph.plugins import hookimpl

MAX_SEED = 2**64 - 1
CONVENTIONS = ("ldmgraph", "comfyui", "diffusers")  # ldmgraph.diffusion.noise.CONVENTIONS, without torch
START_NOISE = ("auto", "sigma", "vp")


def _convention_field() -> Any:
    return InputField(
        ENUM,
        "ldmgraph",
        choices=CONVENTIONS,
        description="noise and rounding convention: ldmgraph (image k = seed + k), comfyui "
        "(one generator for the batch, ancestral noise from a fresh generator, integer timesteps) or "
        "diffusers (a pipeline's one generator: a VAEEncode posterior sample first, then the noise)",
    )


def _start_noise_field() -> Any:
    return InputField(
        ENUM,
        "auto",
        choices=START_NOISE,
        description="starting noise scale: auto = sqrt(1 + sigma^2) at the model's largest sigma, "
        "else sigma; sigma = always sigma (diffusers' Euler/Heun/LMS); vp = always sqrt(1 + sigma^2) "
        "(diffusers' DDIM/PNDM/DDPM/DPM-Solver/UniPC)",
    )


def _device_field() -> Any:
    return InputField(
        ENUM, "auto", choices=list(DEVICES),
        description="where the latents and the sampler's arithmetic live; auto: CUDA > MPS > CPU, where the "
        "loaders put the model (the model computes where it was loaded)",
    )


def _run(ctx: NodeContext, guider: Any, sampler: Any, sigmas: Any, latent: Any, noise: Any, device: str) -> Any:
    from ldmgraph.diffusion.sampling import run_sampling
    from ldmgraph.models.patches import in_use

    ctx.check_cancelled()
    total = max(1, len(sigmas) - 1)
    model = getattr(guider, "model", None)
    with in_use(model):  # a patched model (LoRA, FreeU, ...) is patched once for the whole run
        return run_sampling(
            guider, sampler, sigmas, latent, noise, device=pick_device(device, ctx),
            callback=step_reporter(ctx, total, model),
        )


# ---------------------------------------------------------------- convenience samplers


class _SamplerInputs(NodeInputs):
    model: Any = InputField(MODEL, description="the diffusion model")
    positive: Any = InputField(CONDITIONING, description="what the image should show")
    negative: Any = InputField(CONDITIONING, description="what to steer away from (used when cfg != 1)")
    latent: Any = InputField(LATENT, description="starting latent: empty for txt2img, encoded for img2img")
    seed: int = InputField(INT, 0, ge=0, le=MAX_SEED, description="noise seed (image k of a batch uses seed + k)")
    steps: int = InputField(INT, 20, ge=1, le=10000, description="sampling steps")
    cfg: float = InputField(FLOAT, 7.0, ge=0.0, le=100.0, description="classifier-free guidance scale")
    sampler: str = InputField(ENUM, "euler", choices_from="samplers", description="solver (default options)")
    schedule: str = InputField(ENUM, "normal", choices_from="schedules", description="sigma schedule")
    convention: str = _convention_field()
    start_noise: str = _start_noise_field()
    device: str = _device_field()


def _parts(inputs: Any, ctx: NodeContext, sigmas_args: dict[str, Any], add_noise: bool = True) -> tuple:
    """The guider, sampler, sigmas and noise a convenience node stands for."""
    from ldmgraph.diffusion.noise import Noise
    from ldmgraph.diffusion.sampling import (
        DISCARD_PENULTIMATE,
        Guider,
        resolve,
        sampler_choice,
        sampling_sigmas,
    )

    schedule = resolve("schedules", inputs.schedule, ctx.registry)
    discard = inputs.convention == "comfyui" and inputs.sampler in DISCARD_PENULTIMATE
    sigmas = sampling_sigmas(schedule, inputs.model, inputs.steps, discard_penultimate=discard, **sigmas_args)
    guider = Guider(inputs.model, inputs.positive, inputs.negative, inputs.cfg)
    sampler = sampler_choice(inputs.sampler, None, ctx.registry)
    noise = Noise(inputs.seed, add_noise, inputs.convention, inputs.start_noise)
    return guider, sampler, sigmas, noise


BUNDLED_SIZE = 64
"""The bundled models were trained on 64x64 images only: other sizes give blank or hazy images."""


GUIDED_FEW_STEPS: dict[str, tuple[float, float]] = {"uni_pc": (2.5, 4.0), "uni_pc_bh2": (2.5, 4.0), "plms": (2.5, 10.0)}
"""High-order multistep solvers that draw part of the captions wrong on the bundled models under
guidance with few steps: sampler -> (cfg above which to warn, steps needed per unit of cfg).

Measured on the bundled text-to-image model with 16 held-out one-object captions read by the judge
(karras schedule; dpmpp_2m draws all 16 at cfg 4 with 8 steps, 11 at cfg 7): UniPC at its default order 3 draws
13 of 16 at cfg 3 and 9 at cfg 4 with 8 steps, all from 12; at cfg 7 it needs 30 steps. PLMS draws
13 of 16 at cfg 3 and 4 with 12 steps, 15 at cfg 3 with 20 steps and at cfg 4 with 30, all at cfg 4
from 40; at cfg 7 it needs 60. diffusers' UniPCMultistepScheduler and PNDMScheduler give the same
latents through the same network and noise, so this is how these solvers behave under strong
guidance, not a defect of ours.
"""


def guided_steps_warning(model: Any, sampler: Any, steps: Any, cfg: Any) -> str | None:
    """A warning when a bundled model is sampled with a solver of GUIDED_FEW_STEPS at a cfg and step
    count where it draws part of the captions wrong, saying what to use instead; else None."""
    if getattr(model, "layout", None) != "bundled" or sampler not in GUIDED_FEW_STEPS:
        return None
    if not isinstance(steps, int) or not isinstance(cfg, (int, float)):
        return None
    above, per_cfg = GUIDED_FEW_STEPS[sampler]
    needed = int(-(-per_cfg * cfg // 1))
    if cfg <= above or steps >= needed:
        return None
    name = str(getattr(model, "path", "")).rsplit("/", 1)[-1]
    return (f"{sampler} at {steps} steps and cfg {cfg:g} draws part of the prompts wrong on the bundled model "
            f"{name} (a high-order multistep solver under strong guidance with few steps; diffusers' scheduler "
            f"does the same): use sampler dpmpp_2m (every prompt right at cfg 4 from 8 steps), or give {sampler} "
            f"at least {needed} steps, or cfg {above:g} or less")


class _SamplerNode(Node):
    """What the sampler nodes with a model, cfg and latent check before running: the device, and
    the memory sampling needs."""

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        choice = literals.get("device")
        name = "device" if choice not in (None, "auto") else None
        problem = device_problem(choice if name else env.device)
        if problem:
            return [(name, codes.DEVICE_UNAVAILABLE, problem + ("" if name else " (from --device)"))]
        return []

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        from ldmgraph.models.memory import unet_bytes

        latent, model = inputs.get("latent"), inputs.get("model")
        warnings = []
        solver = guided_steps_warning(model, inputs.get("sampler"), inputs.get("steps"), inputs.get("cfg"))
        if solver:
            warnings.append(("sampler", solver))
        if not isinstance(latent, Shape):
            return Estimate(warnings=tuple(warnings)) if warnings else None
        outs = {name: latent for name in cls.spec.outputs}  # every output is a LATENT of that shape
        if getattr(model, "unet", None) is None:
            return Estimate(keeps=latent.nbytes, outputs=outs, warnings=tuple(warnings))
        calls = latent.batch * (1 if inputs["cfg"] == 1 else 2)
        works = unet_bytes(model.unet, calls, latent.height, latent.width, model.dtype_bytes) + 8 * latent.nbytes
        f = model.downscale
        if model.layout == "bundled" and (latent.height * f, latent.width * f) != (BUNDLED_SIZE, BUNDLED_SIZE):
            warnings.append(("latent", (
                f"the bundled model {model.path.rsplit('/', 1)[-1]} was trained on {BUNDLED_SIZE}x{BUNDLED_SIZE} "
                f"images only; at {latent.width * f}x{latent.height * f} expect a blank or hazy result")))
        what = f"U-Net activations for {calls} latent(s) of {latent.channels}x{latent.height}x{latent.width}"
        return Estimate(keeps=latent.nbytes, works=works, outputs=outs,
                        warnings=tuple(warnings), what=what)


class Sampler(_SamplerNode):
    """Sample a latent: txt2img from an empty latent, img2img from an encoded one with denoise < 1."""

    type_name = "Sampler"
    category = "sampling"
    version = "1.1.0"

    class Inputs(_SamplerInputs):
        denoise: float = InputField(
            FLOAT, 1.0, ge=0.0, le=1.0, description="how much to change the input latent (1 = from pure noise)"
        )

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the sampled latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        if inputs.denoise <= 0:
            return self.Outputs(latent=inputs.latent)
        guider, sampler, sigmas, noise = _parts(inputs, ctx, {"denoise": inputs.denoise})
        latent, _ = _run(ctx, guider, sampler, sigmas, inputs.latent, noise, inputs.device)
        return self.Outputs(latent=latent)


class SamplerAdvanced(_SamplerNode):
    """Sample part of a schedule: steps `start_step` .. `end_step` of `steps`, for multi-pass graphs.

    `add_noise` off continues from a latent that still holds noise (from a previous pass with
    `return_with_leftover_noise` on), as in two-stage refiner workflows.
    """

    type_name = "SamplerAdvanced"
    category = "sampling"
    version = "1.1.0"

    class Inputs(_SamplerInputs):
        add_noise: bool = InputField(BOOLEAN, True, description="noise the input latent to the start step")
        start_step: int = InputField(INT, 0, ge=0, le=10000, description="first step to run")
        end_step: int = InputField(INT, 10000, ge=0, le=10000, description="stop before this step")
        return_with_leftover_noise: bool = InputField(
            BOOLEAN, False, description="stop at end_step's noise level instead of denoising to the end"
        )

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the sampled latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        args = {
            "start_step": inputs.start_step,
            "end_step": inputs.end_step,
            "return_with_leftover_noise": inputs.return_with_leftover_noise,
        }
        guider, sampler, sigmas, noise = _parts(inputs, ctx, args, inputs.add_noise)
        latent, _ = _run(ctx, guider, sampler, sigmas, inputs.latent, noise, inputs.device)
        return self.Outputs(latent=latent)


# ---------------------------------------------------------------- SAMPLER


class SamplerSelect(Node):
    """A sampler by name with its default options (ComfyUI's KSamplerSelect); for its own options
    use the `SamplerSelect.<name>` node."""

    type_name = "SamplerSelect"
    estimate_rule = "small"
    category = "sampling/custom"

    class Inputs(NodeInputs):
        sampler: str = InputField(ENUM, "euler", choices_from="samplers", description="solver")

    class Outputs(NodeOutputs):
        sampler: Any = OutputField(SAMPLER, description="the sampler with its default options")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.sampling import sampler_choice

        return self.Outputs(sampler=sampler_choice(inputs.sampler, None, ctx.registry))


_OPTION_SOCKETS: dict[str, tuple[type[Socket], type]] = {
    "float": (FLOAT, float),
    "int": (INT, int),
    "bool": (BOOLEAN, bool),
    "choice": (ENUM, str),
}


def sampler_select_node(name: str, options: dict[str, Any]) -> type[Node]:
    """The `SamplerSelect.<name>` node: one input per declared option of sampler `name`."""
    fields: dict[str, Any] = {}
    for key, option in options.items():
        socket, annotation = _OPTION_SOCKETS[option.kind]
        fields[key] = (
            annotation,
            InputField(
                socket,
                option.default,
                ge=option.ge,
                le=option.le,
                choices=option.choices,
                description=option.description,
            ),
        )
    inputs = create_model(f"SamplerSelect_{name}_Inputs", __base__=NodeInputs, **fields)

    class Outputs(NodeOutputs):
        sampler: Any = OutputField(SAMPLER, description=f"{name} with these options")

    def run(self: Node, inputs: Any, ctx: NodeContext) -> Any:
        from ldmgraph.diffusion.sampling import sampler_choice

        chosen = {key: getattr(inputs, key) for key in options}
        return Outputs(sampler=sampler_choice(name, chosen, ctx.registry))

    return type(
        f"SamplerSelect_{name}",
        (Node,),
        {
            "type_name": f"SamplerSelect.{name}",
            "estimate_rule": "small",
            "category": "sampling/custom/samplers",
            "description": f"The sampler {name!r} with its own options (declared by the sampler).",
            "Inputs": inputs,
            "Outputs": Outputs,
            "run": run,
            "__module__": __name__,
        },
    )


# ---------------------------------------------------------------- SIGMAS


class _SigmasOutputs(NodeOutputs):
    sigmas: Any = OutputField(SIGMAS, description="steps + 1 noise levels, ending in 0")


class _SigmaRangeInputs(NodeInputs):
    """What the closed-form schedules share: the step count and the sigma range."""

    steps: int = InputField(INT, 20, ge=1, le=10000, description="sampling steps")
    sigma_max: float = InputField(FLOAT, 14.614642, ge=0.0, le=5000.0, description="first sigma")
    sigma_min: float = InputField(FLOAT, 0.0291675, ge=0.0, le=5000.0, description="last sigma before 0")


class Scheduler(Node):
    """Sigmas of a named schedule for a model (ComfyUI's BasicScheduler): the last steps + 1 of a
    schedule of steps / denoise steps (so always `steps` steps, even for ddim_uniform)."""

    type_name = "Scheduler"
    estimate_rule = "small"
    category = "sampling/custom/sigmas"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the model whose noise schedule to follow")
        schedule: str = InputField(ENUM, "normal", choices_from="schedules", description="sigma schedule")
        steps: int = InputField(INT, 20, ge=1, le=10000, description="sampling steps")
        denoise: float = InputField(FLOAT, 1.0, ge=0.0, le=1.0, description="fraction of the schedule to run")

    Outputs = _SigmasOutputs

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        from ldmgraph.diffusion.sampling import resolve, sampling_sigmas

        if inputs.denoise <= 0:
            return self.Outputs(sigmas=torch.zeros(0))
        schedule = resolve("schedules", inputs.schedule, ctx.registry)
        sigmas = sampling_sigmas(schedule, inputs.model, inputs.steps, inputs.denoise)
        return self.Outputs(sigmas=sigmas[-(inputs.steps + 1) :])


class KarrasScheduler(Node):
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max to sigma_min, then 0."""

    type_name = "KarrasScheduler"
    estimate_rule = "small"
    category = "sampling/custom/sigmas"

    class Inputs(_SigmaRangeInputs):
        rho: float = InputField(FLOAT, 7.0, ge=0.0, le=100.0, description="curvature")

    Outputs = _SigmasOutputs

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.schedules import karras_sigmas

        return self.Outputs(sigmas=karras_sigmas(inputs.steps, inputs.sigma_min, inputs.sigma_max, inputs.rho))


class ExponentialScheduler(Node):
    """Sigmas evenly spaced in log-sigma from sigma_max to sigma_min, then 0."""

    type_name = "ExponentialScheduler"
    estimate_rule = "small"
    category = "sampling/custom/sigmas"

    Inputs = _SigmaRangeInputs

    Outputs = _SigmasOutputs

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.schedules import exponential_sigmas

        return self.Outputs(sigmas=exponential_sigmas(inputs.steps, inputs.sigma_min, inputs.sigma_max))


class SplitSigmas(Node):
    """Split a schedule at a step: the first `step` steps (high sigmas) and the rest (low sigmas);
    the sigma at the split ends the first part and starts the second."""

    type_name = "SplitSigmas"
    estimate_rule = "small"
    category = "sampling/custom/sigmas"

    class Inputs(NodeInputs):
        sigmas: Any = InputField(SIGMAS, description="the schedule")
        step: int = InputField(INT, 0, ge=0, le=10000, description="steps in the first part")

    class Outputs(NodeOutputs):
        high_sigmas: Any = OutputField(SIGMAS, description="sigmas[: step + 1]")
        low_sigmas: Any = OutputField(SIGMAS, description="sigmas[step:]")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        sigmas = inputs.sigmas
        return self.Outputs(high_sigmas=sigmas[: inputs.step + 1], low_sigmas=sigmas[inputs.step :])


class FlipSigmas(Node):
    """Reverse a schedule (from clean to noisy, for inversion); a leading 0 becomes 1e-4."""

    type_name = "FlipSigmas"
    estimate_rule = "small"
    category = "sampling/custom/sigmas"

    class Inputs(NodeInputs):
        sigmas: Any = InputField(SIGMAS, description="the schedule")

    class Outputs(NodeOutputs):
        sigmas: Any = OutputField(SIGMAS, description="the schedule reversed")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        flipped = inputs.sigmas.flip(0).clone()
        if len(flipped) and float(flipped[0]) == 0:
            flipped[0] = 1e-4
        return self.Outputs(sigmas=flipped)


class ConcatSigmas(Node):
    """Join two schedules; when the second starts where the first ends, that sigma appears once."""

    type_name = "ConcatSigmas"
    estimate_rule = "small"
    category = "sampling/custom/sigmas"

    class Inputs(NodeInputs):
        first: Any = InputField(SIGMAS, description="the schedule to run first")
        second: Any = InputField(SIGMAS, description="the schedule to run after it")

    class Outputs(NodeOutputs):
        sigmas: Any = OutputField(SIGMAS, description="both schedules in order")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        first, second = inputs.first, inputs.second
        if len(first) and len(second) and float(first[-1]) == float(second[0]):
            second = second[1:]
        return self.Outputs(sigmas=torch.cat([first.to(torch.float32), second.to(torch.float32)]))


# ---------------------------------------------------------------- GUIDER


@dataclass(frozen=True)
class GuiderFacts:
    """What a guider's estimate tells the sampler below it: the model and its calls per latent per step."""

    model: Any
    calls: int


def guider_estimate(model: Any, calls: int) -> Estimate:
    return Estimate(outputs={"guider": GuiderFacts(model, calls)})


def sampling_estimate(cls: type[Node], model: Any, latent: Any, calls: int,
                      warnings: tuple[tuple[str | None, str], ...] = ()) -> Estimate | None:
    """The memory of sampling ``latent`` with ``calls`` network calls per latent per step: the outputs
    (each a latent of that shape) kept, and the U-Net's activations as working memory."""
    from ldmgraph.models.memory import unet_bytes

    if not isinstance(latent, Shape):
        return Estimate(warnings=warnings) if warnings else None
    outs = {name: latent for name in cls.spec.outputs}
    if getattr(model, "unet", None) is None:
        return Estimate(keeps=latent.nbytes * len(outs), works=8 * latent.nbytes, outputs=outs, warnings=warnings)
    total = latent.batch * calls
    works = unet_bytes(model.unet, total, latent.height, latent.width, model.dtype_bytes) + 8 * latent.nbytes
    what = f"U-Net activations for {total} latent(s) of {latent.channels}x{latent.height}x{latent.width}"
    return Estimate(keeps=latent.nbytes * len(outs), works=works, outputs=outs, warnings=warnings, what=what)


class CFGGuider(Node):
    """Classifier-free guidance: D = D_neg + cfg (D_pos - D_neg) (Ho & Salimans 2022)."""

    type_name = "CFGGuider"
    category = "sampling/custom/guiders"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        positive: Any = InputField(CONDITIONING, description="what the image should show")
        negative: Any = InputField(CONDITIONING, description="what to steer away from (used when cfg != 1)")
        cfg: float = InputField(FLOAT, 8.0, ge=0.0, le=100.0, description="guidance scale")

    class Outputs(NodeOutputs):
        guider: Any = OutputField(GUIDER, description="the guided model")

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate:
        return guider_estimate(inputs.get("model"), 1 if inputs.get("cfg") == 1 else 2)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.sampling import Guider

        return self.Outputs(guider=Guider(inputs.model, inputs.positive, inputs.negative, inputs.cfg))


class BasicGuider(Node):
    """The model with one conditioning and no guidance (cfg 1: one network call per step)."""

    type_name = "BasicGuider"
    category = "sampling/custom/guiders"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        conditioning: Any = InputField(CONDITIONING, description="what the image should show")

    class Outputs(NodeOutputs):
        guider: Any = OutputField(GUIDER, description="the conditioned model")

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate:
        return guider_estimate(inputs.get("model"), 1)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.sampling import Guider

        return self.Outputs(guider=Guider(inputs.model, inputs.conditioning, (), 1.0))


class DualCFGGuider(Node):
    """Two positive conditionings: D = D_neg + cfg_cond2_negative (D_2 - D_neg) + cfg_conds (D_1 - D_2)
    (ComfyUI's DualCFGGuider)."""

    type_name = "DualCFGGuider"
    category = "sampling/custom/guiders"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        cond1: Any = InputField(CONDITIONING, description="the main positive conditioning")
        cond2: Any = InputField(CONDITIONING, description="the second positive conditioning")
        negative: Any = InputField(CONDITIONING, description="what to steer away from")
        cfg_conds: float = InputField(FLOAT, 8.0, ge=0.0, le=100.0, description="guidance of cond1 over cond2")
        cfg_cond2_negative: float = InputField(
            FLOAT, 8.0, ge=0.0, le=100.0, description="guidance of cond2 over the negative"
        )

    class Outputs(NodeOutputs):
        guider: Any = OutputField(GUIDER, description="the guided model")

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate:
        return guider_estimate(inputs.get("model"), 3)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.sampling import Guider

        guider = Guider(
            inputs.model, inputs.cond1, inputs.negative, inputs.cfg_conds, inputs.cond2, inputs.cfg_cond2_negative
        )
        return self.Outputs(guider=guider)


# ---------------------------------------------------------------- NOISE


class RandomNoise(Node):
    """Seeded starting noise (and the per-step noise of ancestral and SDE samplers)."""

    type_name = "RandomNoise"
    estimate_rule = "small"
    category = "sampling/custom/noise"

    class Inputs(NodeInputs):
        noise_seed: int = InputField(INT, 0, ge=0, le=MAX_SEED, description="the seed")
        convention: str = _convention_field()
        start_noise: str = _start_noise_field()

    class Outputs(NodeOutputs):
        noise: Any = OutputField(NOISE, description="the noise source")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.noise import Noise

        return self.Outputs(noise=Noise(inputs.noise_seed, True, inputs.convention, inputs.start_noise))


class DisableNoise(Node):
    """No starting noise: continue from a latent that still holds noise (per-step noise uses seed 0)."""

    type_name = "DisableNoise"
    estimate_rule = "small"
    category = "sampling/custom/noise"

    class Inputs(NodeInputs):
        convention: str = _convention_field()

    class Outputs(NodeOutputs):
        noise: Any = OutputField(NOISE, description="no noise")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion.noise import Noise

        return self.Outputs(noise=Noise(0, False, inputs.convention))


# ---------------------------------------------------------------- custom samplers


class _CustomOutputs(NodeOutputs):
    output: Any = OutputField(LATENT, description="the sampled latent")
    denoised_output: Any = OutputField(LATENT, description="the last prediction of the clean latent")


class SamplerCustomAdvanced(Node):
    """Sample from the parts: noise, guider, sampler and sigmas."""

    type_name = "SamplerCustomAdvanced"
    category = "sampling/custom"

    class Inputs(NodeInputs):
        noise: Any = InputField(NOISE, description="the noise source (RandomNoise or DisableNoise)")
        guider: Any = InputField(GUIDER, description="the guided model")
        sampler: Any = InputField(SAMPLER, description="the sampler and its options")
        sigmas: Any = InputField(SIGMAS, description="the noise levels to visit")
        latent: Any = InputField(LATENT, description="the starting latent")
        device: str = _device_field()

    Outputs = _CustomOutputs

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        guider = inputs.get("guider")
        if not isinstance(guider, GuiderFacts):
            return sampling_estimate(cls, None, inputs.get("latent"), 2)
        return sampling_estimate(cls, guider.model, inputs.get("latent"), guider.calls)

    def run(self, inputs: Inputs, ctx: NodeContext) -> _CustomOutputs:
        out, denoised = _run(ctx, inputs.guider, inputs.sampler, inputs.sigmas, inputs.latent, inputs.noise,
                             inputs.device)
        return _CustomOutputs(output=out, denoised_output=denoised)


class SamplerCustom(_SamplerNode):
    """Sample with a sampler and sigmas from the graph, CFG and a seed given here."""

    type_name = "SamplerCustom"
    category = "sampling/custom"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        add_noise: bool = InputField(BOOLEAN, True, description="noise the input latent to the first sigma")
        noise_seed: int = InputField(INT, 0, ge=0, le=MAX_SEED, description="the seed")
        cfg: float = InputField(FLOAT, 8.0, ge=0.0, le=100.0, description="guidance scale")
        positive: Any = InputField(CONDITIONING, description="what the image should show")
        negative: Any = InputField(CONDITIONING, description="what to steer away from (used when cfg != 1)")
        sampler: Any = InputField(SAMPLER, description="the sampler and its options")
        sigmas: Any = InputField(SIGMAS, description="the noise levels to visit")
        latent: Any = InputField(LATENT, description="the starting latent")
        convention: str = _convention_field()
        start_noise: str = _start_noise_field()
        device: str = _device_field()

    Outputs = _CustomOutputs

    def run(self, inputs: Inputs, ctx: NodeContext) -> _CustomOutputs:
        from ldmgraph.diffusion.noise import Noise
        from ldmgraph.diffusion.sampling import Guider

        guider = Guider(inputs.model, inputs.positive, inputs.negative, inputs.cfg)
        noise = Noise(inputs.noise_seed, inputs.add_noise, inputs.convention, inputs.start_noise)
        out, denoised = _run(ctx, guider, inputs.sampler, inputs.sigmas, inputs.latent, noise, inputs.device)
        return _CustomOutputs(output=out, denoised_output=denoised)


NODES: list[type[Node]] = [
    Sampler,
    SamplerAdvanced,
    SamplerSelect,
    Scheduler,
    KarrasScheduler,
    ExponentialScheduler,
    SplitSigmas,
    FlipSigmas,
    ConcatSigmas,
    CFGGuider,
    BasicGuider,
    DualCFGGuider,
    RandomNoise,
    DisableNoise,
    SamplerCustom,
    SamplerCustomAdvanced,
]


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the sampling nodes."""
    return list(NODES)


@hookimpl
def ldmgraph_derived_nodes(registry: Any) -> list[type[Node]]:
    """One `SamplerSelect.<name>` node per registered sampler that declares options."""
    from ldmgraph.diffusion.registry import declared_options

    made = []
    for name, entry in registry.samplers.items():
        options = declared_options(entry)
        if options and f"SamplerSelect.{name}" not in registry.nodes:
            node = sampler_select_node(name, options)
            node.derived_from = ("sampler", name)  # type: ignore[attr-defined]
            made.append(node)
    return made
