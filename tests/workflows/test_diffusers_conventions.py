"""The "diffusers" noise convention and diffusers' rounded "linspace" timesteps, through the Executor,
against diffusers' own pipelines on the tiny random diffusers folder of test_diffusers_equivalence.

- DPM-Solver++ (2M) and UniPC (bh2, order 2) with `timestep_spacing="linspace"` round their timesteps
  to integers: at 9 steps they coincide with the unrounded sgm_uniform spacing, at 8 they do not.
  The workflow uses the `linspace_rounded` schedule and must give the pipeline's latent at both.
- `StableDiffusionImg2ImgPipeline` samples the VAE posterior from the pipeline's generator before
  it draws the starting noise (and ancestral schedulers continue that generator): the workflow
  LoadImage -> VAEEncode -> SamplerCustomAdvanced with RandomNoise(convention="diffusers") must
  give the pipeline's latent from the same PIL image.

Latents are compared (output_type="latent"), to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_diffusers_equivalence as eq
import torch
from PIL import Image

pytestmark = pytest.mark.reference

_one_torch_thread = eq._one_torch_thread
folder = eq.folder
executor = eq.executor
TOLERANCE = 1e-5


def link(node: str, output: str) -> dict:
    return {"node": node, "output": output}


def _common(latent: dict, schedule: str, steps: int, sampler: str, options: dict, start_noise: str) -> dict:
    """The nodes a sampling workflow on the folder shares; `latent` is the starting LATENT's node."""
    model = link("ckpt", "model")
    text = link("ckpt", "text_encoder")
    return {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "pipe"}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": eq.PROMPT}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": ""}},
        "latent": latent,
        "sigmas": {"type": "Scheduler", "inputs": {"model": model, "schedule": schedule, "steps": steps}},
        "sampler": ({"type": f"SamplerSelect.{sampler}", "inputs": options} if options
                    else {"type": "SamplerSelect", "inputs": {"sampler": sampler}}),
        "guider": {"type": "CFGGuider", "inputs": {"model": model, "positive": link("pos", "conditioning"),
                                                    "negative": link("neg", "conditioning"), "cfg": eq.CFG}},
        "noise": {"type": "RandomNoise",
                  "inputs": {"noise_seed": eq.SEED, "start_noise": start_noise, "convention": "diffusers"}},
    }


def _run(sigmas: dict) -> dict:
    return {"type": "SamplerCustomAdvanced",
            "inputs": {"noise": link("noise", "noise"), "guider": link("guider", "guider"),
                       "sampler": link("sampler", "sampler"), "sigmas": sigmas, "latent": link("latent", "latent")}}


def _pipeline(cls_name: str, modules: dict, scheduler: object):
    import diffusers

    pipe = getattr(diffusers, cls_name)(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=eq._tokenizer(), unet=modules["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


MULTISTEP = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), "dpmpp_2m", {}),
    "unipc": ("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2), "uni_pc_bh2", {"order": 2}),
}


@pytest.mark.parametrize("steps", [8, 9])
@pytest.mark.parametrize("row", sorted(MULTISTEP))
def test_linspace_rounded_multistep_latent_equals_diffusers_pipeline(row, steps, folder, executor):
    import diffusers

    scheduler_name, config, sampler, options = MULTISTEP[row]
    _, modules = folder
    empty = {"type": "EmptyLatent",
             "inputs": {"width": eq.SIZE, "height": eq.SIZE, "batch_size": 1, "vae": link("ckpt", "vae")}}
    scheduler = getattr(diffusers, scheduler_name)(**eq.SD, **config, timestep_spacing="linspace")
    pipe = _pipeline("StableDiffusionPipeline", modules, scheduler)
    with torch.no_grad():
        expected = pipe(
            prompt=eq.PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=eq.CFG,
            height=eq.SIZE, width=eq.SIZE, generator=torch.Generator().manual_seed(eq.SEED), output_type="latent",
        ).images
        expected_image = pipe.image_processor.postprocess(
            pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample, output_type="np")
    for schedule in ("linspace_rounded", "sgm_uniform"):
        nodes = _common(empty, schedule, steps, sampler, options, "vp")
        nodes["run"] = _run(link("sigmas", "sigmas"))
        nodes["decode"] = {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("run", "output")}}
        result = executor.run({"format": "ldmgraph/1", "nodes": nodes}, outputs=["run", "decode"])
        latent = result.outputs["run"]["output"].samples
        image = np.asarray(result.outputs["decode"]["image"])
        if schedule == "linspace_rounded":
            assert_latent_and_image_agree(latent, expected, image, expected_image)
        elif steps == 8:  # the unrounded spacing is visibly off here: rounding is what makes them agree
            assert np.abs(image - expected_image).max() > 10 * TOLERANCE


def assert_latent_and_image_agree(latent, expected, image, expected_image) -> None:
    """Decoded images within TOLERANCE; latents (which reach |z| ~ 40 on the random model) within
    TOLERANCE relative to their largest value, i.e. float32 rounding."""
    assert latent.shape == expected.shape and image.shape == expected_image.shape
    assert np.abs(image - expected_image).max() <= TOLERANCE, np.abs(image - expected_image).max()
    scale = float(expected.abs().max())
    assert float((latent - expected).abs().max()) <= TOLERANCE * max(1.0, scale), (latent - expected).abs().max()


IMG2IMG = {
    "euler": ("EulerDiscreteScheduler", "euler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", "euler_ancestral", {"eta": 1.0, "s_noise": 1.0}),
}


@pytest.mark.parametrize("row", sorted(IMG2IMG))
def test_img2img_diffusers_convention_equals_img2img_pipeline_from_pil(row, folder, executor):
    import diffusers

    scheduler_name, sampler, options = IMG2IMG[row]
    root, modules = folder
    steps, strength = 10, 0.6
    pixels = np.random.default_rng(5).integers(0, 256, (eq.SIZE, eq.SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "photo.png")
    image = Image.open(root / "photo.png").convert("RGB")

    # diffusers' img2img runs the last int(steps * strength) steps of a `steps`-step schedule
    skipped = steps - int(steps * strength)
    encoded = {"type": "VAEEncode", "inputs": {"vae": link("ckpt", "vae"), "image": link("load", "image")}}
    nodes = _common(encoded, "normal", steps, sampler, options, "auto")
    nodes["load"] = {"type": "LoadImage", "inputs": {"image": "photo.png"}}
    nodes["split"] = {"type": "SplitSigmas", "inputs": {"sigmas": link("sigmas", "sigmas"), "step": skipped}}
    nodes["run"] = _run(link("split", "low_sigmas"))
    nodes["decode"] = {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("run", "output")}}
    result = executor.run({"format": "ldmgraph/1", "nodes": nodes}, outputs=["run", "decode"])

    scheduler = getattr(diffusers, scheduler_name)(**eq.SD, timestep_spacing="linspace")
    pipe = _pipeline("StableDiffusionImg2ImgPipeline", modules, scheduler)
    with torch.no_grad():
        expected = pipe(
            prompt=eq.PROMPT, negative_prompt="", image=image, strength=strength, num_inference_steps=steps,
            guidance_scale=eq.CFG, generator=torch.Generator().manual_seed(eq.SEED), output_type="latent",
        ).images
        expected_image = pipe.image_processor.postprocess(
            pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample, output_type="np")
    assert_latent_and_image_agree(result.outputs["run"]["output"].samples, expected,
                                  np.asarray(result.outputs["decode"]["image"]), expected_image)
    # without the posterior draw (the ldmgraph convention encodes the posterior mean) it is far off
    nodes["noise"]["inputs"]["convention"] = "ldmgraph"
    other = executor.run({"format": "ldmgraph/1", "nodes": nodes}, outputs=["decode"])
    assert np.abs(np.asarray(other.outputs["decode"]["image"]) - expected_image).max() > 1e-2
