"""Nodes the server tests load with --plugin-dir: a slow, interruptible node and two that fail.

`Wait` reports progress every `tick` seconds (each report is a cancellation point), so a test
can interrupt it mid-run; `Fail` raises an ordinary error (the job fails, the worker goes on);
`KillWorker` raises SystemExit, which no job handler catches: the worker thread dies and the
supervisor must restart it.
"""

from __future__ import annotations

import time

from ldmgraph.graph.node import InputField, Node, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.sockets import FLOAT, INT
from ldmgraph.plugins import hookimpl


class Wait(Node):
    """Sleep for `ticks` x `tick` seconds, reporting progress after each tick."""

    type_name = "TestWait"
    category = "testing"
    deterministic = False
    output_node = True

    class Inputs(NodeInputs):
        ticks: int = InputField(INT, 10, ge=1, le=10000)
        tick: float = InputField(FLOAT, 0.1, ge=0.0, le=10.0)

    class Outputs(NodeOutputs):
        ticks: int = OutputField(INT)

    def run(self, inputs, ctx):
        for k in range(1, inputs.ticks + 1):
            time.sleep(inputs.tick)
            ctx.progress(k, inputs.ticks)
        return self.Outputs(ticks=inputs.ticks)


class Fail(Node):
    """Raise a ValueError."""

    type_name = "TestFail"
    category = "testing"
    deterministic = False
    output_node = True

    def run(self, inputs, ctx):
        raise ValueError("this node always fails")


class KillWorker(Node):
    """Raise SystemExit in the worker thread."""

    type_name = "TestKillWorker"
    category = "testing"
    deterministic = False
    output_node = True

    def run(self, inputs, ctx):
        raise SystemExit("killed by TestKillWorker")


@hookimpl
def ldmgraph_nodes():
    return [Wait, Fail, KillWorker]
