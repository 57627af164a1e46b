"""Example ldmgraph plugin: one conditioner, registered through the `ldmgraph_conditioners` hook.

`PromptAppend` is a cross-attention (`crossattn` route) conditioner: it encodes a second prompt
and appends its tokens, multiplied by `weight`, to each entry's context, so the U-Net attends to
both prompts at once and the second one's keys and values are scaled (a prompt "addendum" with its
own emphasis). Registering the class is all it takes: ldmgraph builds its node (inputs
`conditioning`, `text_encoder`, `text`, `weight`; output `conditioning`), lists it, validates it,
and the denoiser applies the contribution by route. Torch is imported only when the node runs.
"""

from __future__ import annotations

from typing import Any

from ldmgraph.conditioners import Conditioner
from ldmgraph.graph import NodeContext, NodeInputs
from ldmgraph.graph.node import InputField
from ldmgraph.graph.sockets import FLOAT, STRING, TEXT_ENCODER
from ldmgraph.plugins import hookimpl


class PromptAppend(Conditioner):
    """Append a second prompt's tokens, scaled by `weight`, to the conditioning's context."""

    type_name = "PromptAppend"
    estimate_rule = "small"  # memory: a few token embeddings (ldmgraph's budget reads this)
    route = "crossattn"
    sides = "one"

    class Inputs(NodeInputs):
        text_encoder: Any = InputField(TEXT_ENCODER, description="the text encoder of the model")
        text: str = InputField(STRING, "", description="the prompt to append")
        weight: float = InputField(FLOAT, 1.0, ge=0.0, le=4.0, description="scale of the appended tokens")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        if inputs.text_encoder is None:
            raise ValueError("PromptAppend: this model has no text encoder; connect one from a loader")
        return inputs.text_encoder.encode([inputs.text]).context * inputs.weight


@hookimpl
def ldmgraph_conditioners() -> list[type[Conditioner]]:
    """The conditioners this plugin adds."""
    return [PromptAppend]
