"""The documentation site stays equal to the code: the generated pages (nodes, command line, error
codes) are what `scripts/gen_docs.py` makes from the code now, each one checked against the code
through another path too (the CLI's `nodes --json`, the parsers, the code table), and the site
builds with `mkdocs build --strict` (a broken link or a missing page fails)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldmgraph import cli
from ldmgraph.graph import codes

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_pages_equal_what_the_code_generates_now() -> None:
    stale = [str(path.relative_to(ROOT)) for path, text in gen_docs().generated().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert stale == [], f"{stale} drifted from the code: run python scripts/gen_docs.py"


def test_generated_docs_check_mode_fails_on_a_drifted_page(tmp_path, monkeypatch) -> None:
    module = gen_docs()
    for name in module.PAGES:
        shutil.copy(DOCS / "reference" / name, tmp_path / name)
    monkeypatch.setattr(module, "REFERENCE", tmp_path)
    assert module.main(["--check"]) == 0
    (tmp_path / "nodes.md").write_text((tmp_path / "nodes.md").read_text().replace("### `VAEDecode`", "### `Gone`"))
    assert module.main(["--check"]) == 1
    assert module.main([]) == 0 and module.main(["--check"]) == 0  # the script rewrote it


def test_nodes_page_lists_every_builtin_node_type_with_each_input() -> None:
    out = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "nodes", "--json"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    page = (DOCS / "reference" / "nodes.md").read_text(encoding="utf-8")
    builtin = {name: spec for name, spec in json.loads(out).items() if spec["plugin"].startswith("ldmgraph.")}
    assert len(builtin) > 40
    for name, spec in builtin.items():
        section = page.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        assert page.count(f"### `{name}`\n") == 1, f"{name} listed twice"
        for input_name, input_spec in spec["inputs"].items():
            assert f"| `{input_name}` | {input_spec['type']} |" in section, (name, input_name)


def test_errors_page_table_is_the_code_table() -> None:
    page = (DOCS / "reference" / "errors.md").read_text(encoding="utf-8")
    assert dict(re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", page, re.MULTILINE)) == codes.CODES


def test_cli_page_has_every_command_and_every_option_of_the_parsers() -> None:
    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"run", "validate", "nodes", "batch", "serve", "train", "evaluate", "convert", "import"} <= set(commands)
    for name in commands:
        sub = next(a for a in cli.build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        section = page.split(f"## `ldmgraph {name}`\n", 1)[1].split("\n## ", 1)[0]
        for action in sub.choices[name]._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, (name, flag)


def test_every_option_of_every_command_has_help_text() -> None:
    parser = cli.build_parser()
    names = list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    missing = []
    for name in names:
        sub = next(a for a in cli.build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub.choices[name]._actions if not a.help]
    assert missing == []


def test_top_level_help_names_every_kind_of_train() -> None:
    from ldmgraph.train.cli import TRAIN_KINDS

    done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "--help"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    train_line = " ".join(re.split(r"\n    \w", done.stdout.split("\n    train", 1)[1], maxsplit=1)[0].split())
    assert [kind for kind in TRAIN_KINDS if kind not in train_line.lower()] == []
    guide = (DOCS / "guide.md").read_text(encoding="utf-8")
    assert [kind for kind in TRAIN_KINDS if kind not in guide.split("ldmgraph train", 1)[1].split("\n", 1)[0]] == []


def test_saved_workflows_page_lists_every_saved_workflow_and_its_parameters() -> None:
    page = (DOCS / "saved-workflows.md").read_text(encoding="utf-8")
    listing = (ROOT / "workflows" / "README.md").read_text(encoding="utf-8")
    for path in sorted((ROOT / "workflows").glob("*.json")):
        assert f"`{path.name}`" in page and f"`{path.name}`" in listing, path.name
        row = next(line for line in page.splitlines() if line.startswith(f"| `{path.name}`"))
        for name in json.loads(path.read_text())["parameters"]:
            if name not in ("ckpt_name", "seed", "steps", "negative_prompt", "sampler", "schedule", "cfg"):
                assert name in row or "..." in row, (path.name, name)


def test_hires_fix_is_described_at_the_size_it_runs() -> None:
    doc = json.loads((ROOT / "workflows" / "hires_fix.json").read_text())
    size = next(n["inputs"]["width"] for n in doc["nodes"].values() if "width" in n.get("inputs", {}))
    for page in (ROOT / "workflows" / "README.md", DOCS / "saved-workflows.md", ROOT / "README.md"):
        row = next(line for line in page.read_text().splitlines() if "`hires_fix.json`" in line)
        assert f"{size}x{size}" in row, page


def test_evaluate_says_how_many_bundled_files_it_reads() -> None:
    shipped = list((ROOT / "ldmgraph" / "assets" / "models").glob("ldmgraph-shapes-*.safetensors"))
    words = {3: "three", 4: "four", 5: "five"}[len(shipped)]
    help_text = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "evaluate", "--help"], capture_output=True,
                               text=True, check=True, cwd=ROOT).stdout
    assert f"{words} bundled files" in " ".join(help_text.split())


def test_sections_the_docs_refer_to_exist() -> None:
    guide = (DOCS / "guide.md").read_text(encoding="utf-8")
    for heading in ("## Progress and previews", "## Threads", "## Paths you type"):
        assert heading in guide


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path) -> None:
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed (pip install -e ".[docs]")')
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "nodes" / "index.html").is_file()
    assert "RayWorkerPool" in (tmp_path / "site" / "api" / "batch" / "index.html").read_text()


def test_paper_workflows_load_the_files_the_models_page_names() -> None:
    """Each paper workflow's row in docs/models.md names the release and the exact file it loads."""
    page = (DOCS / "models.md").read_text(encoding="utf-8")
    for path in sorted((ROOT / "workflows" / "paper").glob("*.json")):
        doc = json.loads(path.read_text())
        [ckpt] = [n["inputs"]["ckpt_name"] for n in doc["nodes"].values() if n["type"] == "CheckpointLoader"]
        row = next(line for line in page.splitlines() if f"`paper/{path.name}`" in line)
        assert f"`{ckpt}`" in row, (path.name, ckpt)
    row = next(line for line in page.splitlines() if "`paper/txt2img.json`" in line)
    assert "txt2img-f8-large" in row and "text2img-large" in row  # the release's name and its folder


def test_site_home_page_is_the_readme() -> None:
    hooks = ROOT / "scripts" / "mkdocs_hooks.py"
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", hooks)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class File:
        src_uri = "index.md"

    class Page:
        file = File()

    text = module.on_page_read_source(Page(), {"config_file_path": str(ROOT / "mkdocs.yml")})
    assert text.startswith("# ldmgraph") and "](docs/" not in text and "## Quick start" in text
    linked = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert [link for link in linked if "://" not in link and not (DOCS / link).exists()] == []
