"""ControlNet against diffusers: the same random tiny weights, as a diffusers folder and in the original
layout, give diffusers' residuals; a whole workflow with a ControlNet gives
StableDiffusionControlNetPipeline's latent; bad ControlNets and hints are refused naming the node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_helpers import clip_model
from PIL import Image
from safetensors.torch import save_file

from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import ExecutionError
from ldmgraph.graph.executor import Executor
from ldmgraph.models.controlnet import load_controlnet
from ldmgraph.plugins import PluginManager

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
CONTEXT = 32


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, zero convolutions included (else residuals would all be zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if name.endswith("weight") and "norm" in name else 0.0  # norms stay near identity
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + scale)


def _tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32,
    ).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """models/pipe (a tiny SD1-style diffusers pipeline, VAE f = 2; 8 heads, SD1's count, which an
    original-layout file cannot state) and models/cn (a ControlNetModel folder for its U-Net, hint
    downscale 2, every weight random)."""
    from diffusers import AutoencoderKL, ControlNetModel

    root = tmp_path_factory.mktemp("controlnet")
    unet = _tiny_unet()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    _randomise(controlnet, 11)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, scaling_factor=0.5,
    ).eval()
    text = clip_model(hidden=CONTEXT, heads=4, layers=2, act="gelu", seed=3)
    pipe = root / "models" / "pipe"
    unet.save_pretrained(pipe / "unet")
    vae.save_pretrained(pipe / "vae")
    text.save_pretrained(pipe / "text_encoder")
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", **SD, "prediction_type": "epsilon"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    controlnet.save_pretrained(root / "models" / "cn")
    return {"root": root, "unet": unet, "vae": vae, "text": text, "controlnet": controlnet}


def _diffusers_residuals(controlnet: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                         hint: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return [*down, mid]


@pytest.mark.reference
def test_residuals_match_diffusers_controlnetmodel_in_both_layouts(folders: dict[str, Any], tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, CONTEXT, generator=gen)
    hint, t = torch.rand(2, 3, 16, 16, generator=gen), torch.tensor([20.0, 700.0])
    expected = _diffusers_residuals(folders["controlnet"], x, t, context, hint)
    assert all(r.abs().max() > 1e-3 for r in expected)  # random zero convs: nothing trivially zero

    from_folder = load_controlnet(folders["root"] / "models" / "cn")
    original = tmp_path / "control_tiny.safetensors"  # the original layout: control_model.* keys
    save_file({f"control_model.{k}": v.contiguous() for k, v in from_folder.control_model.state_dict().items()},
              str(original))
    for handle in (from_folder, load_controlnet(original)):
        with torch.no_grad():
            ours = handle.control_model(x, hint, t, context)
        assert len(ours) == len(expected)
        for got, want in zip(ours, expected, strict=True):
            assert (got - want).abs().max().item() <= 1e-4


def _hint_png(folder: Path) -> tuple[Path, np.ndarray]:
    """A 16x16 hint (the latent's 8x8 times the VAE's factor 2): a white square on black."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[4:12, 3:10] = 255
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / "hint.png")
    return folder / "hint.png", pixels.astype(np.float32) / 255.0


def _workflow(seed: int, cfg: float, steps: int, strength: float, **changes: Any) -> dict[str, Any]:
    def link(node: str, output: str) -> dict[str, str]:
        return {"node": node, "output": output}

    nodes: dict[str, Any] = {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "pipe"}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": "a cat"}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": ""}},
        "cn": {"type": "ControlNetLoader", "inputs": {"control_net_name": "cn"}},
        "hint": {"type": "LoadImage", "inputs": {"image": "hint.png"}},
        "apply": {"type": "ControlNetApplyAdvanced", "inputs": {
            "positive": link("pos", "conditioning"), "negative": link("neg", "conditioning"),
            "control_net": link("cn", "control_net"), "image": link("hint", "image"), "strength": strength}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                     "vae": link("ckpt", "vae")}},
        "sample": {"type": "Sampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("apply", "positive"),
            "negative": link("apply", "negative"), "latent": link("latent", "latent"), "seed": seed,
            "steps": steps, "cfg": cfg, "sampler": "euler", "schedule": "normal"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
        "save": {"type": "SaveImage", "inputs": {"images": link("decode", "image"), "filename_prefix": "cn"}},
    }
    for key, value in changes.items():
        node, name = key.split("__")
        nodes[node]["inputs"][name] = value
    return {"format": "ldmgraph/1", "nodes": nodes}


def _executor(root: Path, out: Path) -> Executor:
    registry = PluginManager(use_env=False).registry
    return Executor(registry, Environment(input_dir=root / "inputs", output_dir=out, model_dirs=(root / "models",)))


@pytest.mark.reference
def test_workflow_with_a_controlnet_matches_stable_diffusion_controlnet_pipeline(
    folders: dict[str, Any], tmp_path: Path
) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    from ldmgraph.diffusion.noise import draw, image_generators
    from ldmgraph.models.checkpoint import load_checkpoint

    root = folders["root"]
    _, hint = _hint_png(root / "inputs")
    seed, cfg, steps, strength = 5, 3.0, 6, 0.8
    ours = _executor(root, tmp_path / "out").run(_workflow(seed, cfg, steps, strength), outputs=["sample"])
    latent = ours.outputs["sample"]["latent"].samples

    encoder = load_checkpoint(root / "models" / "pipe").text_encoder
    pipe = StableDiffusionControlNetPipeline(
        vae=folders["vae"], text_encoder=folders["text"], tokenizer=None, unet=folders["unet"],
        controlnet=folders["controlnet"], scheduler=EulerDiscreteScheduler(**SD, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    noise = draw(image_generators(seed, 1), (4, 8, 8))  # ldmgraph's noise for image 0 of this seed
    # ldmgraph starts at noise * sqrt(1 + sigma_max^2) (x_T / sqrt(alpha_bar_T)); diffusers' Euler at
    # noise * sigma_max (its init_noise_sigma): hand the pipeline the same starting point
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas.max())
    noise = noise * (1 + sigma_max**2) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    expected = pipe(
        prompt_embeds=encoder.encode(["a cat"]).context, negative_prompt_embeds=encoder.encode([""]).context,
        image=torch.from_numpy(hint).permute(2, 0, 1)[None], height=16, width=16, num_inference_steps=steps,
        guidance_scale=cfg, controlnet_conditioning_scale=strength, latents=noise, output_type="latent",
    ).images
    assert (latent - expected).abs().max().item() <= 1e-3
    without = _executor(root, tmp_path / "out2").run(_workflow(seed, cfg, steps, 0.0), outputs=["sample"])
    assert (without.outputs["sample"]["latent"].samples - expected).abs().max().item() > 1e-2  # it did steer


def test_a_controlnet_for_another_architecture_is_refused_naming_it(folders: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    other = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32,
    )
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        folders["root"] / "models" / "cn_other")
    _hint_png(folders["root"] / "inputs")
    out = tmp_path / "out"
    with pytest.raises(ExecutionError) as caught:
        _executor(folders["root"], out).run(_workflow(1, 3.0, 2, 1.0, cn__control_net_name="cn_other"))
    message = str(caught.value)
    assert "sample" in message and "'cn_other' does not fit this model" in message
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_a_hint_with_the_wrong_channel_count_is_refused_naming_the_node(folders: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    gray = ControlNetModel.from_unet(folders["unet"], conditioning_embedding_out_channels=(16, 32),
                                     conditioning_channels=1)
    gray.save_pretrained(folders["root"] / "models" / "cn_gray")  # takes one-channel hints
    _hint_png(folders["root"] / "inputs")
    out = tmp_path / "out"
    with pytest.raises(ExecutionError) as caught:
        _executor(folders["root"], out).run(_workflow(1, 3.0, 2, 1.0, cn__control_net_name="cn_gray"))
    message = str(caught.value)
    assert "apply" in message and "ControlNetApplyAdvanced: the hint image has shape (1, 16, 16, 3)" in message
    assert "ControlNet 'cn_gray' takes 1-channel images" in message
    assert not out.exists() or not any(out.iterdir())


def test_a_hint_smaller_than_one_latent_pixel_is_refused(folders: dict[str, Any], tmp_path: Path) -> None:
    inputs = folders["root"] / "inputs"
    _hint_png(inputs)
    Image.fromarray(np.full((1, 1, 3), 255, np.uint8)).save(inputs / "dot.png")
    out = tmp_path / "out"
    with pytest.raises(ExecutionError) as caught:
        _executor(folders["root"], out).run(_workflow(1, 3.0, 2, 1.0, hint__image="dot.png"))
    assert "the hint image 1x1 is smaller than one latent pixel" in str(caught.value)
    assert not out.exists() or not any(out.iterdir())
