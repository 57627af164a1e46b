"""What latent previews cost a sampler step, in one run on the bundled text-to-image model.

Three ways to run the same Sampler node (the saved txt2img workflow, a new seed each time so the
node runs again), interleaved, timed in CPU seconds from its ``start`` to its ``done`` event:
``baseline`` with the node's progress callback replaced by a plain ``ctx.progress(k, n)`` (the
callback before previews existed), ``off`` (the run asks for no previews: the default), ``on``
(a preview every step). Also the preview alone on an SD-size latent (64x64, 512 px).

The last line is ``step_ms_baseline= step_ms_off= off_vs_baseline= on_vs_off= preview_ms_sd512=``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def plain_reporter(ctx: Any, total: int, model: Any = None) -> Any:
    def report(state: dict[str, Any]) -> None:
        ctx.progress(min(int(state["i"]) + 1, total), total)

    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from ldmgraph.diffusion.preview import LatentPreviewer, preview_table
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.nodes import sampling
    from ldmgraph.plugins import load_registry

    doc = json.loads((REPO / "workflows" / "txt2img.json").read_text(encoding="utf-8"))
    doc["nodes"]["sampler"]["inputs"]["steps"] = args.steps
    out = Path(tempfile.mkdtemp(prefix="ldmgraph-preview-bench-"))
    executor = Executor(load_registry(), Environment(output_dir=out, model_dirs=(REPO / "ldmgraph" / "assets" / "models",)))
    original = sampling.step_reporter
    times: dict[str, list[float]] = {"baseline": [], "off": [], "on": []}
    seed = 0
    for rep in range(args.reps + 1):  # the first round loads the model and warms up; not counted
        for mode in times:
            seed += 1
            run = copy.deepcopy(doc)
            run["nodes"]["sampler"]["inputs"]["seed"] = seed
            marks: dict[str, float] = {}

            def on_event(event: Any, marks: dict[str, float] = marks) -> None:
                if event.node_id == "sampler" and event.kind in ("start", "done"):
                    marks[event.kind] = time.process_time()

            sampling.step_reporter = plain_reporter if mode == "baseline" else original  # type: ignore[assignment]
            try:
                executor.run(run, on_event=on_event, previews=1 if mode == "on" else 0)
            finally:
                sampling.step_reporter = original  # type: ignore[assignment]
            if rep:
                times[mode].append((marks["done"] - marks["start"]) / args.steps)
    step = {mode: statistics.median(values) for mode, values in times.items()}

    sd = next(space for space in preview_table() if space.name == "sd-kl-f8")
    previewer = LatentPreviewer(sd)
    latent = torch.randn(1, 4, 64, 64)
    previewer(latent)
    started = time.process_time()
    for _ in range(200):
        previewer(latent)
    preview_ms = (time.process_time() - started) / 200 * 1000
    for mode, value in step.items():
        print(f"{mode}: {value * 1000:.2f} ms CPU per step (median of {len(times[mode])})")
    print(f"step_ms_baseline={step['baseline'] * 1000:.2f} step_ms_off={step['off'] * 1000:.2f} "
          f"off_vs_baseline={step['off'] / step['baseline']:.3f} on_vs_off={step['on'] / step['off']:.3f} "
          f"preview_ms_sd512={preview_ms:.3f}")


if __name__ == "__main__":
    main()
