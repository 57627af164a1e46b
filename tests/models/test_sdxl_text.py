"""SDXL text conditioning against diffusers, and the families ldmgraph refuses.

- The text encoders (loaded from the diffusers folder and from the single file) against
  `StableDiffusionXLPipeline.encode_prompt` (context and pooled vector), to 1e-5.
- The micro-conditioning vectors of `TextEncode`, `CLIPTextEncodeSDXL` and
  `CLIPTextEncodeSDXLRefiner` (run by the executor) against the pooled vector and diffusers'
  `_get_add_time_ids` through the U-Net's own `add_time_proj`, to 1e-5.
- Long prompts: diffusers truncates at 77 tokens, so a 150-token prompt is checked against the
  closed form of the windowing (each 75-token piece encoded alone as [BOS] piece [EOS] pad by
  transformers' models, states concatenated); `BREAK` likewise.
- Checkpoints of other families (SD3, Flux, ...) fail validation naming the family.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdxl_models as sm  # noqa: E402

LONG = ", ".join(f"a {c} {s} on a wooden table" for c in ("red", "blue", "green", "pink", "grey", "white")
                 for s in ("cube", "ball", "cone", "box"))  # about 190 tokens


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sdxl_text")
    modules = sm.build(root)
    sm.write_single_file(root / "sdxl.safetensors", modules["base"], refiner=False)
    sm.write_single_file(root / "sdxl_refiner.safetensors", modules["refiner"], refiner=True)
    return root, modules


def _pipe(modules: dict[str, Any]) -> Any:
    import diffusers

    tok_l, tok_g = sm.tokenizers()
    return diffusers.StableDiffusionXLPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
        tokenizer=tok_l, tokenizer_2=tok_g, unet=modules["unet"],
        scheduler=diffusers.EulerDiscreteScheduler(**sm.SD))


@pytest.mark.reference
@pytest.mark.parametrize("name", ["sdxl", "sdxl.safetensors"])
def test_sdxl_text_encoders_equal_diffusers_encode_prompt(name, models):
    from ldmgraph.models.checkpoint import load_checkpoint

    root, modules = models
    encoder = load_checkpoint(root / name).text_encoder
    prompts = ["a red cube on a blue table, photo", ""]
    with torch.no_grad():
        context, _, pooled, _ = _pipe(modules["base"]).encode_prompt(prompts, do_classifier_free_guidance=False)
    ours = encoder.encode(prompts)
    assert ours.context.shape == context.shape == (2, 77, 128)
    assert torch.allclose(ours.context, context, atol=1e-5, rtol=0)
    assert torch.allclose(ours.pooled, pooled, atol=1e-5, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["sdxl_refiner", "sdxl_refiner.safetensors"])
def test_sdxl_refiner_text_encoder_equals_diffusers_img2img_encode_prompt(name, models):
    import diffusers

    from ldmgraph.models.checkpoint import load_checkpoint

    root, modules = models
    _, tok_g = sm.tokenizers()
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=modules["refiner"]["vae"], text_encoder=None, text_encoder_2=modules["refiner"]["text_encoder_2"],
        tokenizer=None, tokenizer_2=tok_g, unet=modules["refiner"]["unet"],
        scheduler=diffusers.EulerDiscreteScheduler(**sm.SD), requires_aesthetics_score=True)
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=False)
    ours = load_checkpoint(root / name).text_encoder.encode(["a photo of a cat"])
    assert ours.context.shape == context.shape == (1, 77, 64)
    assert torch.allclose(ours.context, context, atol=1e-5, rtol=0)
    assert torch.allclose(ours.pooled, pooled, atol=1e-5, rtol=0)


def _executor(root: Path) -> Any:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    return Executor(load_registry(), Environment(input_dir=root, output_dir=root / "out", model_dirs=(root,)))


def _diffusers_vector(unet: Any, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """What diffusers' U-Net feeds its add_embedding: pooled text, then add_time_proj of the numbers."""
    features = unet.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    return torch.cat([pooled, features], dim=-1)


@pytest.mark.reference
def test_sdxl_micro_conditioning_vectors_equal_diffusers_add_time_ids(models):
    root, modules = models
    link = {"node": "ckpt", "output": "text_encoder"}
    nodes = {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "sdxl.safetensors"}},
        "ref": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "sdxl_refiner.safetensors"}},
        "plain": {"type": "TextEncode", "inputs": {"text_encoder": link, "text": "a cat"}},
        "xl": {"type": "CLIPTextEncodeSDXL", "inputs": {
            "text_encoder": link, "width": 1024, "height": 768, "crop_w": 16, "crop_h": 32,
            "target_width": 512, "target_height": 640, "text_g": "a cat", "text_l": "a cat"}},
        "sized": {"type": "SDXLSizeConditioning", "inputs": {  # replaces the numbers of "xl"
            "conditioning": {"node": "xl", "output": "conditioning"}, "width": 640, "crop_h": 8,
            "target_height": 256}},
        "refiner": {"type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "text_encoder": {"node": "ref", "output": "text_encoder"}, "ascore": 2.5, "width": 800,
            "height": 600, "text": "a cat"}},
    }
    out = _executor(root).run({"format": "ldmgraph/1", "nodes": nodes}, outputs=["plain", "xl", "sized", "refiner", "ckpt", "ref"])
    base_layout = out.outputs["ckpt"]["model"].diffusion_model.vector_layout
    ref_layout = out.outputs["ref"]["model"].diffusion_model.vector_layout
    pipe = _pipe(modules["base"])
    pooled = out.outputs["plain"]["conditioning"][0].pooled
    latent_hw = (12, 10)  # a 96 x 80 pixel image: ComfyUI's defaults are the latent's size x 8

    def ids(*args: Any, **kw: Any) -> torch.Tensor:
        return pipe._get_add_time_ids(*args, dtype=torch.float32, text_encoder_projection_dim=sm.POOLED, **kw)

    cases = [  # (entry, layout, negative, diffusers' numbers, unet)
        (out.outputs["plain"]["conditioning"][0], base_layout, False,
         ids((96, 80), (0, 0), (96, 80)), modules["base"]["unet"]),
        (out.outputs["xl"]["conditioning"][0], base_layout, False,
         ids((768, 1024), (32, 16), (640, 512)), modules["base"]["unet"]),
        (out.outputs["sized"]["conditioning"][0], base_layout, False,  # height 0: the latent's 96
         ids((96, 640), (8, 0), (256, 640)), modules["base"]["unet"]),
    ]
    import diffusers

    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=modules["refiner"]["vae"], text_encoder=None, text_encoder_2=modules["refiner"]["text_encoder_2"],
        tokenizer=None, tokenizer_2=sm.tokenizers()[1], unet=modules["refiner"]["unet"],
        scheduler=diffusers.EulerDiscreteScheduler(**sm.SD), requires_aesthetics_score=True)
    positive, negative = img2img._get_add_time_ids(
        (600, 800), (0, 0), (600, 800), 2.5, 2.5, (600, 800), (0, 0), (600, 800), torch.float32, sm.POOLED)
    cases.append((out.outputs["refiner"]["conditioning"][0], ref_layout, False, positive, modules["refiner"]["unet"]))
    # TextEncode on the refiner: aesthetic score 6 positive, 2.5 negative, as ComfyUI's defaults
    pos6, neg25 = img2img._get_add_time_ids((96, 80), (0, 0), (96, 80), 6.0, 2.5, (96, 80), (0, 0), (96, 80),
                                            torch.float32, sm.POOLED)
    plain = out.outputs["plain"]["conditioning"][0]
    for entry, layout, negative, time_ids, unet in cases:
        ours = layout.vector(entry.pooled, entry.vector, latent_hw, negative)
        expected = _diffusers_vector(unet, entry.pooled, time_ids)
        assert ours.shape == expected.shape
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    for negative, time_ids in ((False, pos6), (True, neg25)):
        ours = ref_layout.vector(pooled, plain.vector, latent_hw, negative)
        assert torch.allclose(ours, _diffusers_vector(modules["refiner"]["unet"], pooled, time_ids), atol=1e-5, rtol=0)


def _closed_form(model: Any, ids: list[int], pad: int, layer: int = -2) -> torch.Tensor:
    """Each 75-token piece as [BOS] piece [EOS] + pad to 77, encoded alone by transformers, concatenated."""
    pieces = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
    states = []
    for piece in pieces:
        row = [49406, *piece, 49407]
        row += [pad] * (77 - len(row))
        out = model(torch.tensor([row]), output_hidden_states=True)
        states.append(out.hidden_states[layer])
    return torch.cat(states, dim=1)


@pytest.mark.reference
def test_sdxl_long_prompt_and_break_windows_equal_closed_form(models):
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.tokenizer import default_clip_tokenizer

    root, modules = models
    encoder = load_checkpoint(root / "sdxl.safetensors").text_encoder
    tok = default_clip_tokenizer()
    ids = tok.ids(LONG)
    assert 150 < len(ids) <= 225
    with torch.no_grad():
        expected = torch.cat([_closed_form(modules["base"]["text_encoder"], ids, 49407),
                              _closed_form(modules["base"]["text_encoder_2"], ids, 0)], dim=-1)
        ours = encoder.encode([LONG])
        assert ours.context.shape == expected.shape == (1, 77 * 3, 128)
        assert torch.allclose(ours.context, expected, atol=1e-5, rtol=0)
        # BREAK: "a cat BREAK a dog" is two windows, each encoded alone (the word itself is gone)
        split = encoder.encode(["a cat BREAK a dog"], breaks=True).context
        parts = [torch.cat([_closed_form(modules["base"]["text_encoder"], tok.ids(t), 49407),
                            _closed_form(modules["base"]["text_encoder_2"], tok.ids(t), 0)], dim=-1)
                 for t in ("a cat", "a dog")]
        assert torch.allclose(split, torch.cat(parts, dim=1), atol=1e-5, rtol=0)
        # without breaks, BREAK is a word (ComfyUI's reading): one window
        assert encoder.encode(["a cat BREAK a dog"]).context.shape[1] == 77


def _write(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


REFUSED = {
    "Flux": {"double_blocks.0.img_attn.qkv.weight": (6, 2), "single_blocks.0.linear1.weight": (2, 2)},
    "Stable Diffusion 3": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2)},
    "Stable Cascade": {"clip_txt_mapper.weight": (2, 2), "down_blocks.0.0.channelwise.0.weight": (2, 2)},
    "PixArt": {"t_block.1.weight": (2, 2), "y_embedder.y_proj.fc1.weight": (2, 2)},
    "Hunyuan-DiT": {"mlp_t5.0.weight": (2, 2), "text_embedding_padding": (2, 2)},
    "Kolors": {"model.diffusion_model.encoder_hid_proj.weight": (2, 2),
               "model.diffusion_model.label_emb.0.0.weight": (2, 2)},
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_sdxl_era_families_are_refused_at_validation_by_name(family, tmp_path):
    from ldmgraph.graph.errors import ValidationError

    _write(tmp_path / "model.safetensors", REFUSED[family])
    workflow = {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "model.safetensors"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": {"node": "ckpt", "output": "vae"},
                                                   "latent": {"node": "e", "output": "latent"}}},
        "e": {"type": "EmptyLatent", "inputs": {}},
        "save": {"type": "SaveImage", "inputs": {"images": {"node": "decode", "output": "image"}}}}}
    with pytest.raises(ValidationError) as info:
        _executor(tmp_path).validate(workflow)
    problems = [p for p in info.value.problems if p.node_id == "ckpt"]
    assert [p.code for p in problems] == ["bad_model"]
    assert f"a {family} checkpoint" in problems[0].message and "not supported" in problems[0].message


def test_sdxl_diffusers_flux_folder_is_refused_by_name(tmp_path):
    import json

    from ldmgraph.models.errors import ModelError
    from ldmgraph.models.header import inspect_model

    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="a Flux checkpoint"):
        inspect_model(tmp_path / "flux")
