"""SDXL LoRAs through the executor against diffusers' `load_lora_weights` + `fuse_lora` on a tiny SDXL.

The tiny SDXL base (tests/models/sdxl_models.py) as a diffusers folder and as a single file; a kohya
LoRA as kohya writes SDXL ones (U-Net modules in the original layout, `lora_te1_` for CLIP ViT-L,
`lora_te2_` for OpenCLIP bigG) on the U-Net's attention and feed-forward projections and both text
encoders' layers. The workflow is CheckpointLoader -> LoraLoader -> TextEncode / Euler sampling ->
VAEDecode; `StableDiffusionXLPipeline` gets the same modules with the file loaded and fused at
the same strengths. Decoded images must agree within 1e-3. An SD1 LoRA on SDXL is refused at
validation.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdxl_models as sm  # noqa: E402

SEED, SIZE, STEPS, CFG = 11, 64, 6, 4.0
PROMPT, NEGATIVE = "a red cube on a blue table, photo", "blurry"
RANK = 4
UNET_KINDS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_KINDS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _factors(g: torch.Generator, weight: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    return {"lora_down.weight": torch.randn(RANK, weight.shape[1], generator=g) * scale,
            "lora_up.weight": torch.randn(weight.shape[0], RANK, generator=g) * scale,
            "alpha": torch.tensor(RANK / 2)}


def kohya_sdxl_lora(unet_original: dict[str, torch.Tensor], modules: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random kohya factors: U-Net keys named by the original layout (as kohya's SDXL files are)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, weight in unet_original.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and weight.dim() == 2 and module.endswith(UNET_KINDS) and "transformer" in module:
            stem = "lora_unet_" + module.replace(".", "_")
            out |= {f"{stem}.{k}": v for k, v in _factors(g, weight, 0.2).items()}
    for prefix, text in (("lora_te1_", modules["text_encoder"]), ("lora_te2_", modules["text_encoder_2"])):
        for name, layer in text.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(TEXT_KINDS):
                stem = prefix + name.replace(".", "_")
                out |= {f"{stem}.{k}": v for k, v in _factors(g, layer.weight, 0.2).items()}
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from ldmgraph.models import diffusers_keys as dk

    root = tmp_path_factory.mktemp("sdxl_lora")
    modules = sm.build(root)["base"]
    sm.write_single_file(root / "sdxl.safetensors", modules, refiner=False)
    unet = modules["unet"]
    original = dk.unet_from_diffusers(unet.state_dict(), dk.unet_config_from_diffusers(dict(unet.config)))
    (root / "loras").mkdir()
    save_file(kohya_sdxl_lora(original, modules, seed=1), str(root / "loras" / "sdxl_kohya.safetensors"))
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


def workflow(ckpt: str, lora: tuple[str, float, float] | None) -> dict[str, Any]:
    model, text = link("ckpt", "model"), link("ckpt", "text_encoder")
    nodes: dict[str, Any] = {"ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt}}}
    if lora is not None:
        name, sm_, sc = lora
        nodes["lora"] = {"type": "LoraLoader", "inputs": {"model": model, "text_encoder": text, "lora_name": name,
                                                          "strength_model": sm_, "strength_clip": sc}}
        model, text = link("lora", "model"), link("lora", "text_encoder")
    nodes |= {
        "latent": {"type": "EmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "vae": link("ckpt", "vae")}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": model, "schedule": "normal", "steps": STEPS}},
        "noise": {"type": "RandomNoise", "inputs": {"noise_seed": SEED, "start_noise": "sigma", "convention": "diffusers"}},
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": PROMPT}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": NEGATIVE}},
        "sampler": {"type": "SamplerSelect", "inputs": {"sampler": "euler"}},
        "guider": {"type": "CFGGuider", "inputs": {"model": model, "positive": link("pos", "conditioning"),
                                                    "negative": link("neg", "conditioning"), "cfg": CFG}},
        "run": {"type": "SamplerCustomAdvanced", "inputs": {
            "noise": link("noise", "noise"), "guider": link("guider", "guider"), "sampler": link("sampler", "sampler"),
            "sigmas": link("sigmas", "sigmas"), "latent": link("latent", "latent")}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("run", "output")}},
    }
    return {"format": "ldmgraph/1", "nodes": nodes}


def diffusers_image(models: tuple[Path, dict[str, Any]], sm_: float, sc: float) -> np.ndarray:
    import diffusers

    root, modules = models
    tok_l, tok_g = sm.tokenizers()
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=modules["vae"], text_encoder=copy.deepcopy(modules["text_encoder"]),
        text_encoder_2=copy.deepcopy(modules["text_encoder_2"]), tokenizer=tok_l, tokenizer_2=tok_g,
        unet=copy.deepcopy(modules["unet"]),
        scheduler=diffusers.EulerDiscreteScheduler(**sm.SD, timestep_spacing="linspace"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(root / "loras"), weight_name="sdxl_kohya.safetensors", adapter_name="x")
    pipe.fuse_lora(components=["unet"], lora_scale=sm_, adapter_names=["x"])
    pipe.fuse_lora(components=["text_encoder", "text_encoder_2"], lora_scale=sc, adapter_names=["x"])
    pipe.unload_lora_weights()
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                    height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sdxl", "sdxl.safetensors"])
def test_sdxl_lora_te1_te2_image_equals_diffusers_load_lora_weights_and_fuse(layout, models, executor):
    ours = np.asarray(executor.run(workflow(layout, ("sdxl_kohya", 0.8, 0.7)), outputs=["decode"]).outputs["decode"]["image"])
    base = np.asarray(executor.run(workflow(layout, None), outputs=["decode"]).outputs["decode"]["image"])
    expected = diffusers_image(models, 0.8, 0.7)
    assert np.abs(ours - base).max() > 1e-2
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-3, np.abs(ours - expected).max()


def test_sd1_lora_on_sdxl_is_refused_at_validation(models, executor):
    from ldmgraph.graph.errors import ValidationError

    root, _ = models
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 64),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, RANK),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                   torch.zeros(RANK, 768),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
                   torch.zeros(64, RANK)},
              str(root / "loras" / "sd1_style.safetensors"))
    for layout in ("sdxl", "sdxl.safetensors"):
        with pytest.raises(ValidationError, match="another architecture"):
            executor.validate(workflow(layout, ("sd1_style", 1.0, 1.0)), outputs=["decode"])
