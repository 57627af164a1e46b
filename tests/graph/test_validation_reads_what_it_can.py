"""Validation reads what it can before anything runs, and says it with a named code: a PNG header that
Pillow flags as a decompression bomb, layouts outside the layout model's ranges or written to crash a
parser, a checkpoint name too long for the filesystem; and its output stays bounded (50 problems
listed and the rest counted, long values cut) however hostile the workflow."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def validate(doc: dict[str, Any], tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    path = tmp_path / "w.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "validate", str(path), "--input-dir",
                           str(tmp_path), *extra], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    data = json.loads(proc.stdout) if "--json" in extra else {}
    return proc.returncode, data, proc.stderr


def codes_of(data: dict[str, Any]) -> list[str]:
    return [p["code"] for p in data["problems"]]


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_a_30000_squared_png_is_image_too_large_from_its_header(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    doc = {"format": "ldmgraph/1", "nodes": {
        "load": {"type": "LoadImage", "inputs": {"image": "bomb.png"}},
        "save": {"type": "SaveImage", "inputs": {"images": {"node": "load", "output": "image"}}}}}
    code, data, _ = validate(doc, tmp_path, "--json")
    assert code == 2 and codes_of(data) == ["image_too_large"], data
    assert "900.0 megapixels" in data["problems"][0]["message"]


def layout_doc(layout: str) -> dict[str, Any]:
    return {"format": "ldmgraph/1", "nodes": {
        "te": {"type": "TextEncoderLoader", "inputs": {}},
        "layout": {"type": "LayoutConditioning", "inputs": {"text_encoder": {"node": "te", "output": "text_encoder"},
                                                            "layout": layout}},
    }}


@pytest.mark.parametrize(("layout", "code", "words"), [
    ('[[8191, 0.1, 0.1, 0.2, 0.2]]', "not_in_choices", "outside 0..8190"),
    (json.dumps([["Person", 0.0, 0.0, 0.01, 0.01]] * 31), "out_of_bounds", "at most 30"),
    ("[[" + "9" * 5000 + ", 0.1, 0.1, 0.2, 0.2]]", "not_in_choices", "not a usable JSON layout"),
    ('[["Person", 1e400, 0.1, 0.2, 0.2]]', "not_in_choices", "not inside the image"),
    ("[" * 5000 + "]" * 5000, "not_in_choices", "nested deeper"),
])
def test_layouts_outside_the_model_or_built_to_crash_get_a_named_code(tmp_path: Path, layout: str, code: str,
                                                                      words: str) -> None:
    status, data, _ = validate(layout_doc(layout), tmp_path, "--json")
    found = [p for p in data["problems"] if p["node_id"] == "layout"]
    assert status == 2 and [p["code"] for p in found] == [code], data
    assert words in found[0]["message"] and "check_failed" not in codes_of(data)


def test_a_checkpoint_name_too_long_for_the_filesystem_is_file_not_found(tmp_path: Path) -> None:
    doc = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "a" * 5000 + ".safetensors"
    doc.pop("parameters")
    code, data, _ = validate(doc, tmp_path, "--json")
    assert code == 2 and "file_not_found" in codes_of(data) and "check_failed" not in codes_of(data), data
    assert all(len(p["message"]) < 1000 for p in data["problems"])


def test_error_output_is_bounded_however_many_problems_and_however_long_the_values(tmp_path: Path) -> None:
    nodes = {f"n{i}": {"type": "NoSuchNode" + "x" * 10_000, "inputs": {}} for i in range(500)}
    nodes["big"] = {"type": "SaveImage", "inputs": {"images": "y" * 1_000_000}}
    doc = {"format": "ldmgraph/1", "nodes": nodes}
    code, data, _ = validate(doc, tmp_path, "--json")
    assert code == 2 and len(data["problems"]) == 50 and data["more_problems"] == 451, len(data["problems"])
    assert all(len(p["message"]) <= 900 for p in data["problems"])
    code, _, err = validate(doc, tmp_path)
    assert code == 2 and len(err) < 60_000 and "and 451 more problem(s)" in err, len(err)


def test_a_config_yaml_beside_a_model_is_read_at_validation(tmp_path: Path) -> None:
    """The loader reads config.yaml beside a single-file checkpoint; a broken one is found before anything runs."""
    sys.path.insert(0, str(REPO / "tests" / "models"))
    from model_helpers import prefixed, tiny_unet, unet_state, vae_state, write

    models = tmp_path / "models"
    models.mkdir()
    write(models / "tiny.safetensors", {**prefixed("model.diffusion_model.", unet_state(tiny_unet())),
                                        **prefixed("first_stage_model.", vae_state())})
    (models / "config.yaml").write_text("[" * 50_000 + "]" * 50_000)
    doc = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    doc.pop("parameters")
    code, data, _ = validate(doc, tmp_path, "--json", "--models-dir", str(models))
    found = [p for p in data["problems"] if p["node_id"] == "ckpt"]
    assert code == 2 and [p["code"] for p in found] == ["bad_model"], data
    assert "nested deeper than 64 levels" in found[0]["message"]


def test_segmentation_class_numbers_beyond_the_model_are_found_at_validation(tmp_path: Path) -> None:
    """The paper's semantic-synthesis workflow: a label of 182 or more (the released model knows 0..181) is an
    error before anything runs; a map within the range passes."""
    from PIL import Image

    labels = Image.new("RGB", (64, 64))
    labels.putpixel((3, 3), (200, 0, 0))
    labels.save(tmp_path / "segmentation.png")
    doc = json.loads((REPO / "workflows" / "paper" / "semantic.json").read_text())
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "ldmgraph-shapes-txt2img.safetensors"  # stands in at validation
    doc.pop("parameters")
    code, data, _ = validate(doc, tmp_path, "--json")
    found = [p for p in data["problems"] if p["node_id"] == "condition"]
    assert code == 2 and [(p["input"], p["code"]) for p in found] == [("segmentation", "out_of_bounds")], data
    assert "class 200" in found[0]["message"] and "0..181" in found[0]["message"]
    labels.putpixel((3, 3), (181, 0, 0))
    labels.save(tmp_path / "segmentation.png")
    code, data, _ = validate(doc, tmp_path, "--json")
    assert not [p for p in data.get("problems", []) if p["node_id"] == "condition"], data
