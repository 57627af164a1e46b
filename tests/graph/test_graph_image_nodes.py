"""Image nodes against closed forms: nearest = pixel repetition, area = block means, blend modes
from the W3C compositing formulas, crops = slicing, load/save = 8-bit quantisation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from graph_helpers import link, workflow, write_png
from PIL import Image

from ldmgraph.graph import UnsafePathError
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.files import atomic_write_bytes, atomic_write_new, safe_join


def run_image_node(executor: Executor, node_type: str, image: np.ndarray, **inputs) -> np.ndarray:
    """Run one image node on `image` (loaded through LoadImage from an 8-bit PNG)."""
    assert image.dtype == np.uint8
    Image.fromarray(image).save(executor.env.input_dir / "in.png")
    doc = workflow({
        "load": {"type": "LoadImage", "inputs": {"image": "in.png"}},
        "op": {"type": node_type, "inputs": {"image": link("load", "image"), **inputs}},
    })
    return executor.run(doc, outputs=["op"]).outputs["op"]["image"]  # any node may be requested


def pixels(seed: int = 0, shape: tuple[int, ...] = (8, 12, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_load_image_values_and_mask_from_alpha(executor: Executor) -> None:
    rgba = write_png(executor.env.input_dir / "a.png", rgba=True)
    doc = workflow({"l": {"type": "LoadImage", "inputs": {"image": "a.png"}}}, outputs=["l"])
    out = executor.run(doc).outputs["l"]
    assert out["image"].dtype == np.float32 and out["image"].shape == (1, 8, 12, 3)
    np.testing.assert_allclose(out["image"][0], rgba[..., :3] / 255, atol=1e-6)
    np.testing.assert_allclose(out["mask"][0], 1 - rgba[..., 3] / 255, atol=1e-6)
    write_png(executor.env.input_dir / "b.png")
    opaque = executor.run(workflow({"l": {"type": "LoadImage", "inputs": {"image": "b.png"}}}, outputs=["l"]))
    assert not opaque.outputs["l"]["mask"].any()


def test_nearest_upscale_is_pixel_repetition(executor: Executor) -> None:
    src = pixels()
    out = run_image_node(executor, "ImageScale", src, width=24, height=16, upscale_method="nearest")
    np.testing.assert_allclose(out[0], np.repeat(np.repeat(src / 255, 2, axis=0), 2, axis=1), atol=1e-6)


def test_area_downscale_is_block_mean(executor: Executor) -> None:
    src = pixels(1)
    out = run_image_node(executor, "ImageScale", src, width=6, height=4, upscale_method="area")
    blocks = (src / 255).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out[0], blocks, atol=1e-5)


def test_scale_by_and_center_crop_shapes(executor: Executor) -> None:
    src = pixels(2, (10, 20, 3))
    assert run_image_node(executor, "ImageScaleBy", src, scale_by=0.5).shape == (1, 5, 10, 3)
    out = run_image_node(executor, "ImageScale", src, width=10, height=10, upscale_method="nearest", crop="center")
    np.testing.assert_allclose(out[0], src[:, 5:15] / 255, atol=1e-6)  # centre square, same scale


def test_crop_is_slicing_and_clamps(executor: Executor) -> None:
    src = pixels(3)
    out = run_image_node(executor, "ImageCrop", src, width=5, height=3, x=4, y=2)
    np.testing.assert_allclose(out[0], src[2:5, 4:9] / 255, atol=1e-6)
    edge = run_image_node(executor, "ImageCrop", src, width=50, height=50, x=10, y=6)
    assert edge.shape == (1, 2, 2, 3)


@pytest.mark.parametrize(("mode", "formula"), [
    ("normal", lambda a, b: b),
    ("multiply", lambda a, b: a * b),
    ("screen", lambda a, b: a + b - a * b),
    ("overlay", lambda a, b: np.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))),
    ("difference", lambda a, b: np.abs(a - b)),
])
def test_blend_modes_match_compositing_formulas(executor: Executor, mode: str, formula) -> None:
    a, b = pixels(4), pixels(5)
    Image.fromarray(a).save(executor.env.input_dir / "a.png")
    Image.fromarray(b).save(executor.env.input_dir / "b.png")
    doc = workflow({
        "a": {"type": "LoadImage", "inputs": {"image": "a.png"}},
        "b": {"type": "LoadImage", "inputs": {"image": "b.png"}},
        "mix": {"type": "ImageBlend", "inputs": {"image1": link("a", "image"), "image2": link("b", "image"),
                                                  "blend_factor": 0.3, "blend_mode": mode}},
    }, outputs=["mix"])
    out = executor.run(doc).outputs["mix"]["image"][0]
    fa, fb = a / 255, b / 255
    np.testing.assert_allclose(out, 0.7 * fa + 0.3 * formula(fa, fb), atol=1e-5)


def test_save_image_numbering_never_overwrites_and_embeds_metadata(executor: Executor) -> None:
    src = write_png(executor.env.input_dir / "a.png")
    executor.env.output_dir.mkdir()
    (executor.env.output_dir / "shot_00003_.png").write_bytes(b"someone else's file")
    doc = workflow({"l": {"type": "LoadImage", "inputs": {"image": "a.png"}},
                    "s": {"type": "SaveImage", "inputs": {"images": link("l", "image"), "filename_prefix": "shot"}}},
                   parameters={"p": {"targets": [{"node": "s", "input": "filename_prefix"}]}})
    [path] = executor.run(doc).files
    assert path.name == "shot_00004_.png"
    assert (executor.env.output_dir / "shot_00003_.png").read_bytes() == b"someone else's file"
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), src)
        assert json.loads(image.text["ldmgraph:workflow"])["nodes"]["s"]["type"] == "SaveImage"
        assert json.loads(image.text["ldmgraph:parameters"]) == {"p": "shot"}
    sub = executor.run(doc, overrides={"p": "nested/dir/shot"})
    assert sub.files[0] == executor.env.output_dir.resolve() / "nested" / "dir" / "shot_00001_.png"


def test_safe_join_refuses_escapes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    assert safe_join(tmp_path / "in", "a/b.png") == (tmp_path / "in" / "a" / "b.png").resolve()
    for name in ["../x.png", "/etc/passwd", "a/../../x", "", "x\x00.png", "C:\\x.png"]:
        with pytest.raises(UnsafePathError):
            safe_join(tmp_path / "in", name)
    os.symlink(tmp_path, tmp_path / "in" / "out_link")
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path / "in", "out_link/secret.png")


def test_atomic_writes(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "f.bin", b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    first = atomic_write_new(tmp_path, "img", ".png", b"a")
    second = atomic_write_new(tmp_path, "img", ".png", b"b")
    assert (first.name, second.name) == ("img_00001_.png", "img_00002_.png")
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "g.bin", "not bytes")  # type: ignore[arg-type]
    assert not (tmp_path / "g.bin").exists() and len(list(tmp_path.iterdir())) == 3
