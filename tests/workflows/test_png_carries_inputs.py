"""A saved PNG carries its input files: copied alone into an empty folder, `ldmgraph run image.png`
re-creates an inpainting result bit for bit; a large input that changed is a clear error."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import ValidationError
from ldmgraph.nodes.carried_inputs import PNG_INPUTS_KEY, carried_environment

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_an_inpainting_png_alone_in_an_empty_folder_re_creates_itself(make_executor, models_dir, tmp_path,
                                                                      one_thread):
    doc = json.loads((WORKFLOWS / "inpaint.json").read_text())
    first = make_executor(output_dir=tmp_path / "first").run(doc, overrides={"steps": 2, "seed": 7})
    with Image.open(first.files[0]) as image:
        carried = json.loads(image.text[PNG_INPUTS_KEY])
    assert {r["name"] for r in carried} == {"shapes.png", "mask_centre.png"}
    assert base64.b64decode(carried[0]["data"]) == (WORKFLOWS / "inputs" / carried[0]["name"]).read_bytes()
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    shutil.copy(first.files[0], empty / "result.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extra = [] if models_dir is None or not any(models_dir.iterdir()) else ["--models-dir", str(models_dir)]
    done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", "result.png", *extra], cwd=empty,
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    (again,) = (empty / "output").glob("*.png")
    assert np.array_equal(pixels(again), pixels(first.files[0]))
    assert again.read_bytes() == first.files[0].read_bytes()  # bit for bit, metadata included
    assert sorted(p.name for p in empty.iterdir()) == ["output", "result.png"]  # nothing left behind


def png_with_record(path: Path, record: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_INPUTS_KEY, json.dumps([record]))
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def test_a_large_input_that_changed_since_is_a_clear_error(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "photo.png").write_bytes(b"not the original")
    record = {"name": "photo.png", "bytes": 5_000_000, "sha256": "ab" * 32}  # too large: named, not embedded
    png = png_with_record(tmp_path / "result.png", record)
    with pytest.raises(ValidationError) as error, carried_environment(png, Environment(input_dir=inputs)):
        pass
    (problem,) = error.value.problems
    assert problem.code == "input_mismatch"
    assert "photo.png" in problem.message and "abababababab" in problem.message


def test_a_damaged_embedded_copy_is_a_clear_error_and_leaves_no_folder(tmp_path):
    record = {"name": "x.png", "bytes": 3, "sha256": "00" * 32, "data": base64.b64encode(b"abc").decode()}
    png = png_with_record(tmp_path / "result.png", record)
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("ldmgraph-inputs-*"))
    with pytest.raises(ValidationError) as error, carried_environment(png, Environment()):
        pass
    assert error.value.problems[0].code == "input_mismatch" and "x.png" in str(error.value)
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("ldmgraph-inputs-*")) == before
