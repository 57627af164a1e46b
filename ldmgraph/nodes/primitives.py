"""Primitive value nodes: integer, float, string, boolean and seed.

They hold one literal so that several inputs can share it, and so that a workflow parameter can
target one place. The seed node's "random" mode draws a fresh seed each run and records it, so
every saved image can be reproduced from its embedded workflow.
"""

from __future__ import annotations

import secrets
from typing import Any

from ldmgraph.graph import InputField, Node, NodeContext, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.sockets import BOOLEAN, ENUM, FLOAT, INT, STRING
from ldmgraph.plugins import hookimpl

MAX_SEED = 2**64 - 1  # the range ComfyUI and torch.manual_seed accept
RANDOM_SEED_BITS = 32


class IntValue(Node):
    """An integer constant."""

    type_name = "Int"

    estimate_rule = "small"
    category = "primitives"

    class Inputs(NodeInputs):
        value: int = InputField(INT, 0, description="the integer")

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    @classmethod
    def constant_outputs(cls, inputs: dict[str, Any]) -> dict[str, Any] | None:
        return {"value": inputs["value"]} if "value" in inputs else None

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class FloatValue(Node):
    """A floating-point constant."""

    type_name = "Float"

    estimate_rule = "small"
    category = "primitives"

    class Inputs(NodeInputs):
        value: float = InputField(FLOAT, 0.0, description="the number")

    class Outputs(NodeOutputs):
        value: float = OutputField(FLOAT)

    @classmethod
    def constant_outputs(cls, inputs: dict[str, Any]) -> dict[str, Any] | None:
        return {"value": inputs["value"]} if "value" in inputs else None

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class StringValue(Node):
    """A text constant (a prompt, a file name prefix, ...)."""

    type_name = "String"

    estimate_rule = "small"
    category = "primitives"

    class Inputs(NodeInputs):
        value: str = InputField(STRING, "", description="the text")

    class Outputs(NodeOutputs):
        value: str = OutputField(STRING)

    @classmethod
    def constant_outputs(cls, inputs: dict[str, Any]) -> dict[str, Any] | None:
        return {"value": inputs["value"]} if "value" in inputs else None

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class BooleanValue(Node):
    """A true/false constant."""

    type_name = "Boolean"

    estimate_rule = "small"
    category = "primitives"

    class Inputs(NodeInputs):
        value: bool = InputField(BOOLEAN, False, description="true or false")

    class Outputs(NodeOutputs):
        value: bool = OutputField(BOOLEAN)

    @classmethod
    def constant_outputs(cls, inputs: dict[str, Any]) -> dict[str, Any] | None:
        return {"value": inputs["value"]} if "value" in inputs else None

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class Seed(Node):
    """A sampling seed: "fixed" passes the given seed on; "random" draws a new one every run.

    A drawn seed is recorded in the run's parameters (under the name of the workflow parameter that
    targets this seed, else ``seed@<node id>``) and written into the resolved workflow as a fixed
    seed, so that the workflow embedded in a saved image reproduces it.
    """

    type_name = "Seed"

    estimate_rule = "small"
    category = "primitives"

    class Inputs(NodeInputs):
        seed: int = InputField(INT, 0, ge=0, le=MAX_SEED, description="the seed (used in fixed mode)")
        mode: str = InputField(ENUM, "fixed", choices=["fixed", "random"],
                               description='"fixed": use seed; "random": draw one per run')

    class Outputs(NodeOutputs):
        seed: int = OutputField(INT)

    @classmethod
    def is_deterministic(cls, literals: dict[str, Any]) -> bool:
        return literals.get("mode") != "random"

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        if inputs.mode != "random":
            return self.Outputs(seed=inputs.seed)
        seed = secrets.randbits(RANDOM_SEED_BITS)
        ctx.record_value(_parameter_name(ctx), seed, inputs={"seed": seed, "mode": "fixed"})
        return self.Outputs(seed=seed)


def _parameter_name(ctx: NodeContext) -> str:
    """The workflow parameter that targets this node's seed, else ``seed@<node id>``."""
    for name, param in ctx.workflow.get("parameters", {}).items():
        for target in param.get("targets", []):
            if target.get("node") == ctx.node_id and target.get("input") == "seed":
                return str(name)
    return f"seed@{ctx.node_id}"


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the primitive nodes."""
    return [IntValue, FloatValue, StringValue, BooleanValue, Seed]
