"""End to end against diffusers' LDM pipelines, through the Executor: the same random weights (written
in the original layout with the release's reduced config beside them, converted to diffusers' layout
for the reference), the same seed, DDIM with eta 0 and 1; images agree to 1e-3.

* `LDMPipeline` (unconditional; a celeba256-shaped model, VQ-f4, legacy attention blocks),
* `LDMSuperResolutionPipeline` (LDSR / bsr_sr-shaped, low-resolution image concatenated),
* `LDMTextToImagePipeline` (txt2img-f8-large-shaped: BERT text model, KL-f8, guidance scale 5).

The diffusers schedulers are set to the same DDIM: "scaled_linear" betas (the original "linear"),
set_alpha_to_one (our last step ends at alpha_bar = 1), "trailing" spacing for the DDIMSampler
node's "trailing" and "leading" with steps_offset 1 for LDSR's "uniform" timesteps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import IMAGE
from ldmgraph.plugins import hookimpl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
from model_helpers import to_ldm_bert  # noqa: E402
from test_paper_workflows import write_release  # noqa: E402
from test_vq_autoencoders import diffusers_vq  # noqa: E402

TOL = 1e-3
STEPS = 4


class Capture(Node):
    """Test output node: keeps the float image in the run's outputs."""

    type_name = "TestCapture"
    category = "test"
    output_node = True

    class Inputs(NodeInputs):
        image: Any = InputField(IMAGE, description="image")

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="image")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(image=inputs.image)


class _CapturePlugin:
    @hookimpl
    def ldmgraph_nodes(self) -> list[type[Node]]:
        return [Capture]


def run_graph(nodes: dict[str, Any], models: Path, inputs: Path | None = None) -> np.ndarray:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import PluginManager

    manager = PluginManager()
    manager.register(_CapturePlugin(), "test-capture")
    env = Environment(input_dir=inputs or models, output_dir=models / "out", model_dirs=(models,))
    result = Executor(manager.registry, env).run({"format": "ldmgraph/1", "nodes": nodes})
    return np.asarray(result.outputs["capture"]["image"])


def link(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


def ddim(spacing: str, schedule: dict[str, Any]) -> Any:
    from diffusers import DDIMScheduler

    extra = {"steps_offset": 1} if spacing == "leading" else {}
    return DDIMScheduler(num_train_timesteps=1000, beta_start=schedule["linear_start"], beta_end=schedule["linear_end"],
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing=spacing, **extra)


def step_noise_like_ours(seed: int, latent_shape: tuple[int, ...]) -> None:
    """The pipelines draw DDIM's per-step noise (eta > 0) from torch's global generator, not from the
    `generator` argument; ours draws it from the seed's generator after the starting noise. Seeding the
    global generator with the seed and drawing the starting noise once lines the two streams up."""
    torch.manual_seed(seed)
    torch.randn(latent_shape)


def original_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --- original U-Net (legacy attention blocks) -> diffusers UNet2DModel ------------------------------

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet(out: dict, sd: dict, src: str, dst: str) -> None:
    for key, value in sd.items():
        if key.startswith(src + "."):
            rest = key[len(src) + 1:]
            name, param = rest.rsplit(".", 1)
            out[f"{dst}.{RESNET[name]}.{param}"] = value


def _attention(out: dict, sd: dict, src: str, dst: str, head_channels: int) -> None:
    """Legacy fused qkv (rows grouped per head as [q_h, k_h, v_h]) -> to_q, to_k, to_v; conv1d -> linear."""
    out[f"{dst}.group_norm.weight"], out[f"{dst}.group_norm.bias"] = sd[f"{src}.norm.weight"], sd[f"{src}.norm.bias"]
    weight, bias = sd[f"{src}.qkv.weight"][..., 0], sd[f"{src}.qkv.bias"]
    channels = weight.shape[1]
    heads = channels // head_channels
    w = weight.reshape(heads, 3, head_channels, channels)
    b = bias.reshape(heads, 3, head_channels)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{dst}.{name}.weight"] = w[:, i].reshape(channels, channels)
        out[f"{dst}.{name}.bias"] = b[:, i].reshape(channels)
    out[f"{dst}.to_out.0.weight"] = sd[f"{src}.proj_out.weight"][..., 0]
    out[f"{dst}.to_out.0.bias"] = sd[f"{src}.proj_out.bias"]


def unet2d_from_original(sd: dict[str, torch.Tensor], levels: int, per_level: int, head_channels: int) -> dict:
    out = {
        "conv_in.weight": sd["input_blocks.0.0.weight"], "conv_in.bias": sd["input_blocks.0.0.bias"],
        "time_embedding.linear_1.weight": sd["time_embed.0.weight"], "time_embedding.linear_1.bias": sd["time_embed.0.bias"],
        "time_embedding.linear_2.weight": sd["time_embed.2.weight"], "time_embedding.linear_2.bias": sd["time_embed.2.bias"],
        "conv_norm_out.weight": sd["out.0.weight"], "conv_norm_out.bias": sd["out.0.bias"],
        "conv_out.weight": sd["out.2.weight"], "conv_out.bias": sd["out.2.bias"],
    }
    for level in range(levels):
        for j in range(per_level):
            i = 1 + level * (per_level + 1) + j
            _resnet(out, sd, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}")
            if f"input_blocks.{i}.1.qkv.weight" in sd:
                _attention(out, sd, f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", head_channels)
        if level < levels - 1:
            i = (level + 1) * (per_level + 1)
            for p in ("weight", "bias"):
                out[f"down_blocks.{level}.downsamplers.0.conv.{p}"] = sd[f"input_blocks.{i}.0.op.{p}"]
    _resnet(out, sd, "middle_block.0", "mid_block.resnets.0")
    _attention(out, sd, "middle_block.1", "mid_block.attentions.0", head_channels)
    _resnet(out, sd, "middle_block.2", "mid_block.resnets.1")
    for up in range(levels):
        for j in range(per_level + 1):
            i = up * (per_level + 1) + j
            _resnet(out, sd, f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}")
            if f"output_blocks.{i}.1.qkv.weight" in sd:
                _attention(out, sd, f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}", head_channels)
            for k in (1, 2):
                if f"output_blocks.{i}.{k}.conv.weight" in sd:
                    for p in ("weight", "bias"):
                        out[f"up_blocks.{up}.upsamplers.0.conv.{p}"] = sd[f"output_blocks.{i}.{k}.conv.{p}"]
    return out


def diffusers_unet2d(sd: dict[str, torch.Tensor], unet_cfg: dict[str, Any], sample_size: int) -> Any:
    from diffusers import UNet2DModel

    mult, attn = unet_cfg["channel_mult"], unet_cfg["attention_resolutions"]
    has_attn = [2**level in attn for level in range(len(mult))]
    model = UNet2DModel(
        sample_size=sample_size, in_channels=unet_cfg["in_channels"], out_channels=unet_cfg["out_channels"],
        block_out_channels=tuple(unet_cfg["model_channels"] * m for m in mult), layers_per_block=unet_cfg["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        attention_head_dim=unet_cfg["num_head_channels"], norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    )
    converted = unet2d_from_original(sub(sd, "model.diffusion_model."), len(mult), unet_cfg["num_res_blocks"],
                                     unet_cfg["num_head_channels"])
    model.load_state_dict(converted, strict=True)
    return model.eval()


def reference_vq(sd: dict[str, torch.Tensor], first: dict[str, Any]) -> Any:
    config = {"ddconfig": first["ddconfig"], "embed_dim": first["embed_dim"], "n_embed": first["n_embed"]}
    model = diffusers_vq(config, sub(sd, "first_stage_model."))
    model.register_to_config(scaling_factor=1.0)
    return model


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper-reference")
    for release in ("celeba256", "bsr_sr", "txt2img-f8-large"):
        write_release(root / release, release, seed=7)
    return root


@pytest.mark.reference
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_unconditional_release_agrees_with_ldm_pipeline(releases: Path, eta: float) -> None:
    from diffusers import LDMPipeline

    path = releases / "celeba256" / "model.safetensors"
    cfg = yaml.safe_load((path.parent / "config.yaml").read_text())["model"]["params"]
    sd = original_weights(path)
    pipe = LDMPipeline(vqvae=reference_vq(sd, cfg["first_stage_config"]["params"]),
                       unet=diffusers_unet2d(sd, cfg["unet_config"]["params"], 8),
                       scheduler=ddim("trailing", cfg))
    pipe.set_progress_bar_config(disable=True)
    step_noise_like_ours(3, (1, 3, 8, 8))
    expected = pipe(batch_size=1, generator=torch.Generator().manual_seed(3), eta=eta, num_inference_steps=STEPS,
                    output_type="np").images
    ours = run_graph({
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "celeba256/model.safetensors"}},
        "none": {"type": "UnconditionalConditioning", "inputs": {}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 32, "height": 32, "vae": link("ckpt", "vae")}},
        "sampler": {"type": "DDIMSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("none", "conditioning"),
            "negative": link("none", "conditioning"), "latent": link("latent", "latent"), "seed": 3, "steps": STEPS,
            "cfg": 1.0, "eta": eta, "discretize": "trailing"}},
        "decode": {"type": "VAEDecode", "inputs": {"latent": link("sampler", "latent"), "vae": link("ckpt", "vae")}},
        "capture": {"type": "TestCapture", "inputs": {"image": link("decode", "image")}},
    }, releases)
    assert ours.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(ours - expected).max() < TOL
    assert expected.std() > 0.01


@pytest.mark.reference
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ldsr_release_agrees_with_ldm_super_resolution_pipeline(releases: Path, tmp_path: Path, eta: float) -> None:
    from diffusers import LDMSuperResolutionPipeline

    path = releases / "bsr_sr" / "model.safetensors"
    cfg = yaml.safe_load((path.parent / "config.yaml").read_text())["model"]["params"]
    sd = original_weights(path)
    pipe = LDMSuperResolutionPipeline(vqvae=reference_vq(sd, cfg["first_stage_config"]["params"]),
                                      unet=diffusers_unet2d(sd, cfg["unet_config"]["params"], 8),
                                      scheduler=ddim("leading", cfg))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "lowres.png")
    with Image.open(tmp_path / "lowres.png") as im:
        lowres = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    step_noise_like_ours(5, (1, 3, 8, 8))
    expected = pipe(image=lowres * 2 - 1, num_inference_steps=STEPS, eta=eta,
                    generator=torch.Generator().manual_seed(5), output_type="np").images
    ours = run_graph({
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "bsr_sr/model.safetensors"}},
        "image": {"type": "LoadImage", "inputs": {"image": "lowres.png"}},
        "upscale": {"type": "LDSRUpscale", "inputs": {
            "model": link("ckpt", "model"), "vae": link("ckpt", "vae"), "image": link("image", "image"),
            "steps": STEPS, "eta": eta, "seed": 5}},
        "capture": {"type": "TestCapture", "inputs": {"image": link("upscale", "image")}},
    }, releases, inputs=tmp_path)
    assert ours.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(ours - expected).max() < TOL


@pytest.mark.reference
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_text_to_image_release_agrees_with_ldm_text_to_image_pipeline(releases: Path, eta: float) -> None:
    from diffusers import AutoencoderKL, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from ldmgraph.models.text_encoders import minilm_folder

    path = releases / "txt2img-f8-large" / "model.safetensors"
    cfg = yaml.safe_load((path.parent / "config.yaml").read_text())["model"]["params"]
    u, first = cfg["unet_config"]["params"], cfg["first_stage_config"]["params"]
    bert_params = cfg["cond_stage_config"]["params"]
    sd = original_weights(path)
    mult = u["channel_mult"]
    has_attn = [2**level in u["attention_resolutions"] for level in range(len(mult))]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=u["num_res_blocks"],
        block_out_channels=tuple(u["model_channels"] * m for m in mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        cross_attention_dim=u["context_dim"], attention_head_dim=u["num_heads"], norm_num_groups=32,
        flip_sin_to_cos=True, freq_shift=0,
    )
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)), strict=True)
    dd = first["ddconfig"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=dd["z_channels"], layers_per_block=dd["num_res_blocks"],
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
        down_block_types=("DownEncoderBlock2D",) * len(dd["ch_mult"]), up_block_types=("UpDecoderBlock2D",) * len(dd["ch_mult"]),
        norm_num_groups=32, scaling_factor=cfg["scale_factor"],
    )
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)), strict=True)
    bert = LDMBertModel(LDMBertConfig(
        vocab_size=30522, max_position_embeddings=77, encoder_layers=bert_params["n_layer"],
        encoder_ffn_dim=4 * bert_params["n_embed"], encoder_attention_heads=8, head_dim=64,
        d_model=bert_params["n_embed"], dropout=0.0)).eval()
    bert.load_state_dict(to_ldm_bert(sd, bert_params["n_layer"]), strict=True)
    tokenizer = BertTokenizer(str(minilm_folder() / "vocab.txt"), do_lower_case=True)
    pipe = LDMTextToImagePipeline(vqvae=vae.eval(), bert=bert, tokenizer=tokenizer, unet=unet.eval(),
                                  scheduler=ddim("trailing", cfg))
    pipe.set_progress_bar_config(disable=True)
    prompt = "A painting of a squirrel eating a burger"
    step_noise_like_ours(9, (1, 4, 8, 8))
    expected = pipe(prompt=[prompt], height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, eta=eta,
                    generator=torch.Generator().manual_seed(9), output_type="np").images
    ours = run_graph({
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "txt2img-f8-large/model.safetensors"}},
        "positive": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": prompt}},
        "negative": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": ""}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
        "sampler": {"type": "DDIMSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("positive", "conditioning"),
            "negative": link("negative", "conditioning"), "latent": link("latent", "latent"), "seed": 9,
            "steps": STEPS, "cfg": 5.0, "eta": eta, "discretize": "trailing"}},
        "decode": {"type": "VAEDecode", "inputs": {"latent": link("sampler", "latent"), "vae": link("ckpt", "vae")}},
        "capture": {"type": "TestCapture", "inputs": {"image": link("decode", "image")}},
    }, releases)
    assert ours.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(ours - expected).max() < TOL
