"""The README stays a short front page that tells the truth: it fits in a head (at most 20,000
characters), its install-and-run and test commands are on the first screen, CI runs its test
command, the workflows its tour names exist, and each link it makes reaches a file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_at_most_20000_characters_with_both_commands_in_its_first_40_lines() -> None:
    assert len(README) <= 20_000, f"README.md has {len(README)} characters: move detail into docs/"
    first_screen = README.splitlines()[:40]
    assert any(line.startswith("python3 -m venv") and "ldmgraph run workflows/txt2img.json" in line
               for line in first_screen)
    assert any(line.startswith("python3 -m venv") and "python -m pytest" in line for line in first_screen)


def test_readme_quick_start_needs_no_environment_variable() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in quick.splitlines() if "ldmgraph run" in line)
    assert "OMP_" not in command and not re.search(r"\b[A-Z_]{3,}=", command)


def test_every_workflow_the_readme_names_exists_and_the_main_ones_are_there() -> None:
    """The tour names real files; the full listing is docs/saved-workflows.md (tests/test_docs.py)."""
    named = set(re.findall(r"`([a-z0-9_]+\.json)`", README))
    assert {"txt2img.json", "img2img.json", "inpaint.json", "superres.json", "controlnet.json"} <= named
    assert [n for n in sorted(named) if not (ROOT / "workflows" / n).is_file()] == []


def test_every_link_in_the_readme_reaches_a_file() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert links
    assert [link for link in links if "://" not in link and not (ROOT / link).exists()] == []


def test_ci_runs_the_readme_install_and_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_section = README.split("## Test", 1)[1].split("##", 1)[0]
    command = next(line for line in test_section.splitlines() if "pytest" in line)
    # The README's line, less the venv creation (CI makes its own) and pip's quiet flags.
    steps = [s.strip() for s in command.split("&&") if "venv" not in s and "activate" not in s]
    ci_flat = " && ".join(line.strip() for line in ci.splitlines()).replace(" -q", "")
    for step in steps:
        assert step.replace(" -q", "") in ci_flat, f".ci/run does not run the README's step {step!r}"
    assert "mkdocs build --strict" in ci and '".[docs]"' in ci
