"""Whole workflows against diffusers' StableDiffusionPipeline on one tiny random diffusers folder.

Each row of the equivalence table (ldmgraph/diffusion/samplers.py) is a workflow document run by
the Executor: CheckpointLoader on the folder, TextEncode, EmptyLatent, the sampling parts
(Scheduler, SamplerSelect.<name> with the sampler's options, CFGGuider, RandomNoise with its
start-noise rule and convention), SamplerCustomAdvanced, VAEDecode. The pipeline gets the same
folder's modules, the same seed (one generator) and, as prompt embeddings, the conditioning our
TextEncode produced (the text encoders' agreement is tests/models/test_diffusers_folder.py), so
what is compared is the sampling. Decoded images must agree within 1e-3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (on a shared machine more threads only spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

pytestmark = pytest.mark.reference

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
STEPS, SEED, CFG, SIZE = 9, 17, 3.0, 16

PROMPT = "a red cube on a blue table, photo"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """models/pipe: unet/ vae/ text_encoder/ scheduler/ model_index.json (tiny, random, eps)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from model_helpers import clip_model

    root = tmp_path_factory.mktemp("models")
    pipe = root / "pipe"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, scaling_factor=0.25,
    ).eval()
    text = clip_model(hidden=64, heads=4, layers=2, act="gelu", seed=3)
    unet.save_pretrained(pipe / "unet")
    vae.save_pretrained(pipe / "vae")
    text.save_pretrained(pipe / "text_encoder")
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **SD, "prediction_type": "epsilon"})
    )
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, {"unet": unet, "vae": vae, "text_encoder": text}


def _workflow(sampler: str, options: dict, schedule: str, start_noise: str, convention: str) -> dict:
    link = lambda node, output: {"node": node, "output": output}  # noqa: E731
    model = link("ckpt", "model")
    nodes = {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "pipe"}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": PROMPT}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": ""}},
        "latent": {"type": "EmptyLatent",
                   "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1, "vae": link("ckpt", "vae")}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": model, "schedule": schedule, "steps": STEPS}},
        "sampler": {"type": f"SamplerSelect.{sampler}" if options else "SamplerSelect",
                    "inputs": options or {"sampler": sampler}},
        "guider": {"type": "CFGGuider", "inputs": {"model": model, "positive": link("pos", "conditioning"),
                                                    "negative": link("neg", "conditioning"), "cfg": CFG}},
        "noise": {"type": "RandomNoise",
                  "inputs": {"noise_seed": SEED, "start_noise": start_noise, "convention": convention}},
        "run": {"type": "SamplerCustomAdvanced",
                "inputs": {"noise": link("noise", "noise"), "guider": link("guider", "guider"),
                           "sampler": link("sampler", "sampler"), "sigmas": link("sigmas", "sigmas"),
                           "latent": link("latent", "latent")}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("run", "output")}},
    }
    return {"format": "ldmgraph/1", "nodes": nodes}


# (diffusers scheduler, its settings) -> (our sampler, its options, schedule, start noise, convention)
ROWS = {
    "ddim_alpha_to_one_false": (
        "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        ("ddim", {"eta": 0.0, "final_alpha": "first"}, "leading", "vp", "ldmgraph"),
    ),
    "ddim_alpha_to_one_true": (
        "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True, steps_offset=1),
        ("ddim", {"eta": 0.0, "final_alpha": "one"}, "leading", "vp", "ldmgraph"),
    ),
    "pndm_plms": (
        "PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        ("plms", {"final_alpha": "first"}, "leading", "vp", "ldmgraph"),
    ),
    "euler": ("EulerDiscreteScheduler", dict(timestep_spacing="linspace"), ("euler", {}, "normal", "sigma", "ldmgraph")),
    "euler_ancestral": (
        "EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace"),
        ("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}, "normal", "sigma", "ldmgraph"),
    ),
    "heun": ("HeunDiscreteScheduler", dict(timestep_spacing="linspace"), ("heun", {}, "normal", "sigma", "ldmgraph")),
    "lms": ("LMSDiscreteScheduler", dict(timestep_spacing="linspace"),
            ("lms", {"order": 4}, "normal", "sigma", "ldmgraph")),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace"),
        ("dpmpp_2m", {}, "sgm_uniform", "vp", "ldmgraph"),
    ),
    "dpmpp_2m_karras": (  # diffusers rounds the U-Net's timestep with Karras sigmas: the integer-timestep convention
        "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
        ("dpmpp_2m", {}, "karras", "vp", "comfyui"),
    ),
    "unipc": (
        "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2, timestep_spacing="linspace"),
        ("uni_pc_bh2", {"order": 2}, "sgm_uniform", "vp", "ldmgraph"),
    ),
    "ddpm": (
        "DDPMScheduler", dict(clip_sample=False, steps_offset=1, variance_type="fixed_small"),
        ("ddpm", {}, "leading", "vp", "ldmgraph"),
    ),
}


def _tokenizer() -> Any:
    """A real CLIP BPE tokenizer for the pipeline (transformers' CLIPTokenizer on the CLIP vocabulary,
    built offline), padding with "!" (id 0) as the folder's tokenizer/special_tokens_map.json says."""
    from transformers import CLIPTokenizer

    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), pad_token="!")


@pytest.fixture(scope="module")
def executor(folder):
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    root, _ = folder
    return Executor(load_registry(), Environment(input_dir=root, output_dir=root / "out", model_dirs=(root,)))


@pytest.mark.parametrize("row", sorted(ROWS))
def test_workflow_image_equals_stable_diffusion_pipeline(row, folder, executor):
    import diffusers

    cls, config, ours = ROWS[row]
    _, modules = folder
    result = executor.run(_workflow(*ours), outputs=["decode", "pos", "neg"])
    image = np.asarray(result.outputs["decode"]["image"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=_tokenizer(), unet=modules["unet"],
        scheduler=getattr(diffusers, cls)(**SD, **config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(
            prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG,
            height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np",
        ).images
    assert image.shape == expected.shape
    assert np.abs(image - expected).max() <= 1e-3, np.abs(image - expected).max()
