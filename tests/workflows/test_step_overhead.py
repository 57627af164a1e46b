"""Work that depends only on the conditioning or the schedule is done once per sampling run.

Through the Executor on the bundled text-to-image model (or its tiny stand-in): each cross-attention
layer projects the run's context to K and V once, not once per step, and the image is bit for bit
the one computed without that reuse (the per-step projections, as before).
"""

from __future__ import annotations

import contextlib

import torch
from ldmgraph_tiny_models import BUNDLED_NAMES

STEPS = 4


def _workflow() -> dict:
    link = lambda node, output: {"node": node, "output": output}  # noqa: E731
    text = link("ckpt", "text_encoder")
    return {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": BUNDLED_NAMES["txt2img"]}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": "a red circle on the left"}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": ""}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
        "sample": {"type": "Sampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("pos", "conditioning"),
            "negative": link("neg", "conditioning"), "latent": link("latent", "latent"),
            "seed": 3, "steps": STEPS, "cfg": 4.0, "sampler": "euler", "schedule": "karras"}},
    }}


def _run_counting_projections(executor) -> tuple[torch.Tensor, list[int]]:
    """The sampled latent, and how often each cross-attention layer's to_k ran."""
    model = executor.run(_workflow(), outputs=["ckpt"]).outputs["ckpt"]["model"]
    layers = [m.attn2.to_k for m in model.diffusion_model.modules() if hasattr(m, "attn2")]
    assert layers, "the model has cross-attention layers"
    counts = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        latent = executor.run(_workflow(), outputs=["sample"]).outputs["sample"]["latent"].samples
    finally:
        for hook in hooks:
            hook.remove()
    return latent, counts


def test_cross_attention_projects_the_context_once_per_sampling_run(make_executor, monkeypatch):
    latent, counts = _run_counting_projections(make_executor(fresh_models=True))
    assert counts == [1] * len(counts)  # one context (cond and uncond stacked) for all STEPS steps

    from ldmgraph.models.handles import DiffusionModelHandle

    monkeypatch.setattr(DiffusionModelHandle, "sampling_scope", lambda self: contextlib.nullcontext())
    per_step, counts = _run_counting_projections(make_executor(fresh_models=True))
    assert counts == [STEPS] * len(counts)
    assert torch.equal(latent, per_step)
