"""Batch throughput: the local backend against the Ray backend on the bundled text-to-image model.

Rows: prompts x seeds of ``workflows/txt2img.json`` at 64x64 with few steps, so that per-row
overhead is visible next to the model's own work. Both backends run the same rows with one torch
thread per worker and are timed after a warm-up row (models loaded, actors started):

- ``local``: one executor in this process (``LocalBackend``);
- ``ray x1``: one Ray actor (``RayWorkerPool(workers=1)``) on a local 2-CPU cluster; its per-row
  overhead against ``local`` is what Ray adds: scheduling, moving parameters and PNG bytes;
- ``ray x2``: two actors, for throughput (on a 2-core machine shared with other jobs, expect less
  than 2x).

The machine is shared, so the overhead is measured on CPU time, which other jobs inflate far less
than wall time: for Ray, this process plus every process Ray started (its daemons and the actor),
against this process alone for ``local``. Wall time (best of ``--repeats`` alternating runs) is
printed too.

Usage: ``python benchmarks/batch.py [--rows 24] [--steps 4] [--repeats 2]``. Last line:
``local_rows_per_s=.. ray_rows_per_s=.. loads_per_worker=.. ray_overhead_ms_per_row=..``
(loads_per_worker: model-file loads on each worker over the loads one row needs; 1.0 = each model
loaded once per worker).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ldmgraph.batch import LocalBackend, RayBackend, RayWorkerPool, read_rows, run_batch
from ldmgraph.batch.plan import PlannedRow, plan_rows
from ldmgraph.cli import BUNDLED_MODELS
from ldmgraph.graph.context import Environment
from ldmgraph.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the centre"]


def rows_for(doc: dict[str, Any], env: Environment, count: int, steps: int, first_seed: int) -> list[PlannedRow]:
    table = Path(tempfile.mkdtemp()) / "rows.jsonl"
    table.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "steps": steps,
                                         "seed": first_seed + i}) + "\n" for i in range(count)))
    rows = read_rows(table, [], list(doc["parameters"]), {"prompt"})
    return plan_rows(doc, rows, PluginManager().registry, env)


def timed(doc: dict[str, Any], rows: list[PlannedRow], backend: Any, cpu_of_workers: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and the workers) for one batch of rows."""
    out = Path(tempfile.mkdtemp())
    cpu0, workers0, wall0 = time.process_time(), cpu_of_workers(), time.perf_counter()
    summary = run_batch(doc, rows, backend, out, progress=False)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0 + cpu_of_workers() - workers0
    assert summary.ok == len(rows), summary
    return wall, cpu


def ray_processes_cpu() -> float:
    """CPU seconds used so far by this process's descendants: Ray's daemons and its actors (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    me, total = os.getpid(), 0.0
    for pid in cpu:
        ancestor = parents.get(pid)
        while ancestor and ancestor != me:
            ancestor = parents.get(ancestor)
        total += cpu[pid] if ancestor == me else 0.0
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    torch.set_num_threads(1)
    doc = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    env = Environment(input_dir=ROOT, output_dir=Path(tempfile.mkdtemp()), model_dirs=(BUNDLED_MODELS,))
    warm = rows_for(doc, env, 1, args.steps, 10_000)
    batches = [rows_for(doc, env, args.rows, args.steps, 1000 * k) for k in range(2 * args.repeats + 1)]

    local = LocalBackend(env, threads=1)
    run_batch(doc, warm, local, Path(tempfile.mkdtemp()), progress=False)
    loads_one_row = local.runner.model_loads
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    single = RayBackend(RayWorkerPool(env, workers=1))
    run_batch(doc, warm, single, Path(tempfile.mkdtemp()), progress=False)
    local_runs, single_runs = [], []
    for k in range(args.repeats):  # alternate, so both see the same background load; new seeds each
        # time (the executors' caches would serve repeated rows), the same rows on both backends
        local_runs.append(timed(doc, batches[k], local, lambda: 0.0))
        single_runs.append(timed(doc, batches[k], single, ray_processes_cpu))
    single.close()
    double = RayBackend(RayWorkerPool(env, workers=2))
    run_batch(doc, rows_for(doc, env, 2, args.steps, 20_000), double, Path(tempfile.mkdtemp()), progress=False)
    double_wall, _ = min(timed(doc, batches[args.repeats + k], double, lambda: 0.0) for k in range(args.repeats))
    loads = [s["model_loads"] for s in double.pool.worker_stats()]
    double.close()
    ray.shutdown()

    n = args.rows
    local_wall, local_cpu = min(local_runs)
    ray_wall, _ = min(single_runs)
    ray_cpu = min(cpu for _, cpu in single_runs)
    local_cpu = min(cpu for _, cpu in local_runs)
    print(f"rows={n} steps={args.steps} 64x64, one torch thread per worker; best of {args.repeats}")
    print(f"local:  {local_wall:.2f} s wall, {local_cpu:.2f} s CPU")
    print(f"ray x1: {ray_wall:.2f} s wall, {ray_cpu:.2f} s CPU (driver, Ray daemons, actor)")
    print(f"ray x2: {double_wall:.2f} s wall; model loads per worker {loads} (one row needs {loads_one_row})")
    print(f"ray_overhead_wall_ms_per_row={(ray_wall - local_wall) / n * 1000:.1f} (shared machine: noisy)")
    print(f"local_rows_per_s={n / local_wall:.2f} ray_rows_per_s={n / double_wall:.2f} "
          f"loads_per_worker={sum(loads) / len(loads) / loads_one_row:.2f} "
          f"ray_overhead_ms_per_row={(ray_cpu - local_cpu) / n * 1000:.1f}")


if __name__ == "__main__":
    main()
