"""A saved PNG re-runs to identical pixels; bad inputs give one clear error each, and no output file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmgraph.cli import main
from ldmgraph.graph import codes
from ldmgraph.graph.errors import ExecutionError, ValidationError

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_png_rerun_in_a_new_process_gives_identical_pixels(make_executor, models_dir, tmp_path, one_thread):
    first = make_executor(output_dir=tmp_path / "first").run(
        load("txt2img"), overrides={"steps": 3, "seed": 1234}
    )
    png = first.files[0]
    again = tmp_path / "again"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "ldmgraph.cli",
        "run",
        str(png),
        "--models-dir",
        str(models_dir),
        "--output-dir",
        str(again),
        "--no-progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    (rerun,) = again.glob("*.png")
    assert np.array_equal(pixels(rerun), pixels(png))
    with Image.open(rerun) as image:
        assert json.loads(image.text["ldmgraph:parameters"])["seed"] == 1234


@pytest.fixture
def input_dir(tmp_path: Path) -> Path:
    """An input folder with the sample image, a file that is not an image, and a too-small mask."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(WORKFLOWS / "inputs" / "shapes.png", folder / "shapes.png")
    (folder / "broken.png").write_text("this is not an image")
    Image.new("L", (32, 32), 255).save(folder / "small_mask.png")
    return folder


def no_images(folder: Path) -> bool:
    return not folder.exists() or not list(folder.rglob("*.png"))


def test_a_file_that_is_not_an_image_is_a_clear_error(make_executor, input_dir, tmp_path):
    out = tmp_path / "out-broken"
    with pytest.raises((ExecutionError, ValidationError)) as error:
        make_executor(input_dir, out).run(load("img2img"), overrides={"image": "broken.png", "steps": 2})
    assert "broken.png" in str(error.value)
    assert no_images(out)


def test_a_mask_of_the_wrong_size_is_a_clear_error(make_executor, input_dir, tmp_path):
    out = tmp_path / "out-mask"
    with pytest.raises(ExecutionError) as error:
        make_executor(input_dir, out).run(load("inpaint"), overrides={"mask": "small_mask.png", "steps": 2})
    assert error.value.node_id == "inpaint"
    assert "the mask is 32x32 but the image is 64x64" in str(error.value)
    assert no_images(out)


@pytest.mark.parametrize("how", ["in the file", "with --set"])
def test_width_not_a_multiple_of_8_is_refused_before_running(make_executor, tmp_path, how):
    doc, overrides = load("txt2img"), {}
    if how == "in the file":
        doc["nodes"]["latent"]["inputs"]["width"] = 60
    else:
        overrides = {"width": 60}
    out = tmp_path / "out-width"
    with pytest.raises(ValidationError) as error:
        make_executor(output_dir=out).run(doc, overrides=overrides)
    (problem,) = error.value.problems
    # the same code either way: a --set value is checked like the literal it replaces
    assert (problem.input, problem.code) == ("width", codes.OUT_OF_BOUNDS)
    assert "60 is not a multiple of 8" in problem.message
    assert no_images(out)


def test_an_unknown_checkpoint_name_lists_the_available_ones(make_executor, tmp_path):
    doc = load("txt2img")
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "sd-v1-5-missing.safetensors"
    out = tmp_path / "out-ckpt"
    with pytest.raises(ValidationError) as error:
        make_executor(output_dir=out).run(doc)
    (problem,) = error.value.problems
    assert (problem.node_id, problem.code) == ("ckpt", codes.FILE_NOT_FOUND)
    assert "sd-v1-5-missing.safetensors" in problem.message
    assert "ldmgraph-shapes-txt2img.safetensors" in problem.message  # what is there
    assert no_images(out)


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "inputs/../../x.png"])
def test_file_names_that_leave_the_input_folder_are_refused(make_executor, name, tmp_path):
    out = tmp_path / "out-path"
    with pytest.raises(ValidationError) as error:
        make_executor(output_dir=out).run(load("img2img"), overrides={"image": name})
    assert error.value.codes == {codes.UNSAFE_PATH}
    assert no_images(out)


def test_checkpoint_names_that_leave_the_model_folders_are_refused(make_executor):
    doc = load("txt2img")
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "../../etc/passwd"
    with pytest.raises(ValidationError) as error:
        make_executor().run(doc)
    assert error.value.codes == {codes.UNSAFE_PATH}


def test_cli_prints_one_line_per_problem_and_no_traceback(models_dir, input_dir, tmp_path, capsys):
    out = tmp_path / "out-cli"
    common = [
        "--models-dir",
        str(models_dir),
        "--input-dir",
        str(input_dir),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert main(["run", str(WORKFLOWS / "img2img.json"), "--set", "image=../x.png", *common]) == 2
    err = capsys.readouterr().err
    assert "unsafe_path" in err and "Traceback" not in err
    assert (
        main(
            ["run", str(WORKFLOWS / "img2img.json"), "--set", "image=broken.png", "--set", "steps=2", *common]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    assert no_images(out)
