"""`ldmgraph train lora` and the bundled outlined-shapes LoRA, through the CLI and the saved workflow.

The style is read back from the pixels: `hollowness` is 1 - the share of shape-coloured pixels at the
centre of each shape the judge finds (0 for the base model's filled shapes, ~0.9 for the outlined
training images), so the test measures the property the LoRA was trained to draw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldmgraph.cli import main
from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import load_registry
from ldmgraph.train.data.judge import score
from ldmgraph.train.data.scenes import render, scene_at
from ldmgraph.train.export import assets_dir
from ldmgraph.train.lora import hollowness, read_image_folder, render_outlined

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
BUNDLED_LORA = assets_dir() / "loras" / "ldmgraph-shapes-outlined.safetensors"
PROMPTS = [
    ("a red circle on the left", [("red", "circle", "left")]),
    ("a large blue square at the top", [("blue", "square", "top")]),
    ("a green triangle on the right", [("green", "triangle", "right")]),
    ("a small yellow circle at the bottom", [("yellow", "circle", "bottom")]),
    ("a purple square in the centre", [("purple", "square", "centre")]),
    ("a large orange triangle on the left", [("orange", "triangle", "left")]),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
    torch.set_num_threads(before)


def executor(out: Path, models: Path | None = None) -> Executor:
    """An executor on the bundled models (and ``models`` first, when given); images are taken from the
    decoder's output, so nothing is written to ``out``."""
    dirs = (models, assets_dir()) if models is not None else (assets_dir(),)
    return Executor(load_registry(), Environment(input_dir=WORKFLOWS / "inputs", output_dir=out, model_dirs=dirs))


def image(ex: Executor, workflow: str, **overrides: Any) -> np.ndarray:
    doc = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    result = ex.run(doc, overrides=overrides, outputs=["decode"])
    return np.asarray(result.outputs["decode"]["image"])[0]


def test_lora_style_measure_reads_the_training_style():
    scenes = [scene_at(5, "test", i) for i in range(24)]
    filled = np.nanmean([hollowness(render(s)) for s in scenes])
    outlined = np.nanmean([hollowness(render_outlined(s)) for s in scenes])
    assert filled < 0.05 and outlined > 0.8


def test_lora_training_cli_writes_a_kohya_file_that_lora_loader_applies(tmp_path):
    data, run, models = tmp_path / "data", tmp_path / "run", tmp_path / "models"
    args = ["train", "lora", "--data", str(data), "--make-data", "outlined", "--count", "8", "--steps", "3",
            "--batch-size", "4", "--rank", "2", "--lr", "0.05", "--out", str(run), "--no-progress",
            "--export", str(models / "loras" / "mine.safetensors")]
    assert main(args) == 0
    images, captions = read_image_folder(data, 64)
    assert images.shape == (8, 64, 64, 3) and all(c.startswith("a") for c in captions)
    assert json.loads((run / "state.json").read_text())["step"] == 3
    with safe_open(str(models / "loras" / "mine.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
        downs = [f.get_tensor(k) for k in keys if k.endswith("lora_down.weight")]
    stems = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(s.startswith("lora_unet_") for s in stems)
    assert {k for k in keys} == {s + suffix for s in stems for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert all(d.shape[0] == 2 for d in downs) and meta["ss_network_dim"] == "2"
    assert any(u.abs().max() > 0 for u in ups), "the up factors start at zero and must have trained"
    # resuming continues the run from its checkpoint
    assert main([*args[:args.index("--steps")], "--steps", "5", *args[args.index("--steps") + 2:], "--resume"]) == 0
    assert json.loads((run / "state.json").read_text())["step"] == 5
    # the file applies through LoraLoader with no unmatched key, and changes the image
    ex = executor(tmp_path / "out", models)
    with _no_lora_warning():
        changed = image(ex, "lora", lora_name="mine.safetensors", steps=4, seed=3)
    base = image(ex, "txt2img", steps=4, seed=3, prompt="a red circle on the left")
    assert np.abs(changed - base).max() > 1e-3


class _no_lora_warning:
    """Fails when the LoRA loader warns about keys it could not place."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)
        assert not [w for w in self._records if "LoraKeys" in type(w.message).__name__], [str(w.message) for w in self._records]


def test_lora_data_folder_without_captions_is_a_clear_error(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "one.png")
    assert main(["train", "lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "one.png" in err and "one.txt" in err


def test_bundled_lora_strength_zero_gives_the_base_image_bit_for_bit(tmp_path):
    assert BUNDLED_LORA.is_file(), "the package lacks its bundled LoRA"
    ex = executor(tmp_path)
    settings = {"prompt": "a green triangle on the right", "seed": 11, "steps": 12}
    base = image(ex, "txt2img", **settings)
    assert np.array_equal(image(ex, "lora", strength_model=0.0, strength_clip=0.0, **settings), base)
    assert np.array_equal(image(ex, "lora", strength_model=0.0, **settings), base)  # no text-encoder part
    assert not np.array_equal(image(ex, "lora", **settings), base)
    assert np.array_equal(image(ex, "txt2img", **settings), base)  # the base is restored after the LoRA ran


@pytest.mark.slow
def test_bundled_lora_draws_the_outlined_style_and_keeps_the_content(tmp_path):
    ex = executor(tmp_path)
    styled, plain = [], []
    for i, (prompt, _) in enumerate(PROMPTS):
        styled.append(image(ex, "lora", prompt=prompt, seed=100 + i, steps=20))
        plain.append(image(ex, "lora", prompt=prompt, seed=100 + i, steps=20, strength_model=0.0))
    lora_style, base_style = np.nanmean([hollowness(x) for x in styled]), np.nanmean([hollowness(x) for x in plain])
    assert base_style < 0.1, base_style
    assert lora_style > 0.6, lora_style
    colour = np.mean([score(x, expected)["colour"] for x, (_, expected) in zip(styled, PROMPTS, strict=True)])
    position = np.mean([score(x, expected)["position"] for x, (_, expected) in zip(styled, PROMPTS, strict=True)])
    assert colour >= 0.6 and position >= 0.8, (colour, position)


def test_lora_workflow_declares_the_text_to_image_parameters_and_the_lora_ones():
    params = set(json.loads((WORKFLOWS / "lora.json").read_text())["parameters"])
    txt2img = set(json.loads((WORKFLOWS / "txt2img.json").read_text())["parameters"])
    assert txt2img | {"start_noise", "lora_name", "strength_model", "strength_clip"} <= params



def test_lora_training_parametrisation_is_what_the_kohya_file_means_to_the_loader(tmp_path):
    """The trainer adds scale * up(down(x)) by hooks; written as kohya factors and applied by the LoRA
    loader as weight deltas (linear layers and 3x3 convolutions), the U-Net computes the same."""
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.lora import lora_patches, read_lora
    from ldmgraph.models.patches import patched
    from ldmgraph.train.lora import LoraNetwork, bundled_base, save_kohya, target_layers

    ckpt = load_checkpoint(bundled_base())
    unet = ckpt.unet.diffusion_model
    network = LoraNetwork(target_layers(unet, convolutions=True), rank=4, alpha=2.0, seed=1, conv_rank=2)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    path = save_kohya(tmp_path / "x.safetensors", network.factors(), {"rank": 4, "alpha": 2.0}, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100.0, 700.0]), torch.randn(2, 4, 384, generator=g)
    with torch.no_grad():
        plain = ckpt.unet.apply_model(x, t, context)
        handles = network.attach(unet)
        hooked = ckpt.unet.apply_model(x, t, context)
        for h in handles:
            h.remove()
        patches, _, _ = lora_patches(read_lora(path), unet=ckpt.unet)
        loaded = patched(ckpt.unet, patches).apply_model(x, t, context)
        after = ckpt.unet.apply_model(x, t, context)
    assert (hooked - plain).abs().max() > 1e-2
    assert (hooked - loaded).abs().max() < 1e-4
    assert torch.equal(after, plain)
