"""Latent previews during sampling, through the public paths: the executor's progress events and
``ldmgraph run --preview-dir``, on the bundled text-to-image model.

A preview is the sampler's current x0 prediction mapped to RGB by the latent space's linear
factors (ldmgraph/assets/data/preview_factors.json): one pixel per latent pixel, so it has the
latent's aspect, and at the last step it must look like the decoded image.
"""

from __future__ import annotations

import copy
import json
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldmgraph.cli import main

REPO = Path(__file__).resolve().parents[2]
TXT2IMG = json.loads((REPO / "workflows" / "txt2img.json").read_text(encoding="utf-8"))
BUNDLED_TXT2IMG = REPO / "ldmgraph" / "assets" / "models" / "ldmgraph-shapes-txt2img.safetensors"

needs_bundled = pytest.mark.skipif(not BUNDLED_TXT2IMG.is_file(), reason="the bundled model is not shipped")


def txt2img(width: int = 64, height: int = 64, steps: int = 4, seed: int = 3) -> dict[str, Any]:
    doc = copy.deepcopy(TXT2IMG)
    doc["nodes"]["latent"]["inputs"].update(width=width, height=height)
    doc["nodes"]["sampler"]["inputs"].update(steps=steps, seed=seed)
    return doc


def box_down(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BOX), dtype=np.float32)


PROMPTS = ("a red circle on the left", "a large blue square at the top", "a small green triangle on the right",
           "a yellow circle at the bottom and a purple square at the top")


def branches(sizes: list[tuple[int, int]], steps: int = 8) -> dict[str, Any]:
    """txt2img with one sampler, decoder and saver per (width, height): ``s{i}`` saved as ``img{i}``."""
    doc = copy.deepcopy(TXT2IMG)
    nodes = doc["nodes"]
    template = {name: nodes.pop(name) for name in ("positive", "latent", "sampler", "decode", "save")}
    for i, (width, height) in enumerate(sizes):
        parts = copy.deepcopy(template)
        parts["positive"]["inputs"]["text"] = PROMPTS[i % len(PROMPTS)]
        parts["latent"]["inputs"].update(width=width, height=height)
        parts["sampler"]["inputs"].update(steps=steps, seed=100 + i)
        parts["sampler"]["inputs"]["positive"]["node"] = f"p{i}"
        parts["sampler"]["inputs"]["latent"]["node"] = f"l{i}"
        parts["decode"]["inputs"]["latent"]["node"] = f"s{i}"
        parts["save"]["inputs"]["images"]["node"] = f"d{i}"
        parts["save"]["inputs"]["filename_prefix"] = f"img{i}"
        for short, name in zip("plsdv", ("positive", "latent", "sampler", "decode", "save"), strict=True):
            nodes[f"{short}{i}"] = parts[name]
    doc["parameters"] = {}
    return doc


@needs_bundled
def test_previews_have_the_latent_aspect_and_the_decoded_colours(make_executor) -> None:
    """Four 64x64 images (the bundled model's size) and one 64x32, in one run. A linear preview
    of a latent pixel cannot follow every detail of the decoder (about 0.75 median correlation
    per image for the bundled autoencoder, worse for dark, low-contrast pictures), so the colours
    are judged over the four images together, and each image must still clearly follow."""
    events: list[Any] = []
    sizes = [(64, 64)] * 4 + [(64, 32)]
    result = make_executor().run(branches(sizes), on_event=events.append, previews=1)
    previews: dict[str, list[Any]] = {}
    for event in events:
        if event.kind == "progress" and event.preview is not None:
            previews.setdefault(event.node_id, []).append(event)
    assert sorted(previews) == [f"s{i}" for i in range(5)]
    assert all([(e.k, e.n) for e in steps] == [(k, 8) for k in range(1, 9)] for steps in previews.values())
    # one preview pixel per latent pixel (the bundled autoencoder's f = 4), RGB bytes: 64x32 -> 16x8, 2:1
    assert {e.preview.shape for e in previews["s0"]} == {(16, 16, 3)}
    assert {e.preview.shape for e in previews["s4"]} == {(8, 16, 3)}
    assert all(e.preview.dtype == np.uint8 for steps in previews.values() for e in steps)

    saved = {path.name.split("_")[0]: path for path in result.files}
    last = [previews[f"s{i}"][-1].preview.astype(np.float32) for i in range(4)]
    decoded = [box_down(saved[f"img{i}"], (16, 16)) for i in range(4)]
    pooled = np.corrcoef(np.ravel(last), np.ravel(decoded))[0, 1]
    each = [np.corrcoef(p.ravel(), d.ravel())[0, 1] for p, d in zip(last, decoded, strict=True)]
    assert pooled > 0.8 and min(each) > 0.5, (pooled, each)
    per_channel = [np.corrcoef(np.ravel([p[..., c] for p in last]), np.ravel([d[..., c] for d in decoded]))[0, 1]
                   for c in range(3)]
    assert min(per_channel) > 0.7, per_channel  # each colour, not only the brightness
    wide = box_down(saved["img4"], (16, 8))
    assert np.corrcoef(previews["s4"][-1].preview.astype(np.float32).ravel(), wide.ravel())[0, 1] > 0.3
    # the first step's prediction is still far from the final picture
    assert not np.array_equal(previews["s0"][0].preview, previews["s0"][-1].preview)


@needs_bundled
def test_previews_are_computed_only_when_asked_and_throttled(make_executor, monkeypatch) -> None:
    from ldmgraph.diffusion import preview

    def refuse(self: Any, latent: Any) -> Any:
        raise AssertionError("a preview was computed although no consumer asked for one")

    with monkeypatch.context() as patch:
        patch.setattr(preview.LatentPreviewer, "__call__", refuse)
        events: list[Any] = []
        make_executor().run(txt2img(steps=4, seed=5), on_event=events.append)
    progress = [e for e in events if e.kind == "progress" and e.node_id == "sampler"]
    assert [e.k for e in progress] == [1, 2, 3, 4] and all(e.preview is None for e in progress)

    events = []
    make_executor().run(txt2img(steps=4, seed=5), on_event=events.append, previews=3)
    drawn = [e.k for e in events if e.kind == "progress" and e.preview is not None]
    assert drawn == [3, 4]  # every third step, and the last


@needs_bundled
def test_cli_preview_dir_writes_private_per_step_pngs_inside_it(tmp_path: Path, models_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    doc = txt2img(steps=3, seed=7)
    # a node id that tries to leave the folder becomes a plain file name inside it
    doc["nodes"]["../up/evil"] = doc["nodes"].pop("sampler")
    doc["nodes"]["decode"]["inputs"]["latent"]["node"] = "../up/evil"
    doc["parameters"] = {}
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(doc), encoding="utf-8")
    folder = tmp_path / "previews" / "run1"
    code = main(["run", str(workflow), "--models-dir", str(models_dir), "--output-dir", str(tmp_path / "out"),
                 "--preview-dir", str(folder), "--preview-every", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0].startswith("___up_evil-")
    assert [n.rsplit("_", 1)[1] for n in names] == ["step0002.png", "step0003.png"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["run1"]
    with Image.open(folder / names[-1]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="--preview-dir: .* which is a regular file, not a folder"):
        main(["run", str(workflow), "--models-dir", str(models_dir), "--output-dir", str(tmp_path / "out2"),
              "--preview-dir", str(blocker / "sub"), "--no-progress"])
    assert not (tmp_path / "out2").exists()  # refused before anything ran


def test_a_model_is_matched_to_its_latent_space_by_channels_and_scale() -> None:
    from ldmgraph.diffusion.preview import LatentPreviewer, latent_space_for, preview_table

    def handle(channels: int, scale: float | None) -> Any:
        return SimpleNamespace(latent_channels=channels, info=SimpleNamespace(scale_factor=scale))

    names = {space.name for space in preview_table()}
    assert {"sd-kl-f8", "ldmgraph-shapes-kl-f4"} <= names
    assert latent_space_for(handle(4, 0.18215)).name == "sd-kl-f8"  # SD 1.x and 2.x
    bundled_scale = next(s.scale_factor for s in preview_table() if s.name == "ldmgraph-shapes-kl-f4")
    assert latent_space_for(handle(4, bundled_scale)).name == "ldmgraph-shapes-kl-f4"
    assert latent_space_for(handle(3, 1.0)) is None  # the paper's VQ-f4: no factors, the fallback
    assert latent_space_for(handle(4, None)) is None and latent_space_for(object()) is None

    import torch

    latent = torch.randn(2, 3, 6, 12, generator=torch.Generator().manual_seed(0))
    picture = LatentPreviewer(None)(latent)
    assert picture.shape == (6, 12, 3) and picture.dtype == np.uint8
    # each channel stretched over its own range: the first image's channels, in order
    for c in range(3):
        assert np.corrcoef(picture[..., c].ravel(), latent[0, c].numpy().ravel())[0, 1] > 0.95
    assert picture.min() == 0 and picture.max() == 255
