"""Tiny random SDXL base and refiner pipelines (diffusers' classes) and their single-file conversions.

Shapes follow the released models where detection depends on them: 64 channels per attention head,
text towers 64 wide (one head of 64), linear projections, an `add_embedding` of pooled + 6 (refiner
5) Fourier features; widths are tiny. The VAE has four levels (factor 8, as SDXL's), so the default
size numbers (latent size x 8) agree between ComfyUI's rule and diffusers' pixel sizes.
The single-file writer is independent of ldmgraph's loader: bigG goes to OpenCLIP's names (fused
in_proj, ln_final, text_projection [D, P]) by the rules of the released files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TIME_DIM, POOLED = 8, 32


def _text(seed: int, projection: bool, act: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act=act,
                            projection_dim=POOLED, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    with torch.no_grad():  # non-trivial norms, so that a missed or extra final norm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _unet(context: int, numbers: int, seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=context, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + numbers * TIME_DIM, norm_num_groups=32,
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises the output conv; random weights test more
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def _vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, scaling_factor=0.13025, force_upcast=True,
    ).eval()


def tokenizers() -> tuple[Any, Any]:
    """CLIP BPE tokenizers as SDXL's: ViT-L's pads with EOS, bigG's with "!" (id 0)."""
    from transformers import CLIPTokenizer

    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    folder = str(clip_tokenizer_folder())
    return CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder, pad_token="!")


def build(root: Path) -> dict[str, Any]:
    """Write `root/sdxl` and `root/sdxl_refiner` (diffusers) and return their modules."""
    base = {"unet": _unet(128, 6, 1), "vae": _vae(), "text_encoder": _text(2, False, "quick_gelu"),
            "text_encoder_2": _text(3, True, "gelu")}
    refiner = {"unet": _unet(64, 5, 4), "vae": base["vae"], "text_encoder_2": base["text_encoder_2"]}
    for name, modules in (("sdxl", base), ("sdxl_refiner", refiner)):
        folder = root / name
        for part, module in modules.items():
            module.save_pretrained(folder / part)
        tok_l, tok_g = tokenizers()
        if "text_encoder" in modules:
            tok_l.save_pretrained(folder / "tokenizer")
        tok_g.save_pretrained(folder / "tokenizer_2")
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "EulerDiscreteScheduler", **SD, "prediction_type": "epsilon"}))
        cls = "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionXLImg2ImgPipeline"
        (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    return {"base": base, "refiner": refiner}


def openclip_keys(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout under `prefix` (as SDXL files hold bigG)."""
    sd = model.state_dict()
    t = "text_model."
    out = {
        prefix + "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd[t + "final_layer_norm.weight"],
        prefix + "ln_final.bias": sd[t + "final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].t().contiguous(),
        prefix + "logit_scale": torch.tensor(4.6),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"{t}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    return out


def write_single_file(path: Path, modules: dict[str, Any], refiner: bool) -> Path:
    """The original single-file layout of a tiny pipeline (U-Net and VAE renamed by the key table)."""
    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.single_file import write_state_dict

    unet = modules["unet"]
    config = dk.unet_config_from_diffusers(dict(unet.config))
    tensors = {"model.diffusion_model." + k: v for k, v in dk.unet_from_diffusers(unet.state_dict(), config).items()}
    tensors.update({"first_stage_model." + k: v for k, v in dk.vae_from_diffusers(modules["vae"].state_dict()).items()})
    if refiner:
        tensors.update(openclip_keys(modules["text_encoder_2"], "conditioner.embedders.0.model."))
    else:
        tensors.update({"conditioner.embedders.0.transformer." + k: v
                        for k, v in modules["text_encoder"].state_dict().items()})
        tensors.update(openclip_keys(modules["text_encoder_2"], "conditioner.embedders.1.model."))
    return write_state_dict(path, {k: v.detach().clone() for k, v in tensors.items()})
