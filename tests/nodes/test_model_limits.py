"""Validation knows the model's limits: any latent size runs (the U-Net resizes to its skips, as
diffusers' does), a missing device is refused before running, and the bundled models warn about
words and sizes they were never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldmgraph.cli import main
from ldmgraph.nodes.common import device_problem

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
BUNDLED = REPO / "ldmgraph" / "assets" / "models" / "ldmgraph-shapes-txt2img.safetensors"


def test_unet_at_odd_latent_sizes_matches_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.unet import UNetModel

    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    config = dk.unet_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    ours = UNetModel(**config).eval()
    ours.load_state_dict(dk.unet_from_diffusers(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), config))
    context = torch.randn(1, 5, 32)
    for height, width in [(9, 13), (2, 64), (5, 5)]:
        x = torch.randn(1, 4, height, width)
        with torch.no_grad():
            expected = reference(x, torch.tensor([500.0]), context).sample
            got = ours(x, torch.tensor([500.0]), context)
        assert got.shape == (1, 4, height, width)
        assert expected.abs().max() > 0.05 and (got - expected).abs().max() < 1e-4


@pytest.mark.skipif(not BUNDLED.is_file(), reason="needs the bundled models")
def test_2048x8_runs_and_warns_about_the_size(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(WORKFLOWS / "txt2img.json"), "--set", "width=2048", "--set", "height=8",
                 "--set", "steps=2", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert "trained on 64x64 images only; at 2048x8" in capsys.readouterr().err
    (png,) = out.glob("*.png")
    with Image.open(png) as image:
        assert image.size == (2048, 8)


@pytest.mark.skipif(device_problem("cuda") is None, reason="this machine has CUDA")
@pytest.mark.parametrize("how", [["--device", "cuda"], ["--set", "device=cuda"]])
def test_a_missing_gpu_is_refused_at_validation(how, tmp_path, capsys):
    doc = json.loads((WORKFLOWS / "txt2img.json").read_text())
    doc["parameters"]["device"] = {"targets": [{"node": "sampler", "input": "device"}]}
    path = tmp_path / "w.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "out"
    code = main(["run", str(path), "--json", "--output-dir", str(out), *how])
    assert code == 2
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem["code"] == "device_unavailable" and problem["node_id"] == "sampler"
    assert "'cuda'" in problem["message"]
    assert not out.exists()


@pytest.mark.skipif(not BUNDLED.is_file(), reason="needs the bundled models")
def test_words_outside_the_bundled_vocabulary_are_a_warning_not_an_error(capsys):
    code = main(["validate", str(WORKFLOWS / "txt2img.json"), "--json", "--set", "prompt=a white cat on the left"])
    assert code == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert [(w["node_id"], w["input"], w["code"]) for w in warnings] == [("positive", "text", "model_limits")]
    assert "'white', 'cat'" in warnings[0]["message"]
    assert main(["validate", str(WORKFLOWS / "txt2img.json"), "--json",
                 "--set", "prompt=a small red circle on the left and a large blue square at the top"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


def test_the_vocabulary_is_the_training_captions():
    from ldmgraph.nodes import conditioning
    from ldmgraph.train.data import scenes, vocab

    assert conditioning.COLOURS == tuple(vocab.COLOURS) and conditioning.SHAPES == vocab.SHAPES
    assert conditioning.POSITIONS == tuple(vocab.POSITIONS) and conditioning.SIZES == tuple(vocab.SIZES)
    captions = {scenes.scene_at(0, "train", i).caption for i in range(300)}
    assert any(" and " in c for c in captions) and any("small" in c for c in captions)
    assert conditioning.unknown_words(" ".join(captions)) == []  # every training word is known


@pytest.mark.skipif(not BUNDLED.is_file(), reason="needs the bundled models")
@pytest.mark.parametrize(("settings", "needed"), [
    (["sampler=uni_pc", "steps=8"], 16), (["sampler=uni_pc_bh2", "steps=8", "cfg=7"], 28),
    (["sampler=plms", "steps=20"], 40),
])
def test_high_order_solvers_with_guidance_and_few_steps_warn_on_the_bundled_model(settings, needed, capsys):
    # UniPC (order 3) and PLMS draw part of the prompts wrong there (diffusers' schedulers too):
    # validation says so, names what to use instead, and still accepts the workflow
    sets = [arg for setting in settings for arg in ("--set", setting)]
    assert main(["validate", str(WORKFLOWS / "txt2img.json"), "--json", *sets]) == 0
    (warning,) = json.loads(capsys.readouterr().out)["warnings"]
    assert (warning["node_id"], warning["input"], warning["code"]) == ("sampler", "sampler", "model_limits")
    assert "dpmpp_2m" in warning["message"] and f"at least {needed} steps" in warning["message"]


@pytest.mark.skipif(not BUNDLED.is_file(), reason="needs the bundled models")
@pytest.mark.parametrize("settings", [
    ["sampler=uni_pc", "steps=16"], ["sampler=uni_pc", "steps=8", "cfg=1"], ["sampler=plms", "steps=40"],
    ["sampler=dpmpp_2m", "steps=8"],
])
def test_enough_steps_or_low_cfg_or_another_solver_do_not_warn(settings, capsys):
    sets = [arg for setting in settings for arg in ("--set", setting)]
    assert main(["validate", str(WORKFLOWS / "txt2img.json"), "--json", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
