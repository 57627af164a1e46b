"""SDXL through the executor against diffusers' SDXL pipelines, on tiny random models built here.

The base: a workflow (CheckpointLoader, TextEncode x2, EmptyLatent, Scheduler, SamplerSelect,
CFGGuider, RandomNoise, SamplerCustomAdvanced, VAEDecode) on the diffusers folder and on its
single-file conversion, against `StableDiffusionXLPipeline` with the same modules and seed: batch
1 and 2, cfg 1 and 5, Euler and DPM++ 2M, decoded images to 1e-3. The refiner: the base runs the
first 8 of 10 steps and returns its noisy latent, the refiner runs the rest, against the base
pipeline with `denoising_end=0.8` then `StableDiffusionXLImg2ImgPipeline` with
`denoising_start=0.8` (diffusers' own base + refiner recipe).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

import sdxl_models as sm  # noqa: E402

pytestmark = pytest.mark.reference

SEED, SIZE, STEPS = 11, 64, 6
PROMPT, NEGATIVE = "a red cube on a blue table, photo", "blurry"

# our sampler, its schedule and start-noise rule <-> diffusers' scheduler and settings
SAMPLERS = {
    "euler": (("euler", "normal", "sigma"), ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"})),
    "dpmpp_2m": (("dpmpp_2m", "linspace_rounded", "vp"), (  # diffusers rounds its linspace timesteps here
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"})),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sdxl")
    modules = sm.build(root)
    sm.write_single_file(root / "sdxl.safetensors", modules["base"], refiner=False)
    sm.write_single_file(root / "sdxl_refiner.safetensors", modules["refiner"], refiner=True)
    return root, modules


@pytest.fixture(scope="module")
def executor(models):
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    root, _ = models
    return Executor(load_registry(), Environment(input_dir=root, output_dir=root / "out", model_dirs=(root,)))


def link(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


def _sampling(prefix: str, ckpt: str, latent: dict, sampler: str, schedule: str, start_noise: str, cfg: float,
              sigmas: dict, noise: str) -> dict[str, Any]:
    return {
        f"{prefix}pos": {"type": "TextEncode", "inputs": {"text_encoder": link(ckpt, "text_encoder"), "text": PROMPT}},
        f"{prefix}neg": {"type": "TextEncode", "inputs": {"text_encoder": link(ckpt, "text_encoder"), "text": NEGATIVE}},
        f"{prefix}sampler": {"type": "SamplerSelect", "inputs": {"sampler": sampler}},
        f"{prefix}guider": {"type": "CFGGuider", "inputs": {
            "model": link(ckpt, "model"), "positive": link(f"{prefix}pos", "conditioning"),
            "negative": link(f"{prefix}neg", "conditioning"), "cfg": cfg}},
        f"{prefix}run": {"type": "SamplerCustomAdvanced", "inputs": {
            "noise": link(noise, "noise"), "guider": link(f"{prefix}guider", "guider"),
            "sampler": link(f"{prefix}sampler", "sampler"), "sigmas": sigmas, "latent": latent}},
    }


def base_workflow(ckpt_name: str, sampler: str, schedule: str, start_noise: str, cfg: float, batch: int) -> dict:
    nodes = {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt_name}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch,
                                                     "vae": link("ckpt", "vae")}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": link("ckpt", "model"), "schedule": schedule,
                                                   "steps": STEPS}},
        "noise": {"type": "RandomNoise", "inputs": {"noise_seed": SEED, "start_noise": start_noise,
                                                    "convention": "diffusers"}},
        **_sampling("", "ckpt", link("latent", "latent"), sampler, schedule, start_noise, cfg,
                    link("sigmas", "sigmas"), "noise"),
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("run", "output")}},
    }
    return {"format": "ldmgraph/1", "nodes": nodes}


def _pipe(modules: dict[str, Any], scheduler: str, options: dict, refiner: bool = False) -> Any:
    import diffusers

    tok_l, tok_g = sm.tokenizers()
    sched = getattr(diffusers, scheduler)(**sm.SD, **options)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=modules["vae"], text_encoder=None, text_encoder_2=modules["text_encoder_2"], tokenizer=None,
            tokenizer_2=tok_g, unet=modules["unet"], scheduler=sched, requires_aesthetics_score=True)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=modules["vae"], text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
            tokenizer=tok_l, tokenizer_2=tok_g, unet=modules["unet"], scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("layout", ["sdxl", "sdxl.safetensors"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_base_workflow_equals_diffusers_sdxl_pipeline(layout, sampler, cfg, batch, models, executor):
    ours, (scheduler, options) = SAMPLERS[sampler]
    _, modules = models
    result = executor.run(base_workflow(layout, *ours, cfg, batch), outputs=["decode"])
    image = np.asarray(result.outputs["decode"]["image"])
    with torch.no_grad():
        expected = _pipe(modules["base"], scheduler, options)(
            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=cfg,
            height=SIZE, width=SIZE, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(SEED),
            output_type="np").images
    assert image.shape == expected.shape == (batch, SIZE, SIZE, 3)
    assert np.abs(image - expected).max() <= 1e-3, np.abs(image - expected).max()


REFINER_STEPS, SWITCH = 10, 8  # diffusers: denoising_end 0.8 keeps timesteps >= 200, the first 8 of 10


def refiner_workflow(base: str, refiner: str, cfg: float) -> dict:
    nodes = {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": base}},
        "ref": {"type": "CheckpointLoader", "inputs": {"ckpt_name": refiner}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                     "vae": link("ckpt", "vae")}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": link("ckpt", "model"), "schedule": "normal",
                                                   "steps": REFINER_STEPS}},
        "split": {"type": "SplitSigmas", "inputs": {"sigmas": link("sigmas", "sigmas"), "step": SWITCH}},
        "noise": {"type": "RandomNoise", "inputs": {"noise_seed": SEED, "start_noise": "sigma",
                                                    "convention": "diffusers"}},
        "nonoise": {"type": "DisableNoise", "inputs": {"convention": "diffusers"}},
        **_sampling("", "ckpt", link("latent", "latent"), "euler", "normal", "vp", cfg,
                    link("split", "high_sigmas"), "noise"),
        **_sampling("r_", "ref", link("run", "output"), "euler", "normal", "vp", cfg,
                    link("split", "low_sigmas"), "nonoise"),
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ref", "vae"), "latent": link("r_run", "output")}},
    }
    return {"format": "ldmgraph/1", "nodes": nodes}


@pytest.mark.parametrize("layout", [("sdxl", "sdxl_refiner"), ("sdxl.safetensors", "sdxl_refiner.safetensors")])
def test_sdxl_base_then_refiner_equals_diffusers_img2img_refiner(layout, models, executor):
    _, modules = models
    cfg = 5.0
    result = executor.run(refiner_workflow(*layout, cfg), outputs=["decode"])
    image = np.asarray(result.outputs["decode"]["image"])
    options = {"timestep_spacing": "linspace"}
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        latents = _pipe(modules["base"], "EulerDiscreteScheduler", options)(
            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=REFINER_STEPS, guidance_scale=cfg,
            height=SIZE, width=SIZE, denoising_end=SWITCH / REFINER_STEPS, generator=generator,
            output_type="latent").images
        expected = _pipe(modules["refiner"], "EulerDiscreteScheduler", options, refiner=True)(
            prompt=PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=REFINER_STEPS,
            guidance_scale=cfg, denoising_start=SWITCH / REFINER_STEPS, generator=generator,
            output_type="np").images
    assert image.shape == expected.shape
    assert np.abs(image - expected).max() <= 1e-3, np.abs(image - expected).max()
