"""Tiny random checkpoints in every layout the loader reads, written to tmp folders.

Shapes are real (original key names, SD-like structure), widths tiny, so a whole table of files
builds in a second. Weights are random but seeded: tests compare our modules with an independent
implementation on the same file, never with a fixed number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ldmgraph.models.single_file import write_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_VAE: dict[str, Any] = {
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "embed_dim": 4,
}


def tiny_unet(**overrides: Any) -> dict[str, Any]:
    """SD1-shaped U-Net kwargs at 1/10 width: two levels, attention on both, context 768."""
    config: dict[str, Any] = {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_heads": 8,
        "transformer_depth": 1,
        "context_dim": 768,
        "use_linear_in_transformer": False,
    }
    config.update(overrides)
    return config


def tiny_sd2_unet(**overrides: Any) -> dict[str, Any]:
    """SD2-shaped: 64 channels per head, linear projections, context 1024."""
    return tiny_unet(
        model_channels=64,
        num_heads=-1,
        num_head_channels=64,
        context_dim=1024,
        use_linear_in_transformer=True,
        **overrides,
    )


def random_state(
    module: torch.nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The module's state dict with every float tensor replaced by seeded N(0, 0.05) values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            out[k] = (torch.randn(v.shape, generator=gen) * 0.05).to(dtype)
        else:
            out[k] = torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v.clone()
    return out


def unet_state(
    config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    from ldmgraph.models.unet import UNetModel

    with torch.device("meta"):  # shapes only: no slow random init
        module = UNetModel(**config)
    return random_state(module, seed, dtype)


def vae_state(
    config: dict[str, Any] | None = None, seed: int = 1, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    from ldmgraph.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        module = AutoencoderKL(**(config or TINY_VAE))
    return random_state(module, seed, dtype)


def clip_model(
    hidden: int = 128,
    layers: int = 3,
    vocab: int = 49408,
    act: str = "quick_gelu",
    seed: int = 2,
    heads: int = 0,
) -> Any:
    """A random transformers CLIPTextModel (the independent reference for our text encoder).

    Heads default to hidden / 64, as in every released CLIP text tower (single files do not record it).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads or max(1, hidden // 64),
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms, so that a missed final norm is seen
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def clip_sd1_keys(model: Any) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's weights under SD1's `cond_stage_model.transformer.text_model.`."""
    return {f"cond_stage_model.transformer.text_model.{k}": v.clone() for k, v in model.state_dict().items()}


def clip_openclip_keys(model: Any) -> dict[str, torch.Tensor]:
    """The same weights in SD2's OpenCLIP layout (`cond_stage_model.model.*`, fused in_proj)."""
    sd = model.state_dict()
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"].clone(),
        p + "positional_embedding": sd["embeddings.position_embedding.weight"].clone(),
        p + "ln_final.weight": sd["final_layer_norm.weight"].clone(),
        p + "ln_final.bias": sd["final_layer_norm.bias"].clone(),
        p + "text_projection": torch.eye(model.config.hidden_size),
        p + "logit_scale": torch.tensor(4.6),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
            )
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"].clone()
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"].clone()
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"].clone()
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"].clone()
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"].clone()
    return out


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    return write_state_dict(path, tensors, metadata)


def bundled_metadata(unet: dict[str, Any], **overrides: Any) -> dict[str, str]:
    meta: dict[str, Any] = {
        "format": "ldmgraph-bundled/1",
        "kind": "txt2img",
        "unet": unet,
        "vae": TINY_VAE,
        "scale_factor": 0.5,
        "text_encoder": "minilm-l6-v2",
        "concat": None,
        "schedule": {
            "beta_schedule": "linear",
            "linear_start": 0.0015,
            "linear_end": 0.0195,
            "timesteps": 1000,
        },
        "prediction_type": "eps",
        "training": {"dataset": "test", "steps": 0, "seed": 0},
    }
    meta.update(overrides)
    return {"ldmgraph": json.dumps(meta)}


@pytest.fixture(scope="session")
def tiny_clip() -> Any:
    """A tiny random CLIP text model with the full 49408-token vocabulary (so real prompts encode)."""
    return clip_model()


@pytest.fixture
def sd1_file(tmp_path: Path, tiny_clip: Any) -> Path:
    """A tiny SD1-layout single file: U-Net (context 128), VAE, CLIP text model (hidden 128)."""
    tensors = {
        **prefixed("model.diffusion_model.", unet_state(tiny_unet(context_dim=128))),
        **prefixed("first_stage_model.", vae_state()),
        **clip_sd1_keys(tiny_clip),
    }
    return write(tmp_path / "tiny-sd1.safetensors", tensors)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads spin (70x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ldm_bert_keys(dim: int = 64, depth: int = 2, inner: int = 128, seed: int = 5) -> dict[str, torch.Tensor]:
    """Random weights of the paper's BERT text transformer under `cond_stage_model.transformer.` (x-transformers names)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * scale

    p = "cond_stage_model.transformer."
    out = {
        p + "token_emb.weight": rnd(30522, dim, scale=0.5),
        p + "pos_emb.emb.weight": rnd(77, dim, scale=0.5),
    }
    for i in range(depth):
        a, f = f"{p}attn_layers.layers.{2 * i}.", f"{p}attn_layers.layers.{2 * i + 1}."
        for layer in (a, f):
            out[layer + "0.weight"] = 1 + rnd(dim, scale=0.1)
            out[layer + "0.bias"] = rnd(dim, scale=0.1)
        for name in ("to_q", "to_k", "to_v"):
            out[f"{a}1.{name}.weight"] = rnd(inner, dim, scale=0.3)
        out[a + "1.to_out.weight"], out[a + "1.to_out.bias"] = rnd(dim, inner), rnd(dim)
        out[f + "1.net.0.0.weight"], out[f + "1.net.0.0.bias"] = rnd(4 * dim, dim), rnd(4 * dim)
        out[f + "1.net.2.weight"], out[f + "1.net.2.bias"] = rnd(dim, 4 * dim), rnd(dim)
    out[p + "norm.weight"], out[p + "norm.bias"] = 1 + rnd(dim, scale=0.1), rnd(dim, scale=0.1)
    out[p + "to_logits.weight"], out[p + "to_logits.bias"] = rnd(30522, dim), rnd(30522)
    return out


def to_ldm_bert(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """x-transformers names -> diffusers LDMBertModel names (layer 2i: attention, 2i+1: feed-forward)."""
    out = {
        "model.embed_tokens.weight": sd["cond_stage_model.transformer." + "token_emb.weight"],
        "model.embed_positions.weight": sd["cond_stage_model.transformer." + "pos_emb.emb.weight"],
        "model.layer_norm.weight": sd["cond_stage_model.transformer." + "norm.weight"],
        "model.layer_norm.bias": sd["cond_stage_model.transformer." + "norm.bias"],
        "to_logits.weight": sd["cond_stage_model.transformer." + "to_logits.weight"],
        "to_logits.bias": sd["cond_stage_model.transformer." + "to_logits.bias"],
    }
    for i in range(depth):
        a, f, d = f"cond_stage_model.transformer.attn_layers.layers.{2 * i}.", f"cond_stage_model.transformer.attn_layers.layers.{2 * i + 1}.", f"model.layers.{i}."
        for ours, theirs in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj")):
            out[f"{d}self_attn.{theirs}.weight"] = sd[f"{a}1.{ours}.weight"]
        out[d + "self_attn.out_proj.weight"], out[d + "self_attn.out_proj.bias"] = sd[a + "1.to_out.weight"], sd[
            a + "1.to_out.bias"]
        out[d + "self_attn_layer_norm.weight"], out[d + "self_attn_layer_norm.bias"] = sd[a + "0.weight"], sd[a + "0.bias"]
        out[d + "final_layer_norm.weight"], out[d + "final_layer_norm.bias"] = sd[f + "0.weight"], sd[f + "0.bias"]
        out[d + "fc1.weight"], out[d + "fc1.bias"] = sd[f + "1.net.0.0.weight"], sd[f + "1.net.0.0.bias"]
        out[d + "fc2.weight"], out[d + "fc2.bias"] = sd[f + "1.net.2.weight"], sd[f + "1.net.2.bias"]
    return out
