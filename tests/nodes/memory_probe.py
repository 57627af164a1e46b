"""Run a workflow in this process and print its memory estimate and the measured peak RSS growth.

Usage: python memory_probe.py WORKFLOW.json OVERRIDES_JSON INPUT_DIR MODEL_DIR OUTPUT_DIR.
Prints one JSON line: {"estimate": bytes, "growth": bytes} where growth is the peak resident set
size after the run minus the one after the imports. The peak is this process's own high-water mark
(VmHWM): `ru_maxrss` would start at the parent's peak, which a child keeps across fork and exec.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    import torch

    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    torch.set_num_threads(1)
    doc_path, overrides, input_dir, model_dir, output_dir = sys.argv[1:6]
    env = Environment(input_dir=Path(input_dir), output_dir=Path(output_dir), model_dirs=(Path(model_dir),),
                      memory_budget=0)
    executor = Executor(load_registry(), env)
    compiled = executor.validate(json.loads(Path(doc_path).read_text()), json.loads(overrides))
    facts: dict = {}
    kept = works = 0
    for node_id in compiled.order:  # the same sum validation makes (graph/estimate.py)
        node = compiled.nodes[node_id]
        inputs = dict(node.literals)
        for name, source, output in node.links:
            inputs[name] = facts.get((source, output))
        found = node.cls.estimate(inputs, env)
        if found is not None:
            facts.update({(node_id, k): v for k, v in found.outputs.items()})
            kept, works = kept + found.keeps, max(works, found.works)
    # the model layer's modules are imported before the baseline: in a fresh checkout their first import
    # also compiles them to bytecode, a transient peak that is no allocation of the run
    import ldmgraph.models.checkpoint  # noqa: F401
    import ldmgraph.models.text_encoders  # noqa: F401

    before = peak_rss()
    executor.execute(compiled)
    after = peak_rss()
    print(json.dumps({"estimate": kept + works, "growth": after - before}))


if __name__ == "__main__":
    main()
