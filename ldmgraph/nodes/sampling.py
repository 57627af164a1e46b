"""Sampler nodes: run a registered solver from noise (or a partly noised latent) to a clean latent.

Both call `ldmgraph.diffusion.sample`: noise is drawn on the CPU from the seed (image k of a batch
uses seed + k), classifier-free guidance D = D_uncond + cfg (D_cond - D_uncond) (Ho & Salimans
2022), and `denoise` < 1 runs the tail of a longer schedule (img2img, SDEdit, Meng et al. 2022).
Each step reports progress through the node context, which is also where cancellation is checked.
The device is the node's choice, else the run's `--device`, else CUDA, then MPS, then the CPU.
"""

from __future__ import annotations

from typing import Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs, codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import BOOLEAN, CONDITIONING, ENUM, FLOAT, INT, LATENT, MODEL
from ldmgraph.nodes.common import DEVICES, device_problem, pick_device
from ldmgraph.plugins import hookimpl

MAX_SEED = 2**64 - 1


class _SamplerInputs(NodeInputs):
    model: Any = InputField(MODEL, description="the diffusion model")
    positive: Any = InputField(CONDITIONING, description="what the image should show")
    negative: Any = InputField(CONDITIONING, description="what to steer away from (used when cfg != 1)")
    latent: Any = InputField(LATENT, description="starting latent: empty for txt2img, encoded for img2img")
    seed: int = InputField(
        INT, 0, ge=0, le=MAX_SEED, description="noise seed (image k of a batch uses seed + k)"
    )
    steps: int = InputField(INT, 20, ge=1, le=10000, description="sampling steps")
    cfg: float = InputField(FLOAT, 7.0, ge=0.0, le=100.0, description="classifier-free guidance scale")
    sampler: str = InputField(ENUM, "euler", choices_from="samplers", description="solver")
    schedule: str = InputField(ENUM, "normal", choices_from="schedules", description="sigma schedule")
    device: str = InputField(
        ENUM, "auto", choices=list(DEVICES), description="where to compute; auto: CUDA > MPS > CPU"
    )


BUNDLED_SIZE = 64
"""The bundled models were trained on 64x64 images only: other sizes give blank or hazy images."""


class _SamplerNode(Node):
    """What both sampler nodes check before running: the device, and the memory sampling needs."""

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
        if not isinstance(latent, Shape):
            return None
        if getattr(model, "unet", None) is None:
            return Estimate(keeps=latent.nbytes, outputs={"latent": latent})
        calls = latent.batch * (1 if inputs["cfg"] == 1 else 2)
        works = unet_bytes(model.unet, calls, latent.height, latent.width, model.dtype_bytes) + 8 * latent.nbytes
        warnings = []
        f = model.downscale
        if model.layout == "bundled" and (latent.height * f, latent.width * f) != (BUNDLED_SIZE, BUNDLED_SIZE):
            warnings.append(("latent", (
                f"the bundled model {model.path.rsplit('/', 1)[-1]} was trained on {BUNDLED_SIZE}x{BUNDLED_SIZE} "
                f"images only; at {latent.width * f}x{latent.height * f} expect a blank or hazy result")))
        what = f"U-Net activations for {calls} latent(s) of {latent.channels}x{latent.height}x{latent.width}"
        return Estimate(keeps=latent.nbytes, works=works, outputs={"latent": latent},
                        warnings=tuple(warnings), what=what)


def _run_sampler(inputs: Any, ctx: NodeContext, total: int, **options: Any) -> Any:
    from ldmgraph.diffusion import sample

    def report(state: dict[str, Any]) -> None:
        ctx.progress(min(int(state["i"]) + 1, total), total)

    ctx.check_cancelled()
    return sample(
        inputs.model,
        inputs.latent,
        inputs.positive,
        inputs.negative,
        seed=inputs.seed,
        steps=inputs.steps,
        cfg=inputs.cfg,
        sampler=inputs.sampler,
        schedule=inputs.schedule,
        device=pick_device(inputs.device, ctx),
        callback=report,
        registry=ctx.registry,
        **options,
    )


class Sampler(_SamplerNode):
    """Sample a latent: txt2img from an empty latent, img2img from an encoded one with denoise < 1."""

    type_name = "Sampler"
    category = "sampling"

    class Inputs(_SamplerInputs):
        denoise: float = InputField(
            FLOAT,
            1.0,
            ge=0.0,
            le=1.0,
            description="how much to change the input latent (1 = from pure noise)",
        )

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the sampled latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        latent = _run_sampler(inputs, ctx, inputs.steps, denoise=inputs.denoise)
        return self.Outputs(latent=latent)


class SamplerAdvanced(_SamplerNode):
    """Sample part of a schedule: steps `start_step` .. `end_step` of `steps`, for multi-pass graphs.

    `add_noise` off continues from a latent that still holds noise (from a previous pass with
    `return_with_leftover_noise` on), as in two-stage refiner workflows.
    """

    type_name = "SamplerAdvanced"
    category = "sampling"

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
        total = max(1, min(inputs.end_step, inputs.steps) - inputs.start_step)
        latent = _run_sampler(
            inputs,
            ctx,
            total,
            start_step=inputs.start_step,
            end_step=inputs.end_step,
            add_noise=inputs.add_noise,
            return_with_leftover_noise=inputs.return_with_leftover_noise,
        )
        return self.Outputs(latent=latent)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the sampler nodes."""
    return [Sampler, SamplerAdvanced]
