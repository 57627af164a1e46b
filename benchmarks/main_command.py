"""Wall time of the README's main command, start-up and model loading included, and where it goes.

    python benchmarks/main_command.py [--runs 3] [--prompt "a red circle on the left"] [--threads N] [--busy K]
                                      [--env NAME=VALUE]

Runs ``ldmgraph run workflows/txt2img.json --set prompt=... --output-dir D --profile --json`` in a
fresh process each time (the console script of the interpreter's environment, as a user would type
it), checks that each run wrote one PNG, and reads the run's own profile event (``--profile``):
interpreter start, imports (start-up imports plus every module imported later, torch included),
plugin discovery, validation, model load, text encoding, sampling, decode, PNG write, other (each
part without the imports made inside it). Wall seconds are measured around the process; CPU
seconds are the child's user + system time. The first run also pays for cold file caches; the
median is the figure a user sees on an idle 2-core machine (target: at most 4 s). On a loaded
machine, wall time counts the wait for a CPU and two torch threads spin against other processes:
compare CPU seconds there (``--threads 1`` gives the CPU cost without that spinning).

``--busy K`` measures the default settings on a machine doing other work: each idle run is
followed by the same run while K busy processes (pure-Python loops, one core each, each in a session
of its own like another job) hold the cores (interleaved, so that other jobs on a shared machine
weigh on both alike); the
last line then adds ``loaded_s`` (median of the loaded runs) and ``loaded_vs_idle`` (median loaded
over median idle, in the same invocation).

Last line: ``first_s=.. median_s=.. cpu_s=.. runs=.. interpreter_s=.. imports_s=.. plugins_s=..
validation_s=.. load_s=.. encode_s=.. sampling_s=.. decode_s=.. png_s=.. other_s=..``
(medians over the runs; the parts in wall seconds), with ``--busy K``: ``... busy=K loaded_s=..
loaded_vs_idle=..``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("interpreter", "imports", "plugins", "validation", "load", "encode", "sampling", "decode", "png", "other")
NODE_PARTS = {"CheckpointLoader": "load", "TextEncode": "encode", "Sampler": "sampling", "VAEDecode": "decode",
              "SaveImage": "png"}


def ldmgraph_command() -> list[str]:
    script = Path(sys.executable).with_name("ldmgraph")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ldmgraph.cli"]


def part_of(name: str) -> str:
    """The benchmark part of a profile phase name ("node ckpt (CheckpointLoader)" -> "load")."""
    fixed = {"interpreter start": "interpreter", "start-up imports": "imports", "plugin discovery": "plugins",
             "validation": "validation"}
    if name in fixed:
        return fixed[name]
    node_type = name.rsplit("(", 1)[-1].rstrip(")") if name.startswith("node ") else ""
    return NODE_PARTS.get(node_type, "other")


def breakdown(profile: dict, key: str) -> dict[str, float]:
    """Seconds per part (`key`: wall_s or cpu_s); import time is moved from each phase into `imports`."""
    parts = dict.fromkeys(PARTS, 0.0)
    for phase in profile["phases"]:
        part = part_of(phase["name"])
        seconds = phase[key] or 0.0
        imported = phase["import_s"] or 0.0
        if key == "cpu_s":  # CPU seconds of an import are not measured apart: share the wall ratio
            imported = seconds * imported / phase["wall_s"] if phase["wall_s"] else 0.0
        parts[part] += seconds - imported
        parts["imports"] += imported
    return parts


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(k: int, prompt: str, env: dict[str, str], extra: list[str]) -> tuple[float, float, dict]:
    out = Path(tempfile.mkdtemp(prefix="ldmgraph-main-"))
    try:
        command = [*ldmgraph_command(), "run", "workflows/txt2img.json", "--set", f"prompt={prompt}",
                   "--output-dir", str(out), "--no-progress", "--profile", "--json", *extra]
        cpu_before, start = children_cpu(), time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
        wall, cpu = time.perf_counter() - start, children_cpu() - cpu_before
        pngs = list(out.rglob("*.png"))
        if len(pngs) != 1:
            raise SystemExit(f"run {k}: expected one PNG in {out}, found {len(pngs)}")
        [profile] = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"kind": "profile"')]
        print(f"run {k}: {wall:.2f} s wall, {cpu:.2f} s CPU -> {pngs[0].name}", file=sys.stderr)
        return wall, cpu, profile
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="a red circle on the left")
    parser.add_argument("--threads", type=int, help="pass --threads N to the runs (default: ldmgraph's default)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the runs (e.g. OMP_WAIT_POLICY=ACTIVE with --threads 2: torch's "
                        "own default on a 2-core machine, to compare)")
    parser.add_argument("--busy", type=int, default=0, metavar="K",
                        help="also run while K busy processes hold the cores; prints loaded_vs_idle")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}  # the defaults a user gets
    env.update(item.split("=", 1) for item in args.env)
    extra = ["--threads", str(args.threads)] if args.threads else []

    runs, loaded = [], []
    for k in range(args.runs):  # idle and loaded runs interleaved: other jobs' load drifts alike for both
        runs.append(run_once(k, args.prompt, env, extra))
        if args.busy:
            loaded.append(loaded_run(k, args, env, extra))
    walls = [wall for wall, _, _ in runs]
    cpus = [cpu for _, cpu, _ in runs]
    wall_parts = {p: statistics.median(breakdown(r[2], "wall_s")[p] for r in runs) for p in PARTS}
    cpu_parts = {p: statistics.median(breakdown(r[2], "cpu_s")[p] for r in runs) for p in PARTS}
    load = os.getloadavg()[0]
    print(f"part          wall s   cpu s   (median of {len(runs)} runs; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs)")
    for part in PARTS:
        print(f"{part:<12}{wall_parts[part]:>8.2f}{cpu_parts[part]:>8.2f}")
    print(f"{'total':<12}{statistics.median(walls):>8.2f}{statistics.median(cpus):>8.2f}")
    figures = " ".join(f"{part}_s={wall_parts[part]:.2f}" for part in PARTS)
    line = (f"first_s={walls[0]:.2f} median_s={statistics.median(walls):.2f} cpu_s={statistics.median(cpus):.2f} "
            f"runs={len(runs)} {figures}")
    if args.busy:
        print(f"loaded by {args.busy} busy processes: {', '.join(f'{w:.2f}' for w in loaded)} s wall", file=sys.stderr)
        line += (f" busy={args.busy} loaded_s={statistics.median(loaded):.2f} "
                 f"loaded_vs_idle={statistics.median(loaded) / statistics.median(walls):.2f}")
    print(line)


def loaded_run(k: int, args: argparse.Namespace, env: dict[str, str], extra: list[str]) -> float:
    """Wall seconds of one run while ``args.busy`` processes spin on the cores."""
    # Each busy process in a session of its own, as another job (another terminal, another user) is:
    # with Linux's autogroup scheduling a session's processes share one CPU share, so busy loops in
    # this benchmark's session would take the measured run's share rather than compete with it.
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(args.busy)]
    try:
        time.sleep(0.5)  # let the busy processes take their cores
        return run_once(k, args.prompt, env, extra)[0]
    finally:
        for process in spin:
            process.kill()
            process.wait()

if __name__ == "__main__":
    main()
