"""How fast `ldmgraph batch` checks a large table before the first row runs.

Writes a CSV of N rows for the saved text-to-image workflow (prompt and seed columns) whose last row
is out of bounds, runs `ldmgraph batch` on it in a child process, and reports rows checked per
second of the child's CPU time (the check streams the table twice: shape and count, then values).
Last line: `rows=N rows_per_s=R seconds=S`.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    table = folder / "p.csv"
    with table.open("w") as f:
        f.write("prompt,seed\n" + "".join(f"a red circle {i},{i}\n" for i in range(args.rows - 1)) + "bad,-5\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "batch", str(ROOT / "workflows" / "txt2img.json"),
                           "--params", str(table), "--output-dir", str(folder / "out"), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 2 and f"row {args.rows}," in proc.stderr, proc.stderr[-2000:]
    print(f"rows={args.rows} rows_per_s={args.rows / seconds:.0f} seconds={seconds:.1f}")


if __name__ == "__main__":
    main()
