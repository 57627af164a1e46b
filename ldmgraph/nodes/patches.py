"""Model-patch nodes built on `ldmgraph.models.patches`: FreeU and FreeU v2 (ComfyUI's `FreeU`,
`FreeU_V2`) and ComfyUI's `ModelSamplingDiscrete` (eps, v, LCM). Each returns a new MODEL handle on the same U-Net with one more patch; the U-Net is
changed only while a sampler runs with that handle (see docs/lora.md)."""

from __future__ import annotations

from typing import Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import ENUM, FLOAT, MODEL
from ldmgraph.plugins import hookimpl

FREEU_RULES = ("channels", "levels")  # ldmgraph.models.freeu.RULES, without importing torch
RULE_HELP = ("which output blocks: 'channels' (the FreeU authors' code and ComfyUI: backbone 4x the base "
             "width gets b1/s1, 2x gets b2/s2) or 'levels' (diffusers' enable_freeu: the two deepest levels)")


def _factor(default: float, what: str) -> Any:
    return InputField(FLOAT, default, ge=0.0, le=10.0, description=what)


def _freeu_model(inputs: Any, version: int) -> Any:
    from ldmgraph.models.freeu import FreeU
    from ldmgraph.models.patches import patched

    unet = inputs.model.diffusion_model
    freeu = FreeU(inputs.b1, inputs.b2, inputs.s1, inputs.s2, version=version, rule=inputs.rule,
                  model_channels=int(getattr(unet, "model_channels", 320)))
    return patched(inputs.model, [freeu.hook()])


class _FreeUInputs(NodeInputs):
    model: Any = InputField(MODEL, description="the diffusion model")
    b1: float = _factor(1.1, "backbone gain at the deepest stage")
    b2: float = _factor(1.2, "backbone gain at the second stage")
    s1: float = _factor(0.9, "skip low-frequency gain at the deepest stage")
    s2: float = _factor(0.2, "skip low-frequency gain at the second stage")
    rule: str = InputField(ENUM, "channels", choices=FREEU_RULES, description=RULE_HELP)


class _PassModel(Node):
    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return Estimate(outputs={"model": inputs.get("model")})


class FreeU(_PassModel):
    """FreeU (Si et al. 2024): amplify the U-Net's backbone features, damp the skips' low frequencies."""

    type_name = "FreeU"
    category = "model_patches"
    Inputs = _FreeUInputs

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the model with FreeU")

    def run(self, inputs: Any, ctx: NodeContext) -> Outputs:
        return self.Outputs(model=_freeu_model(inputs, 1))


class FreeU_V2(_PassModel):  # noqa: N801 - ComfyUI's name
    """FreeU v2: the backbone gain follows each image's normalised mean feature map."""

    type_name = "FreeU_V2"
    category = "model_patches"

    class Inputs(_FreeUInputs):
        b1: float = _factor(1.3, "backbone gain at the deepest stage")
        b2: float = _factor(1.4, "backbone gain at the second stage")

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the model with FreeU v2")

    def run(self, inputs: Any, ctx: NodeContext) -> Outputs:
        return self.Outputs(model=_freeu_model(inputs, 2))


class ModelSamplingDiscrete(_PassModel):
    """What the model's prediction means (ComfyUI's ModelSamplingDiscrete): eps, v, or a Latent
    Consistency Model's x0 ("lcm": its boundary condition; use the `lcm` sampler and schedule)."""

    type_name = "ModelSamplingDiscrete"
    category = "model_patches"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        sampling: str = InputField(ENUM, "eps", choices=["eps", "v_prediction", "lcm"],
                                   description="eps or v prediction, or lcm (an eps model distilled as a "
                                   "latent consistency model, e.g. with an LCM LoRA)")

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the model with that sampling")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.model_sampling import lcm_patch
        from ldmgraph.models.patches import patched

        if inputs.sampling == "lcm":
            return self.Outputs(model=patched(inputs.model, [lcm_patch()]))
        model = patched(inputs.model, [])
        model.prediction_type = "v" if inputs.sampling == "v_prediction" else "eps"
        return self.Outputs(model=model)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the model-patch nodes."""
    return [FreeU, FreeU_V2, ModelSamplingDiscrete]
