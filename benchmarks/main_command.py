"""Wall time of the README's main command, start-up and model loading included.

    python benchmarks/main_command.py [--runs 3] [--prompt "a red circle on the left"]

Runs ``ldmgraph run workflows/txt2img.json --set prompt=... --output-dir D`` in a fresh process
each time (the console script of the interpreter's environment, as a user would type it) and checks
that each run wrote one PNG. The first run also pays for cold file caches; the median is the
figure a user sees on an idle machine (issue 6's target: under 20 s on the 2-core CPU machine).
Run it on an idle machine: a training job on the same cores distorts it badly.

Last line: ``first_s=<s> median_s=<s> runs=<n>``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ldmgraph_command() -> list[str]:
    script = Path(sys.executable).with_name("ldmgraph")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ldmgraph.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="a red circle on the left")
    args = parser.parse_args()

    times = []
    for k in range(args.runs):
        out = Path(tempfile.mkdtemp(prefix="ldmgraph-main-"))
        try:
            command = [*ldmgraph_command(), "run", "workflows/txt2img.json", "--set", f"prompt={args.prompt}",
                       "--output-dir", str(out), "--no-progress"]
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            pngs = list(out.rglob("*.png"))
            if len(pngs) != 1:
                raise SystemExit(f"run {k}: expected one PNG in {out}, found {len(pngs)}")
            print(f"run {k}: {times[-1]:.2f} s -> {pngs[0].name}", file=sys.stderr)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print(f"first_s={times[0]:.2f} median_s={statistics.median(times):.2f} runs={len(times)}")


if __name__ == "__main__":
    main()
