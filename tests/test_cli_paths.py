"""The paths a user takes from the command line, through the CLI itself: a file named anywhere with
--set, --set NODE.INPUT on saved and imported graphs, digits and `true` as a prompt, "did you
mean", `nodes FILTER` with long choice lists abbreviated, the fp16-on-CPU warning, and the way from
a refused paper `.ckpt` to a finished run by following the messages alone."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldmgraph.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
FAST = ["--set", "steps=2", "--no-progress"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pixels(folder: Path) -> np.ndarray:
    [png] = sorted(folder.glob("*.png"))
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def png_parameters(folder: Path) -> dict[str, Any]:
    [png] = sorted(folder.glob("*.png"))
    with Image.open(png) as image:
        return json.loads(image.text["ldmgraph:parameters"])


# -- files named on the command line ------------------------------------------------------------------
@pytest.mark.slow
def test_set_an_absolute_path_outside_the_input_folder_runs(tmp_path, capsys) -> None:
    """`--set image=/abs/photo.png` runs, and gives the image that the same file in the input folder gives."""
    elsewhere = tmp_path / "my photos" / "photo.png"
    elsewhere.parent.mkdir()
    shutil.copy(WORKFLOWS / "inputs" / "shapes.png", elsewhere)
    code, _, err = run(capsys, "run", str(WORKFLOWS / "img2img.json"), "--set", f"image={elsewhere}",
                       "--output-dir", str(tmp_path / "a"), *FAST)
    assert code == 0, err
    code, _, err = run(capsys, "run", str(WORKFLOWS / "img2img.json"), "--set", "image=shapes.png",
                       "--output-dir", str(tmp_path / "b"), *FAST)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b"))
    # the PNG carries the file: it re-runs with the original moved away
    [png] = (tmp_path / "a").glob("*.png")
    elsewhere.unlink()
    code, _, err = run(capsys, "run", str(png), "--output-dir", str(tmp_path / "c"), "--no-progress")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "c"))


def test_a_workflow_file_naming_an_absolute_path_is_still_refused_and_says_what_to_do(tmp_path, capsys) -> None:
    doc = json.loads((WORKFLOWS / "img2img.json").read_text())
    doc["nodes"]["image"]["inputs"]["image"] = str(WORKFLOWS / "inputs" / "shapes.png")
    (tmp_path / "w.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "validate", str(tmp_path / "w.json"))
    assert code == 2 and "unsafe_path" in err and "--input-dir" in err and "--set" in err


def test_set_a_model_file_by_its_path(tmp_path, capsys) -> None:
    model = tmp_path / "elsewhere" / "mine.safetensors"
    model.parent.mkdir()
    shutil.copy(ROOT / "ldmgraph" / "assets" / "models" / "ldmgraph-shapes-txt2img.safetensors", model)
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--set", f"ckpt_name={model}",
                       "--output-dir", str(tmp_path / "a"), *FAST)
    assert code == 0, err
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--output-dir", str(tmp_path / "b"), *FAST)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b"))


# -- --set NODE.INPUT ----------------------------------------------------------------------------------
def test_set_node_input_sets_an_undeclared_literal_input(tmp_path, capsys) -> None:
    """`--set sampler.steps=2` is the declared `steps=2`; `latent.width` is declared by no parameter."""
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--set", "sampler.steps=2",
                       "--output-dir", str(tmp_path / "a"), "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--set", "steps=2",
                       "--output-dir", str(tmp_path / "b"), "--no-progress")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b"))
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--set", "save.filename_prefix=mine",
                       "--output-dir", str(tmp_path / "c"), *FAST)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "c").glob("*.png")] == ["mine_00001_.png"]


def test_set_node_input_on_an_imported_comfyui_graph(tmp_path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "interop"))
    from comfy_graphs import API_TXT2IMG

    graph = json.loads(json.dumps(API_TXT2IMG))
    graph.pop("11")  # the preview: one PNG to compare
    (tmp_path / "comfy.json").write_text(json.dumps(graph))
    code, _, err = run(capsys, "run", str(tmp_path / "comfy.json"), "--set", "5.width=48", "--set", "5.height=32",
                       "--set", "3.sampler=dpmpp_2m", "--output-dir", str(tmp_path / "a"), "--no-progress")
    assert code == 0, err
    graph["5"]["inputs"].update(width=48, height=32)
    graph["3"]["inputs"]["sampler_name"] = "dpmpp_2m"
    (tmp_path / "edited.json").write_text(json.dumps(graph))
    code, _, err = run(capsys, "run", str(tmp_path / "edited.json"), "--output-dir", str(tmp_path / "b"),
                       "--no-progress")
    assert code == 0, err
    assert pixels(tmp_path / "a").shape == (32, 48, 3)
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b"))


def test_set_node_input_of_a_linked_input_is_refused(capsys) -> None:
    code, _, err = run(capsys, "validate", str(WORKFLOWS / "txt2img.json"), "--set", "sampler.model=1")
    assert code == 2 and "bad_parameter" in err and "linked from node 'ckpt'" in err


# -- values as typed -----------------------------------------------------------------------------------
@pytest.mark.parametrize("typed", ["42", "true", "3.5"])
def test_digits_and_true_as_a_prompt_are_text(typed, tmp_path, capsys) -> None:
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--set", f"prompt={typed}",
                       "--output-dir", str(tmp_path / "a"), *FAST)
    assert code == 0, err
    assert png_parameters(tmp_path / "a")["prompt"] == typed
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--set", f"prompt={json.dumps(typed)}",
                       "--output-dir", str(tmp_path / "b"), *FAST)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b"))


def test_a_number_input_still_refuses_text(capsys) -> None:
    code, _, err = run(capsys, "validate", str(WORKFLOWS / "txt2img.json"), "--set", "steps=many")
    assert code == 2 and "wrong_type" in err


# -- did you mean --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "code_name", "suggestion"), [
    ("stpes", "bad_parameter", "'steps'"),
    ("sampler.stpes", "unknown_input", "'steps'"),
    ("samplr.steps", "bad_parameter", "'sampler'"),
])
def test_a_misspelt_name_gets_did_you_mean(name, code_name, suggestion, capsys) -> None:
    code, _, err = run(capsys, "validate", str(WORKFLOWS / "txt2img.json"), "--set", f"{name}=3")
    assert code == 2 and code_name in err and f"did you mean {suggestion}" in err


def test_a_misspelt_input_in_a_workflow_file_gets_did_you_mean(tmp_path, capsys) -> None:
    doc = json.loads((WORKFLOWS / "txt2img.json").read_text())
    doc["nodes"]["sampler"]["inputs"]["stpes"] = doc["nodes"]["sampler"]["inputs"].pop("steps")
    doc["parameters"].pop("steps")
    (tmp_path / "w.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "validate", str(tmp_path / "w.json"))
    assert code == 2 and "unknown_input" in err and "did you mean 'steps'" in err


# -- nodes FILTER ---------------------------------------------------------------------------------------
def test_nodes_filter_and_long_choice_lists_abbreviated(capsys) -> None:
    code, out, _ = run(capsys, "nodes", "classcond")
    assert code == 0
    assert re.findall(r"^  (\S+)  ", out, re.MULTILINE) == ["ClassConditioning"]
    line = next(line for line in out.splitlines() if line.strip().startswith("class_name:"))
    assert "(1001 choices; --json lists them all)" in line and len(line) < 400
    code, out, _ = run(capsys, "nodes", "classcond", "--json")
    assert len(json.loads(out)["ClassConditioning"]["inputs"]["class_name"]["choices"]) == 1001
    code, out, _ = run(capsys, "nodes", "sampling")  # a category matches too
    assert "  Sampler  " in out and "  LoadImage  " not in out
    code, _, err = run(capsys, "nodes", "no-such-thing")
    assert code == 1 and "no node type matches" in err


def test_node_help_is_not_cut_mid_sentence(capsys) -> None:
    code, out, _ = run(capsys, "nodes", "ClassLabel")
    head = next(line for line in out.splitlines() if line.startswith("  ClassLabel  "))
    assert head.rstrip().endswith((".", ")")) and "Dhariwal & Nichol 2021" in head


# -- fp16 on the CPU ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp16_on_the_cpu_warns_with_the_measured_cost(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--precision", "fp16", "--device", "cpu",
                       "--output-dir", str(tmp_path), *FAST)
    assert code == 0, err
    assert re.search(r"warning: fp16 weights on the CPU .*\d(\.\d)?x the CPU time of fp32", err)
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--precision", "fp32", "--device", "cpu",
                       "--output-dir", str(tmp_path), *FAST)
    assert code == 0 and "fp16" not in err


def test_validate_on_an_explicit_cpu_warns_of_fp16(capsys) -> None:
    code, _, err = run(capsys, "validate", str(WORKFLOWS / "txt2img.json"), "--set", "ckpt.dtype=fp16",
                       "--device", "cpu")
    assert code == 0 and "warning: fp16 weights on the CPU (ckpt)" in err


# -- a paper .ckpt: from the refusal to a run, by following the messages ---------------------------------
def paper_ckpt(models: Path, folder: str, release: str) -> Path:
    """A release-shaped random checkpoint (reduced widths) as the original repository ships it: a pickled
    `model.ckpt` with `config.yaml` beside it, at models/ldm/<folder>/."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests" / "workflows"))
    from test_paper_workflows import write_release

    safetensors = write_release(models / "ldm" / folder, release, seed=1)
    ckpt = safetensors.with_name("model.ckpt")
    torch.save({"state_dict": load_file(str(safetensors)), "global_step": 1}, ckpt)
    safetensors.unlink()
    return ckpt


def follow_the_command(err: str, capsys) -> None:
    """Run the `ldmgraph convert ...` line the message gives, as a user would paste it."""
    line = next(line.strip() for line in err.splitlines() if line.strip().startswith("ldmgraph convert "))
    code, _, convert_err = run(capsys, *shlex.split(line)[1:])
    assert code == 0, convert_err


def test_paper_ckpt_beside_the_expected_file_converts_and_runs_by_following_the_messages(tmp_path, capsys) -> None:
    models = tmp_path / "models"
    paper_ckpt(models, "cin256-v2", "cin256-v2")
    argv = ["run", str(WORKFLOWS / "paper" / "class_conditional.json"), "--models-dir", str(models),
            "--output-dir", str(tmp_path / "out"), "--set", "steps=2", "--set", "width=32", "--set", "height=32",
            "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "file_not_found" in err and "model.ckpt" in err
    follow_the_command(err, capsys)
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert pixels(tmp_path / "out").shape == (32, 32, 3)


def test_a_ckpt_named_directly_gets_the_command_and_the_name_to_use(tmp_path, capsys) -> None:
    models = tmp_path / "models"
    paper_ckpt(models, "cin256-v2", "cin256-v2")
    argv = ["run", str(WORKFLOWS / "paper" / "class_conditional.json"), "--models-dir", str(models),
            "--output-dir", str(tmp_path / "out"), "--set", "steps=2", "--set", "width=32", "--set", "height=32",
            "--no-progress"]
    code, _, err = run(capsys, *argv, "--set", "ckpt_name=ldm/cin256-v2/model.ckpt")
    assert code == 2 and "pickle_checkpoint" in err
    follow_the_command(err, capsys)
    name = re.search(r"then name (\S+) instead of model\.ckpt", err).group(1)
    code, _, err = run(capsys, *argv, "--set", f"ckpt_name=ldm/cin256-v2/{name}")
    assert code == 0, err


# -- threads ---------------------------------------------------------------------------------------------
def test_threads_below_one_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys, "run", str(WORKFLOWS / "txt2img.json"), "--threads", "0")
    assert code == 2 and "--threads must be at least 1" in err


@pytest.mark.parametrize("command", ["run", "serve", "evaluate"])
def test_threads_apply_while_the_command_runs_and_are_undone_after(command, capsys, monkeypatch) -> None:
    """While the command runs, OpenMP is told N threads waiting passively (set before torch starts its
    pool); the caller's environment is its own again afterwards. Default: one thread."""
    import os

    import ldmgraph.cli as cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen: list[tuple[Any, Any]] = []

    def spy(args: Any) -> int:
        seen.append((os.environ.get("OMP_NUM_THREADS"), os.environ.get("OMP_WAIT_POLICY")))
        return 0

    argv = {"run": ["run", "w.json"], "serve": ["serve"], "evaluate": ["evaluate"]}[command]
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sub.choices[command].set_defaults(func=spy)
    monkeypatch.setattr(cli, "build_parser", lambda name=None: parser)
    assert cli.main([*argv, "--threads", "3"]) == 0
    assert cli.main(argv) == 0
    assert seen == [("3", "PASSIVE"), ("1", "PASSIVE")]
    assert "OMP_NUM_THREADS" not in os.environ and "OMP_WAIT_POLICY" not in os.environ


def test_batch_set_of_a_text_parameter_keeps_digits_as_text(tmp_path, capsys) -> None:
    """`batch --set prefix=42` names the files 42, as `run --set` and a CSV cell read it."""
    sys.path.insert(0, str(ROOT / "tests" / "batch"))
    from batch_helpers import blend_workflow

    (tmp_path / "blend.json").write_text(json.dumps(blend_workflow()))
    code, _, err = run(capsys, "batch", str(tmp_path / "blend.json"), "--set", "prefix=42", "--sweep",
                       "strength=0.25,0.5", "--input-dir", str(WORKFLOWS / "inputs"), "--output-dir",
                       str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["row00001_42_00001_.png",
                                                                          "row00002_42_00001_.png"]


def test_params_abbreviates_long_choice_lists_too(capsys) -> None:
    code, out, _ = run(capsys, "params", str(WORKFLOWS / "paper" / "class_conditional.json"))
    line = next(line for line in out.splitlines() if line.startswith("class_name:"))
    assert code == 0 and "(1001 choices; --json lists them all)" in line and len(line) < 400
    code, out, _ = run(capsys, "params", str(WORKFLOWS / "paper" / "class_conditional.json"), "--json")
    assert len(json.loads(out)["class_name"]["choices"]) == 1001
