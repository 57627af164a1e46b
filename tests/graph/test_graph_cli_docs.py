"""The command line and its documentation tell the truth: codes, flags, subcommand help, --version,
params, nodes listing, usage errors, the torch install line and the bundled models' limits. The
README is the front page; the detail lives in docs/ (the guide, the error codes, the bundled models)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ldmgraph import cli
from ldmgraph.cli import main
from ldmgraph.graph import codes

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDE = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
ERRORS = (ROOT / "docs" / "reference" / "errors.md").read_text(encoding="utf-8")
BUNDLED = (ROOT / "docs" / "bundled-models.md").read_text(encoding="utf-8")
CORE_COMMANDS = ("run", "validate", "params", "nodes", "schema", "plugins")


def section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- codes ---------------------------------------------------------------------------------------------
def test_readme_code_table_is_the_code_table() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", ERRORS, re.MULTILINE)
    assert dict(rows) == codes.CODES


def test_every_code_constant_is_in_the_table() -> None:
    constants = {v for k, v in vars(codes).items() if k.isupper() and isinstance(v, str)}
    assert constants == set(codes.CODES)
    assert "not_a_choice" not in README + ERRORS


def test_every_code_the_package_emits_is_a_documented_constant() -> None:
    """Every `codes.NAME` used anywhere in the package names a constant of the table."""
    used = set()
    for path in (ROOT / "ldmgraph").rglob("*.py"):
        used |= set(re.findall(r"\bcodes\.([A-Z_]+)\b", path.read_text(encoding="utf-8")))
    assert used and all(getattr(codes, name, None) in codes.CODES for name in used - {"CODES"})
    for emitted in ("bad_document", "link_required", "unknown_input", "unknown_output", "check_failed"):
        assert f"| `{emitted}` |" in ERRORS


# -- flags and subcommands -----------------------------------------------------------------------------
def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")} - {"--help"}


def test_every_flag_of_the_core_commands_is_in_the_guide() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = GUIDE
    flags = options_of(parser)
    for command in CORE_COMMANDS:
        assert f"ldmgraph {command}" in text
        flags |= options_of(subparsers.choices[command])
    assert {"--output", "--no-progress", "--plugin-dir", "--version", "--set", "--json"} <= flags
    assert sorted(flag for flag in flags if not re.search(rf"[` ]{flag}(?![\w-])", text)) == []


def test_every_subcommand_has_a_one_line_description() -> None:
    done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0
    assert "(from " not in done.stdout
    listed = re.findall(r"^    (\w+)\s+(\S.*)$", done.stdout, re.MULTILINE)
    names = {name for name, _ in listed}
    assert set(CORE_COMMANDS) | {"train", "evaluate", "import"} <= names
    assert all(len(help_text) > 10 for _, help_text in listed)


def test_version_is_the_installed_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ldmgraph {importlib.metadata.version('ldmgraph')}"


@pytest.mark.parametrize("argv", [["run", "w.json", "--set", "steps"], ["validate", "w.json", "--set", "=3"],
                                  ["run"], ["nodes", "--bogus"]])
def test_usage_errors_exit_2_and_say_so(argv) -> None:
    done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "usage error" in done.stderr


# -- params and nodes ----------------------------------------------------------------------------------
def test_params_lists_each_parameter_with_type_value_bounds_and_help(capsys) -> None:
    path = ROOT / "workflows" / "txt2img.json"
    doc = json.loads(path.read_text())
    code, out, _ = run_cli(capsys, "params", str(path), "--json")
    assert code == 0
    listing = json.loads(out)
    assert list(listing) == list(doc["parameters"])
    for name, declared in doc["parameters"].items():
        target = declared["targets"][0]
        assert listing[name]["value"] == doc["nodes"][target["node"]]["inputs"][target["input"]]
        assert listing[name]["targets"][0] == f"{target['node']}.{target['input']}"
        assert listing[name]["description"] == declared.get("description", "") or listing[name]["description"]
    assert listing["steps"]["type"] == "INT" and listing["steps"]["ge"] == 1
    assert "dpmpp_2m" in listing["sampler"]["choices"]
    code, out, _ = run_cli(capsys, "params", str(path))
    assert code == 0
    assert re.search(r"^steps: INT = \d+, range 1\.\.\d+  \S", out, re.MULTILINE)
    assert re.search(r"^sampler: ENUM = \"\w+\", one of .*euler", out, re.MULTILINE)


def test_params_of_a_broken_document_exits_2(capsys, tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run_cli(capsys, "params", str(tmp_path / "bad.json"))
    assert code == 2 and "bad_document" in err


def test_plain_nodes_listing_shows_defaults_bounds_and_choices(capsys) -> None:
    code, out, _ = run_cli(capsys, "nodes")
    assert code == 0
    code, listing_json, _ = run_cli(capsys, "nodes", "--json")
    scale = json.loads(listing_json)["ImageScale"]["inputs"]
    width = scale["width"]
    assert f"      width: INT = {width['default']}, range {width['ge']:g}..{width['le']:g}" in out
    assert f"      upscale_method: ENUM = \"bicubic\", one of {', '.join(scale['upscale_method']['choices'])}" in out
    assert "      image: IMAGE (required)" in out


# -- README facts --------------------------------------------------------------------------------------
def test_readme_install_line_says_what_torch_takes_per_platform() -> None:
    quick = section("Quick start: generate an image (fresh machine, CPU, no download)")
    assert "Linux x86_64" in quick and "CUDA build" in quick
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in quick
    assert "macOS" in quick and "Windows" in quick


def test_readme_documents_the_bundled_models_vocabulary_and_native_size() -> None:
    from ldmgraph.train.data.vocab import COLOURS, IMAGE_SIZE, POSITION_PHRASES, SHAPES, SIZES

    models = BUNDLED
    assert f"{IMAGE_SIZE}x{IMAGE_SIZE} images (their native size" in models
    vocabulary = models.split("What the bundled models know", 1)[1].split("- **Data**", 1)[0]
    vocabulary = " ".join(vocabulary.split())
    assert f"{len(COLOURS)} colours" in vocabulary and f"{len(SHAPES)} shapes" in vocabulary
    assert f"{len(POSITION_PHRASES)} positions" in vocabulary and f"{len(SIZES)} sizes" in vocabulary
    for word in [*COLOURS, *SHAPES, *POSITION_PHRASES.values(), *SIZES]:
        assert word in vocabulary, word
