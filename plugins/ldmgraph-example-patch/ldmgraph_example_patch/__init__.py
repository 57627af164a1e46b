"""Example ldmgraph plugin: a node that patches a model, the way a third party adds one.

`AttentionTemperature` divides the attention logits of the U-Net's self-attention (`attn1`),
cross-attention (`attn2`) or both by a temperature T: softmax(Q K^T / (T sqrt(d))) V. T > 1
flattens the attention maps, T < 1 sharpens them; T = 1 is the model unchanged. The node returns
a new MODEL handle on the same U-Net with one `AttentionPatch` (`ldmgraph.models.patches.patched`):
nothing is copied, and the U-Net is changed only while a sampler runs with that handle.

Only ldmgraph's public patch contract is used: the node imports torch inside `run`, so listing
and validating workflows stays torch-free.
"""

from __future__ import annotations

from typing import Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import ENUM, FLOAT, MODEL
from ldmgraph.plugins import hookimpl


def tempered_attention(temperature: float) -> Any:
    """The replacement attention: scaled dot-product attention at 1 / (T sqrt(d))."""
    import torch.nn.functional as F

    def attend(q: Any, k: Any, v: Any, info: Any) -> Any:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0 / (temperature * q.shape[-1] ** 0.5))

    return attend


class AttentionTemperature(Node):
    """Divide the U-Net's attention logits by a temperature (1 = unchanged)."""

    type_name = "AttentionTemperature"
    category = "model_patches"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        temperature: float = InputField(FLOAT, 1.0, ge=0.05, le=20.0,
                                        description="T: above 1 flattens attention, below 1 sharpens it")
        which: str = InputField(ENUM, "attn2", choices=["attn1", "attn2", "both"],
                                description="self-attention (attn1), cross-attention (attn2) or both")

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the model with tempered attention")

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return Estimate(outputs={"model": inputs.get("model")})  # the model's facts flow on unchanged

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.patches import AttentionPatch, patched

        patch = AttentionPatch(tempered_attention(inputs.temperature), which=inputs.which)  # type: ignore[arg-type]
        return self.Outputs(model=patched(inputs.model, [patch]))


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Nodes this plugin adds."""
    return [AttentionTemperature]
