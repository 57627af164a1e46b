"""Inpainting with a fractional noise mask blends the prediction with the known latent once per step.

ComfyUI's imported inpaint graphs (VAEEncodeForInpaint with grow_mask_by, and SetLatentNoiseMask
followed by a bilinear LatentUpscaleBy, which resizes the mask) run through the Executor. The reference is computed here in closed
form from the network's own outputs, recorded by a forward hook on the U-Net: ComfyUI's rule (its
KSamplerX0Inpaint) is that before each model call x becomes x m + (known + noise sigma)(1 - m), and
that the prediction becomes D m + known (1 - m); nothing is blended after the sampler. With Euler
steps, CFG D = D_u + cfg (D_c - D_u), D = x - sigma eps, integer-timestep convention and the batch's
noise from one generator seeded with the seed, the final latent follows from the recorded eps.
A second blend after sampling (m^2 instead of m) would be far outside the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from comfy_graphs import API_INPAINT_PLAIN_MODEL
from test_comfyui_sampling import comfy_schedule

from ldmgraph.interop.comfyui import to_workflow

pytestmark = pytest.mark.reference

STEPS = 5
TOLERANCE = 1e-5
# KSampler node -> the node that makes its latent (and its noise mask)
CASES = {"grow_mask_by": ("8", "5"), "resized_mask": ("9", "14")}
# the second sampler's masked latent, upscaled by 1.25 (its mask bilinearly: fractional at the edges)
UPSCALE = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["7", 0], "upscale_method": "bilinear", "scale_by": 1.25}}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _single_blend_reference(calls: list, known: torch.Tensor, mask: torch.Tensor, sampler: dict, sigmas: list):
    """Euler over `sigmas` with ComfyUI's one blend per step, from the recorded (input, eps) of each
    U-Net call (cond and uncond stacked in one batch); also checks that each recorded input is the
    blended x this replay computes, i.e. that it follows the same trajectory."""
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(sampler["seed"]))
    s0 = sigmas[0]
    x = known + noise * ((1 + s0 * s0) ** 0.5 if sampler["denoise"] >= 1.0 else s0)
    assert len(calls) == len(sigmas) - 1
    for (model_in, eps), s, s_next in zip(calls, sigmas[:-1], sigmas[1:], strict=True):
        blended = x * mask + (known + noise * s) * (1 - mask)
        c_in = (s * s + 1) ** -0.5
        assert torch.allclose(model_in, torch.cat([blended, blended]) * c_in, atol=1e-5, rtol=1e-5)
        cond, uncond = (blended - s * e for e in eps.chunk(2))
        denoised = uncond + sampler["cfg"] * (cond - uncond)
        denoised = denoised * mask + known * (1 - mask)
        x = x + (x - denoised) / s * (s_next - s)
    return x


@pytest.mark.parametrize("case", sorted(CASES))
def test_inpaint_with_fractional_mask_blends_once_reference(case, comfy_executor):
    sampler_id, latent_id = CASES[case]
    graph = copy.deepcopy(API_INPAINT_PLAIN_MODEL)
    for node in ("8", "9"):
        graph[node]["inputs"]["steps"] = STEPS
    graph["14"] = copy.deepcopy(UPSCALE)
    graph["9"]["inputs"]["latent_image"] = ["14", 0]
    workflow = to_workflow(graph)
    model = comfy_executor.run(workflow, outputs=["1"]).outputs["1"]["model"]
    calls: list = []

    def record(module, args, kwargs, output):
        calls.append((args[0].detach().clone(), output.detach().clone()))

    hook = model.diffusion_model.register_forward_hook(record, with_kwargs=True)
    try:
        result = comfy_executor.run(workflow, outputs=[sampler_id, latent_id])
    finally:
        hook.remove()
    latent = result.outputs[latent_id]["latent"]
    got = result.outputs[sampler_id]["latent"].samples
    mask = latent.noise_mask.reshape(-1, 1, *got.shape[-2:]).float()
    assert bool(((mask > 0.01) & (mask < 0.99)).any()), "the mask must be fractional somewhere"

    inputs = graph[sampler_id]["inputs"]
    total = STEPS if inputs["denoise"] >= 1.0 else int(STEPS / inputs["denoise"])
    sigmas = comfy_schedule(inputs["scheduler"], total)[-(STEPS + 1) :]
    expected = _single_blend_reference(calls, latent.samples.float(), mask, inputs, sigmas)
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOLERANCE * scale, float((got - expected).abs().max())
    # what a second blend after sampling would give: known (1 - m) + x m
    twice = latent.samples * (1 - mask) + expected * mask
    assert float((twice - expected).abs().max()) > 1e-3 * scale
