"""The inpainting examples the model trains on, and fine-tuning from the text-to-image weights.

The examples are checked with the judge (an independent reader of the images): a "replace"
example's hole shows exactly the shape its caption names, and nothing of the scene leaks into it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import tiny_pool, tiny_unet

from ldmgraph.train.data.judge import read_image
from ldmgraph.train.data.scenes import render
from ldmgraph.train.data.vocab import POSITIONS, is_held_out
from ldmgraph.train.ldm import LDMConfig, build_unet, initial_weights, make_batch, train_ldm
from ldmgraph.train.pool import CENTRE_BOX, inpaint_task, inpaint_truth, pool_scenes

N = 200


@pytest.fixture(scope="module")
def examples():
    scenes = pool_scenes(0, N)
    return [(s, inpaint_task(s, 0, i)) for i, s in enumerate(scenes)]


def test_tasks_are_deterministic_and_boxes_sit_on_the_latent_grid(examples) -> None:
    scenes = pool_scenes(0, N)
    assert [inpaint_task(s, 0, i) for i, s in enumerate(scenes)] == [t for _, t in examples]
    assert [inpaint_task(s, 1, i) for i, s in enumerate(scenes)] != [t for _, t in examples]
    for _, task in examples:
        x0, y0, x1, y1 = task.box
        assert all(v % 4 == 0 for v in task.box) and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    kinds = [t.new_shape is not None for _, t in examples]
    assert 0.4 < np.mean(kinds) < 0.7  # replace examples are a little over half
    assert sum(t.box == CENTRE_BOX and t.new_shape is not None for _, t in examples) > N // 8


def test_replace_examples_show_only_the_named_shape_in_the_hole(examples) -> None:
    replace = [(s, t) for s, t in examples if t.new_shape is not None]
    for scene, task in replace:
        spec = task.new_shape
        x0, y0, x1, y1 = task.box
        assert x0 <= spec.cx - spec.half - 1 and spec.cx + spec.half + 1 <= x1, task
        assert y0 <= spec.cy - spec.half - 1 and spec.cy + spec.half + 1 <= y1, task
        assert not is_held_out(spec.combo)  # held-out combinations stay out of training
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        nearest = min(POSITIONS, key=lambda p: np.hypot(POSITIONS[p][0] - centre[0], POSITIONS[p][1] - centre[1]))
        assert spec.position == nearest and task.caption in (spec.phrase(False), spec.phrase(True))

        truth = inpaint_truth(scene, task)
        outside = np.ones((64, 64), bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(truth[outside], render(scene)[outside])
        hole = np.broadcast_to(np.asarray(scene.background.start, np.float32), truth.shape).copy()
        hole[y0:y1, x0:x1] = truth[y0:y1, x0:x1]  # the hole alone, on a plain background
        readings = read_image(hole)
        assert [(r.colour, r.shape) for r in readings] == [(spec.colour, spec.shape)], task


def test_other_examples_keep_the_scene_and_name_one_of_its_shapes_or_all(examples) -> None:
    for scene, task in examples:
        if task.new_shape is None:
            np.testing.assert_array_equal(inpaint_truth(scene, task), render(scene))
            phrases = [s.phrase(w) for s in scene.shapes for w in (False, True)]
            assert task.caption == scene.caption or task.caption in phrases


def test_inpaint_batches_use_the_examples_targets_not_the_scene_latents() -> None:
    pool = tiny_pool()
    pool["inpaint_std"] = torch.zeros_like(pool["inpaint_std"])
    cfg = LDMConfig(kind="inpaint", batch_size=4, unet=tiny_unet("inpaint"), scale_factor=0.5)
    batch = make_batch(cfg, pool, 0)
    hits = [any(torch.equal(z, m * 0.5) for m in pool["inpaint_mean"]) for z in batch["z0"]]
    assert all(hits)
    del pool["inpaint_mean"]
    with pytest.raises(ValueError, match="no inpainting examples"):
        make_batch(cfg, pool, 0)


def test_inpainting_starts_as_the_text_to_image_model(tmp_path: Path) -> None:
    """--init-from: the widened input convolution starts the mask and masked-latent channels at
    zero, so before any inpainting step the model predicts what the text-to-image model does."""
    source = LDMConfig(kind="ldm", steps=2, batch_size=2, unet=tiny_unet("ldm"), scale_factor=0.5)
    train_ldm(source, tiny_pool(), tmp_path / "ldm", progress=False)
    ldm = build_unet(source)
    from ldmgraph.train.common import load_ema_weights

    load_ema_weights(tmp_path / "ldm", ldm)
    inp = build_unet(LDMConfig(kind="inpaint", unet=tiny_unet("inpaint"), seed=5))
    counts = initial_weights(inp, tmp_path / "ldm")
    assert counts["widened"] == 1 and counts["copied"] == len(inp.state_dict()) - 1
    # a bundled / LDM-format file (U-Net under model.diffusion_model., other parts ignored) gives the same
    from safetensors.torch import save_file

    from ldmgraph.models.files import UNET_PREFIX

    tensors = {UNET_PREFIX + k: v.contiguous() for k, v in ldm.state_dict().items()}
    save_file({**tensors, "first_stage_model.x": torch.zeros(1)}, str(tmp_path / "bundled.safetensors"))
    from_file = build_unet(LDMConfig(kind="inpaint", unet=tiny_unet("inpaint"), seed=6))
    initial_weights(from_file, tmp_path / "bundled.safetensors")
    torch.testing.assert_close(from_file.state_dict(), inp.state_dict())

    g = torch.Generator().manual_seed(1)
    z, concat = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, 16, generator=g)
    context, t = torch.randn(2, 32, 384, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(inp(torch.cat([z, concat], 1), t, context=context), ldm(z, t, context=context))

    # training with init_from starts from those weights; a different layout is refused by name
    cfg = LDMConfig(kind="inpaint", steps=1, batch_size=2, unet=tiny_unet("inpaint"), scale_factor=0.5,
                    init_from=str(tmp_path / "ldm"), lr=0.0)
    train_ldm(cfg, tiny_pool(), tmp_path / "inp", progress=False)
    trained = build_unet(cfg)
    load_ema_weights(tmp_path / "inp", trained)
    torch.testing.assert_close(trained.state_dict(), inp.state_dict())
    wide = build_unet(LDMConfig(kind="inpaint", unet={**tiny_unet("inpaint"), "model_channels": 32}))
    with pytest.raises(ValueError, match="--init-from"):
        initial_weights(wide, tmp_path / "ldm")


def test_a_pool_whose_inpainting_examples_predate_the_tasks_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ldmgraph.train.pool import INPAINT_TASKS_VERSION, contexts_inpaint_version, load_pool

    pool = tiny_pool(4)
    save_file({k: pool[k] for k in ("mean", "std", "lowres")}, str(tmp_path / "latents.safetensors"))
    inpaint = {k: pool[k].contiguous() for k in ("inpaint_mean", "inpaint_std", "inpaint_mask", "inpaint_masked")}
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"), metadata={"inpaint_tasks": INPAINT_TASKS_VERSION})
    contexts = {k: pool[k] for k in ("contexts", "caption_index", "inpaint_caption_index")}
    save_file(contexts, str(tmp_path / "contexts.safetensors"), metadata={"captions": '["", "a"]'})  # no version
    assert contexts_inpaint_version(tmp_path) is None
    with pytest.raises(ValueError, match="different inpainting tasks"):
        load_pool(tmp_path)

    save_file(contexts, str(tmp_path / "contexts.safetensors"),
              metadata={"captions": '["", "a"]', "inpaint_tasks": INPAINT_TASKS_VERSION})
    loaded = load_pool(tmp_path)
    assert contexts_inpaint_version(tmp_path) == INPAINT_TASKS_VERSION
    assert torch.equal(loaded["inpaint_mean"], pool["inpaint_mean"]) and loaded["captions"] == ["", "a"]
