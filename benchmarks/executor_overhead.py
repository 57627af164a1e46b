"""Per-node overhead of the ldmgraph executor on graphs of trivial nodes.

Graphs: a 1,000-node chain (Const -> 998 x AddOne -> Output), a 1,000-node fan-in (500 Const
leaves summed pairwise by 499 Add nodes into one Output), and a 10,000-node chain, all run with
Python's default recursion limit. For each: a cold run (fresh executor: validation, keys,
execution), a fully cached re-run, and a re-run after changing the first node's literal. Times
are wall-clock, the best (minimum) over repeats as timeit does, since other processes share the
CPUs here, divided by the number of nodes in the graph; the median is printed alongside.

Usage: ``python benchmarks/executor_overhead.py [--repeats 5]``. The last line is the headline:
``cold_us_per_node=.. cached_us_per_node=.. changed_us_per_node=.. chain10k_us_per_node=..``
(the worse of the chain and the fan-in for the first three).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from ldmgraph.graph import InputField, Node, NodeContext, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.sockets import INT
from ldmgraph.plugins import PluginManager, hookimpl


class Const(Node):
    """An integer source."""

    type_name = "BenchConst"

    class Inputs(NodeInputs):
        value: int = InputField(INT, 0)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class AddOne(Node):
    """x + 1."""

    type_name = "BenchAddOne"

    class Inputs(NodeInputs):
        x: int = InputField(INT)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.x + 1)


class Add(Node):
    """a + b."""

    type_name = "BenchAdd"

    class Inputs(NodeInputs):
        a: int = InputField(INT)
        b: int = InputField(INT)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.a + inputs.b)


class Output(Node):
    """An output node that keeps its input."""

    type_name = "BenchOutput"
    output_node = True

    class Inputs(NodeInputs):
        x: int = InputField(INT)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(value=inputs.x)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    return [Const, AddOne, Add, Output]


def link(node: str) -> dict[str, str]:
    return {"node": node, "output": "value"}


def chain(n: int, first: int = 0) -> dict[str, Any]:
    """Const -> (n - 2) x AddOne -> Output."""
    nodes: dict[str, Any] = {"0": {"type": "BenchConst", "inputs": {"value": first}}}
    for i in range(1, n - 1):
        nodes[str(i)] = {"type": "BenchAddOne", "inputs": {"x": link(str(i - 1))}}
    nodes[str(n - 1)] = {"type": "BenchOutput", "inputs": {"x": link(str(n - 2))}}
    return {"format": "ldmgraph/1", "nodes": nodes}


def fan_in(leaves: int, first: int = 0) -> dict[str, Any]:
    """``leaves`` Const nodes summed pairwise into one Output: 2 * leaves nodes in all."""
    nodes: dict[str, Any] = {}
    level = []
    for i in range(leaves):
        nodes[f"c{i}"] = {"type": "BenchConst", "inputs": {"value": first if i == 0 else i}}
        level.append(f"c{i}")
    count = 0
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level) - 1, 2):
            node_id = f"a{count}"
            count += 1
            nodes[node_id] = {"type": "BenchAdd", "inputs": {"a": link(level[j]), "b": link(level[j + 1])}}
            nxt.append(node_id)
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    nodes["out"] = {"type": "BenchOutput", "inputs": {"x": link(level[0])}}
    return {"format": "ldmgraph/1", "nodes": nodes}


def measure(make: Any, size: int, repeats: int, registry: Any) -> dict[str, float]:
    """Median microseconds per node for cold, cached and changed-first-node runs."""
    cold, cached, changed, cpu = [], [], [], []
    for _ in range(repeats):
        doc, doc_changed = make(0), make(1)
        n = len(doc["nodes"])
        executor = Executor(registry)
        c0 = time.process_time()
        t0 = time.perf_counter()
        first = executor.run(doc)
        t1 = time.perf_counter()
        c1 = time.process_time()
        again = executor.run(doc)
        t2 = time.perf_counter()
        c2 = time.process_time()
        after = executor.run(doc_changed)
        t3 = time.perf_counter()
        c3 = time.process_time()
        cpu.append(((c1 - c0) / n * 1e6, (c2 - c1) / n * 1e6, (c3 - c2) / n * 1e6))
        assert len(first.executed) == n and not again.executed, "cache did not behave"
        assert after.executed, "changed run executed nothing"
        cold.append((t1 - t0) / n * 1e6)
        cached.append((t2 - t1) / n * 1e6)
        changed.append((t3 - t2) / n * 1e6)
    return {"cold": min(cold), "cached": min(cached), "changed": min(changed), "nodes": size,
            "median": (statistics.median(cold), statistics.median(cached), statistics.median(changed)),
            "cpu": tuple(min(run[i] for run in cpu) for i in range(3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    manager = PluginManager(builtins=[], entry_points_group=None, use_env=False)
    manager.register(sys.modules[__name__], "benchmark")
    registry = manager.registry
    print(f"python {sys.version.split()[0]}, recursion limit {sys.getrecursionlimit()}")
    results = {
        "chain1k": measure(lambda v: chain(1000, v), 1000, args.repeats, registry),
        "fanin1k": measure(lambda v: fan_in(500, v), 1000, args.repeats, registry),
        "chain10k": measure(lambda v: chain(10_000, v), 10_000, max(1, args.repeats // 2), registry),
    }
    for name, r in results.items():
        print(f"{name}: cold {r['cold']:.1f} us/node, cached {r['cached']:.1f} us/node, "
              f"changed-first-node {r['changed']:.1f} us/node "
              f"(wall medians {' / '.join(f'{m:.1f}' for m in r['median'])}; "
              f"CPU {' / '.join(f'{m:.1f}' for m in r['cpu'])})")
    ratio = results["chain10k"]["cold"] / results["chain1k"]["cold"]
    cpu_ratio = results["chain10k"]["cpu"][0] / results["chain1k"]["cpu"][0]
    print(f"chain10k / chain1k cold per-node ratio: wall {ratio:.2f}, CPU {cpu_ratio:.2f} (target <= 1.5)")
    worst = {k: max(results["chain1k"][k], results["fanin1k"][k]) for k in ("cold", "cached", "changed")}
    print(f"cold_us_per_node={worst['cold']:.1f} cached_us_per_node={worst['cached']:.1f} "
          f"changed_us_per_node={worst['changed']:.1f} chain10k_us_per_node={results['chain10k']['cold']:.1f}")


if __name__ == "__main__":
    main()
