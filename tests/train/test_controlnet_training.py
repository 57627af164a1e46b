"""``ldmgraph train controlnet``'s recipe on a tiny model: the trainable copy starts as the U-Net's
encoder and, through its zero convolutions, changes nothing; a few steps make it steer; the export
loads back as the same ControlNet; the data's silhouettes are the rendered shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))

from ldmgraph_tiny_models import write_tiny_checkpoint  # noqa: E402

from ldmgraph.models.controlnet import ControlNet, load_controlnet  # noqa: E402
from ldmgraph.train.controlnet import (  # noqa: E402
    ControlConfig,
    base_unet,
    control_scene,
    export_controlnet,
    init_from_unet,
    silhouette,
    train_controlnet,
)
from ldmgraph.train.data.scenes import render  # noqa: E402


def test_silhouettes_are_the_rendered_shapes_coverage() -> None:
    from ldmgraph.train.data.vocab import COLOURS

    for index in range(4):
        scene = control_scene(0, "heldout", index, two_object_prob=0.0)
        background = render(type(scene)(scene.background, (), ""))
        colour = np.asarray(COLOURS[scene.shapes[0].colour], np.float32) / 255
        # render = (1 - a) * background + a * colour, so a is the coverage the silhouette must be
        channel = np.argmax(np.abs(colour - background), axis=-1)[..., None]
        change = np.take_along_axis(render(scene) - background, channel, axis=-1)[..., 0]
        coverage = change / np.take_along_axis(colour - background, channel, axis=-1)[..., 0]
        assert np.abs(coverage - silhouette(scene)).max() < 0.02


def test_a_new_controlnet_is_a_no_op_then_training_makes_it_steer(tmp_path: Path) -> None:
    base = write_tiny_checkpoint(tmp_path / "txt2img.safetensors", "txt2img")
    unet, meta, _ = base_unet(base)
    control = ControlNet(meta["unet"], (16, 32, 64), 3)
    init_from_unet(control, unet)
    assert torch.equal(control.input_blocks[1][0].in_layers[2].weight, unet.input_blocks[1][0].in_layers[2].weight)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 3, 384)
    with torch.no_grad():
        residuals = control(x, torch.rand(2, 3, 32, 32), t, context)
        assert torch.equal(unet(x, t, context=context, control=residuals), unet(x, t, context=context))

    g = torch.Generator().manual_seed(0)
    pool = {"mean": torch.randn(8, 4, 8, 8, generator=g), "std": torch.full((8, 4, 8, 8), 0.1),
            "silhouette": (torch.rand(8, 1, 32, 32, generator=g) > 0.5).to(torch.uint8) * 255,
            "edges": torch.zeros(8, 1, 32, 32, dtype=torch.uint8), "caption_index": torch.zeros(8, dtype=torch.long),
            "contexts": torch.randn(1, 3, 384, generator=g)}
    from safetensors.torch import save_file

    save_file(pool, str(tmp_path / "control_pool.safetensors"))
    run = tmp_path / "run"
    cfg = ControlConfig(steps=3, batch_size=2, checkpoint_every=3, base=str(base))
    train_controlnet(cfg, tmp_path, run, progress=False)
    handle = load_controlnet(export_controlnet(run, tmp_path / "cn.safetensors"))
    assert handle.control_model.hint_channels == (16, 32, 64) and handle.control_model.downscale == 4
    with torch.no_grad():
        trained = handle.control_model(x, torch.rand(2, 3, 32, 32), t, context)
    assert any(r.abs().max() > 0 for r in trained)  # the zero convolutions have moved
