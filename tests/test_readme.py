"""The README stays in step with the code: every built-in node type is documented, every saved
workflow is listed, and CI runs the README's own test command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_builtin_node_type_is_in_the_readme() -> None:
    out = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "nodes", "--json"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    builtin = [name for name, spec in json.loads(out).items() if spec["plugin"].startswith("ldmgraph.")]
    assert builtin
    missing = [name for name in builtin if f"`{name}`" not in README]
    assert not missing, f"README's node list lacks {missing}"


def test_every_saved_workflow_is_in_the_readme() -> None:
    names = sorted(p.name for p in (ROOT / "workflows").glob("*.json"))
    assert names
    assert [n for n in names if f"`{n}`" not in README] == []


def test_ci_runs_the_readme_install_and_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_section = README.split("## Test", 1)[1].split("##", 1)[0]
    command = next(line for line in test_section.splitlines() if "pytest" in line)
    # The README's line, less the venv creation (CI makes its own) and pip's quiet flags.
    steps = [s.strip() for s in command.split("&&") if "venv" not in s and "activate" not in s]
    ci_flat = " && ".join(line.strip() for line in ci.splitlines()).replace(" -q", "")
    for step in steps:
        assert step.replace(" -q", "") in ci_flat, f".ci/run does not run the README's step {step!r}"
