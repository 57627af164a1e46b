"""Memory estimates against measured peaks: the saved text-to-image workflow on the bundled model, one
sampler step at growing sizes, each run in a fresh process (tests/nodes/memory_probe.py) that prints the
estimate validation makes and the growth of its peak resident memory (VmHWM) over the run.

    python benchmarks/memory_estimate.py [--sizes 64 256 1024 2048]

The estimate must never fall more than 10% below the measured peak. Last line:
``estimate_vs_peak_<size>=... worst_estimate_vs_peak=...`` (estimate over measured peak growth).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "nodes" / "memory_probe.py"


def probe(size: int) -> dict[str, int]:
    out = tempfile.mkdtemp()
    done = subprocess.run([sys.executable, str(PROBE), str(ROOT / "workflows" / "txt2img.json"),
                           json.dumps({"steps": 1, "width": size, "height": size}), str(ROOT / "workflows" / "inputs"),
                           str(ROOT / "ldmgraph" / "assets" / "models"), out], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 2048])
    args = parser.parse_args()
    ratios = {}
    for size in args.sizes:
        found = probe(size)
        ratios[size] = found["estimate"] / found["growth"]
        print(f"{size}x{size}: estimate {found['estimate'] / 2**20:.0f} MiB, measured peak growth "
              f"{found['growth'] / 2**20:.0f} MiB", flush=True)
    print(" ".join(f"estimate_vs_peak_{s}={r:.2f}" for s, r in ratios.items())
          + f" worst_estimate_vs_peak={min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
