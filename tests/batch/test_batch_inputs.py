"""`ldmgraph batch`: parameter tables, sweeps and outputs, on an image-only workflow (no torch);
bad tables are refused, row and column named, before any row runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import INPUTS, TXT2IMG, manifest_lines
from PIL import Image

from ldmgraph.cli import main


def batch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["batch", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def png(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def test_rows_times_sweep_run_once_each_named_by_row_with_their_parameters(
        tmp_path: Path, blend_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "images.csv"
    table.write_text("image\nshapes.png\nshapes_alpha_hole.png\n", encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = batch(capsys, blend_file, "--params", table, "--sweep", "strength=0,0.5,1",
                         "--input-dir", INPUTS, "--output-dir", out)
    assert code == 0, err
    records = manifest_lines(out)
    assert [r["row"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [(r["params"]["image"], r["params"]["strength"]) for r in records] == [
        (image, strength) for image in ("shapes.png", "shapes_alpha_hole.png") for strength in (0, 0.5, 1)]
    for record in records:
        assert record["status"] == "ok" and record["outputs"] == [f"row{record['row']:05d}_blend_00001_.png"]
        pixels, text = png(out / record["outputs"][0])
        assert json.loads(text["ldmgraph:parameters"])["strength"] == record["params"]["strength"]
        assert json.loads(text["ldmgraph:parameters"])["image"] == record["params"]["image"]
        source = np.asarray(Image.open(INPUTS / record["params"]["image"]).convert("RGB"), dtype=np.float64)
        expected = (1 - record["params"]["strength"]) * source + record["params"]["strength"] * (255 - source)
        assert np.abs(pixels - expected).max() <= 1.0  # the blend formula, to 8-bit rounding
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["outputs"][0] for r in records] + ["manifest.jsonl"])


def test_identical_rows_each_get_their_file_and_a_rerun_skips_finished_rows(
        tmp_path: Path, blend_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "rows.jsonl"
    table.write_text('{"strength": 0.5}\n{"strength": 0.5}\n\n{"strength": 0.75}\n', encoding="utf-8")
    out = tmp_path / "out"
    args = (blend_file, "--params", table, "--input-dir", INPUTS, "--output-dir", out)
    assert batch(capsys, *args)[0] == 0
    first, second = out / "row00001_blend_00001_.png", out / "row00002_blend_00001_.png"
    assert first.read_bytes() == second.read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code, stdout, _ = batch(capsys, *args, "--json")
    assert code == 0 and json.loads(stdout)["skipped"] == 3 and json.loads(stdout)["succeeded"] == 0
    assert len(manifest_lines(out)) == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    (out / "row00003_blend_00001_.png").unlink()  # a finished row whose output is gone runs again
    code, stdout, _ = batch(capsys, *args, "--json")
    assert json.loads(stdout)["succeeded"] == 1 and (out / "row00003_blend_00001_.png").is_file()


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, table: Path, *extra: str) -> str:
    out = tmp_path / "out"
    code, _, err = batch(capsys, TXT2IMG, "--params", table, "--output-dir", out, *extra)
    assert code == 2, err
    assert "nothing ran" in err
    assert not out.exists()  # no row ran, no manifest
    return err


def test_unknown_column_is_refused_with_its_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "p.csv"
    table.write_text("prompt,colour\na red circle,red\n", encoding="utf-8")
    err = _refused(capsys, tmp_path, table)
    assert "header (line 1), column 2 'colour'" in err and "declares no parameter 'colour'" in err
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "sead": 3}\n', encoding="utf-8")
    err = _refused(capsys, tmp_path, rows)
    assert "row 3, column 'sead'" in err


def test_bad_value_in_row_17_names_row_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["prompt,steps,cfg"] + [f"prompt {i},2,4.5" for i in range(1, 17)]
    lines += ["prompt 17,2,lots", "prompt 18,2,4.5"]
    table = tmp_path / "p.csv"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = _refused(capsys, tmp_path, table)
    assert "row 17, column 'cfg' (value 'lots')" in err and "expected a number" in err
    assert "row 18" not in err and "row 16" not in err


def test_sweep_value_out_of_bounds_names_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "p.csv"
    table.write_text("prompt\na\n", encoding="utf-8")
    err = _refused(capsys, tmp_path, table, "--sweep", "steps=2,0")
    assert "row 2 (file row 1, sweep steps=0), column 'steps' (value 0)" in err and "minimum 1" in err


def test_empty_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "p.csv"
    table.write_bytes(b"")
    assert "the file is empty" in _refused(capsys, tmp_path, table)
    table.write_text("prompt,seed\n", encoding="utf-8")
    assert "a header but no rows" in _refused(capsys, tmp_path, table)


def test_non_utf8_file_names_row_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "p.csv"
    table.write_bytes(b"seed,prompt\n1,a red circle\n2,a caf\xe9 square\n")  # Latin-1, not UTF-8
    err = _refused(capsys, tmp_path, table)
    assert "row 2 (line 3), column 2 'prompt'" in err and "not UTF-8" in err


def test_rows_sharing_a_checkpoint_are_grouped_in_order_of_first_use(tmp_path: Path) -> None:
    from ldmgraph.batch import plan_rows, read_rows
    from ldmgraph.batch.plan import group_by_model
    from ldmgraph.cli import BUNDLED_MODELS
    from ldmgraph.graph.context import Environment
    from ldmgraph.plugins import PluginManager

    doc = json.loads(TXT2IMG.read_text(encoding="utf-8"))
    names = ["ldmgraph-shapes-inpaint.safetensors", "ldmgraph-shapes-txt2img.safetensors"] * 3
    table = tmp_path / "p.csv"
    table.write_text("ckpt_name\n" + "\n".join(names) + "\n", encoding="utf-8")
    rows = read_rows(table, [], list(doc["parameters"]), {"ckpt_name"})
    env = Environment(input_dir=tmp_path, output_dir=tmp_path, model_dirs=(BUNDLED_MODELS,))
    ordered = group_by_model(plan_rows(doc, rows, PluginManager().registry, env))
    assert [r.number for r in ordered] == [1, 3, 5, 2, 4, 6]
    assert [r.params["ckpt_name"] for r in ordered] == sorted(names)
