"""Tiny nodes for the framework tests (registered through the plugin hook like any plugin)."""

from __future__ import annotations

import numpy as np

from ldmgraph.graph import InputField, Node, NodeContext, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.sockets import ENUM, INT, STRING
from ldmgraph.plugins import hookimpl


class Const(Node):
    """An integer source."""

    type_name = "TConst"

    class Inputs(NodeInputs):
        value: int = InputField(INT, 0, ge=-1000, le=1000)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class Add(Node):
    """a + b (b optional)."""

    type_name = "TAdd"

    class Inputs(NodeInputs):
        a: int = InputField(INT)
        b: int = InputField(INT, 0)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.a + inputs.b)


class Sink(Node):
    """An output node returning its input."""

    type_name = "TSink"
    output_node = True

    class Inputs(NodeInputs):
        x: int = InputField(INT)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.x)


class Random(Node):
    """A non-deterministic integer."""

    type_name = "TRandom"
    deterministic = False

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: NodeInputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=int(np.random.default_rng().integers(0, 2**31)))


class Fail(Node):
    """Always fails."""

    type_name = "TFail"

    class Inputs(NodeInputs):
        x: int = InputField(INT, 0)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        raise ZeroDivisionError("deliberate failure")


class Slow(Node):
    """Reports progress for `steps` steps (a cancellation point each)."""

    type_name = "TSlow"

    class Inputs(NodeInputs):
        x: int = InputField(INT, 0)
        steps: int = InputField(INT, 5, ge=1, le=100)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        for k in range(1, inputs.steps + 1):
            ctx.progress(k, inputs.steps)
        return self.Outputs(value=inputs.x)


class Pick(Node):
    """An enumeration input whose choices come from the registry's samplers."""

    type_name = "TPick"
    output_node = True

    class Inputs(NodeInputs):
        sampler: str = InputField(ENUM, choices_from="samplers")

    class Outputs(NodeOutputs):
        value: str = OutputField(STRING)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.sampler)


class Text(Node):
    """A string source."""

    type_name = "TText"

    class Inputs(NodeInputs):
        value: str = InputField(STRING, "")

    class Outputs(NodeOutputs):
        value: str = OutputField(STRING)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    return [Const, Add, Sink, Random, Fail, Slow, Pick, Text]


@hookimpl
def ldmgraph_samplers() -> dict[str, str]:
    return {"test_sampler": "math:sqrt", "other_sampler": "math:floor"}
