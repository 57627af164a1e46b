"""LoRA through the executor against diffusers' `load_lora_weights` + `fuse_lora` on a tiny SD1 pipeline.

One tiny random diffusers folder is the checkpoint; a LoRA file in the kohya format (written here
from random factors, diffusers' module names) and one in the PEFT format (made by peft on
diffusers' own modules, saved by `save_lora_weights`) go into `loras/`. The workflow is
CheckpointLoader -> LoraLoader -> TextEncode / sampling -> VAEDecode; diffusers' pipeline gets the
same folder's modules with the LoRA loaded and fused at the same strengths, the same seed and the
same Euler schedule. Decoded images must agree within 1e-3. The same fixtures check what users
notice about applying LoRAs: strength 0 is the base bit for bit, the base is restored after a run,
stacked LoRAs commute, a strength change does not reload the checkpoint, unmatched keys warn, and
a LoRA for another architecture is refused at validation.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
STEPS, SEED, CFG, SIZE = 6, 5, 3.0, 16
PROMPT = "a red cube on a blue table"
RANK = 4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora_targets(module: torch.nn.Module, kinds: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and n.rsplit(".", 1)[-1] in kinds
            or (isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and n.endswith(("to_out.0", "ff.net.0.proj", "ff.net.2")))]


UNET_KINDS = ("to_q", "to_k", "to_v", "proj_in", "proj_out")
TEXT_KINDS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def kohya_lora(unet: torch.nn.Module, text: torch.nn.Module, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Random kohya factors (diffusers' module names, alpha = rank / 2) on attention, feed-forward and
    projections of the U-Net and on every text-encoder layer."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, module, kinds in (("lora_unet_", unet, UNET_KINDS), ("lora_te_", text, TEXT_KINDS)):
        for name, layer in _lora_targets(module, kinds):
            w = layer.weight
            stem = prefix + name.replace(".", "_")
            down_shape = (RANK, w.shape[1], *w.shape[2:]) if w.dim() == 4 else (RANK, w.shape[1])
            up_shape = (w.shape[0], RANK, 1, 1) if w.dim() == 4 else (w.shape[0], RANK)
            out[stem + ".lora_down.weight"] = torch.randn(down_shape, generator=g) * scale
            out[stem + ".lora_up.weight"] = torch.randn(up_shape, generator=g) * scale
            out[stem + ".alpha"] = torch.tensor(RANK / 2)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
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
        json.dumps({"_class_name": "DDIMScheduler", **SD, "prediction_type": "epsilon"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    loras = root / "loras"
    loras.mkdir()
    save_file(kohya_lora(unet, text, seed=1), str(loras / "kohya_a.safetensors"))
    save_file(kohya_lora(unet, text, seed=2, scale=0.2), str(loras / "kohya_b.safetensors"))
    _peft_lora(unet, text, loras / "peft")
    return root, {"unet": unet, "vae": vae, "text_encoder": text}


def _peft_lora(unet: Any, text: Any, folder: Path) -> None:
    """A PEFT LoRA made by peft on copies of diffusers' modules, saved by diffusers."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet, text = copy.deepcopy(unet), copy.deepcopy(text)
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text), safe_serialization=True,
    )
    (folder / "pytorch_lora_weights.safetensors").rename(folder.parent / "peft.safetensors")


def _link(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


def workflow(loras: list[tuple[str, float, float]]) -> dict[str, Any]:
    """CheckpointLoader, LoraLoader per (name, strength_model, strength_clip), Euler sampling, VAEDecode."""
    nodes: dict[str, Any] = {"ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "pipe"}}}
    model, text = _link("ckpt", "model"), _link("ckpt", "text_encoder")
    for i, (name, sm, sc) in enumerate(loras):
        nodes[f"lora{i}"] = {"type": "LoraLoader", "inputs": {
            "model": model, "text_encoder": text, "lora_name": name, "strength_model": sm, "strength_clip": sc}}
        model, text = _link(f"lora{i}", "model"), _link(f"lora{i}", "text_encoder")
    nodes.update({
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": PROMPT}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": ""}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                     "vae": _link("ckpt", "vae")}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": model, "schedule": "normal", "steps": STEPS}},
        "sampler": {"type": "SamplerSelect", "inputs": {"sampler": "euler"}},
        "guider": {"type": "CFGGuider", "inputs": {"model": model, "positive": _link("pos", "conditioning"),
                                                    "negative": _link("neg", "conditioning"), "cfg": CFG}},
        "noise": {"type": "RandomNoise", "inputs": {"noise_seed": SEED, "start_noise": "sigma"}},
        "run": {"type": "SamplerCustomAdvanced", "inputs": {
            "noise": _link("noise", "noise"), "guider": _link("guider", "guider"), "sampler": _link("sampler", "sampler"),
            "sigmas": _link("sigmas", "sigmas"), "latent": _link("latent", "latent")}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": _link("ckpt", "vae"), "latent": _link("run", "output")}},
    })
    return {"format": "ldmgraph/1", "nodes": nodes}


@pytest.fixture(scope="module")
def executor(folder):
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    root, _ = folder
    return Executor(load_registry(), Environment(input_dir=root, output_dir=root / "out", model_dirs=(root,)))


def image_of(executor: Any, loras: list[tuple[str, float, float]]) -> np.ndarray:
    return np.asarray(executor.run(workflow(loras), outputs=["decode"]).outputs["decode"]["image"])


def diffusers_image(folder: tuple[Path, dict[str, Any]], lora_file: str, sm: float, sc: float) -> np.ndarray:
    import diffusers
    from transformers import CLIPTokenizer

    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    root, modules = folder
    pipe = diffusers.StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=copy.deepcopy(modules["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), pad_token="!"),
        unet=copy.deepcopy(modules["unet"]),
        scheduler=diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(root / "loras"), weight_name=lora_file, adapter_name="x")
    pipe.fuse_lora(components=["unet"], lora_scale=sm, adapter_names=["x"])
    pipe.fuse_lora(components=["text_encoder"], lora_scale=sc, adapter_names=["x"])
    pipe.unload_lora_weights()
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG,
                    height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images


@pytest.mark.reference
@pytest.mark.parametrize("lora_file", ["kohya_a.safetensors", "peft.safetensors"])
def test_lora_image_equals_diffusers_load_lora_weights_and_fuse(lora_file, folder, executor):
    ours = image_of(executor, [(lora_file, 0.8, 0.6)])
    expected = diffusers_image(folder, lora_file, 0.8, 0.6)
    base = image_of(executor, [])
    assert np.abs(ours - base).max() > 1e-2  # the LoRA changes the image
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-3, np.abs(ours - expected).max()


def _unet_bits(executor: Any) -> dict[str, torch.Tensor]:
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    cache = executor.resources[MODEL_CACHE_KEY]
    (checkpoint,) = [cache.get_or_load(k, lambda: None) for k in cache.keys() if k[0] == "checkpoint"]
    return {**{f"unet.{k}": v.clone() for k, v in checkpoint.unet.diffusion_model.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in checkpoint.text_encoder.state_dict().items()}}


def test_lora_strength_zero_is_the_base_bit_for_bit_and_the_base_is_restored(executor):
    base = image_of(executor, [])
    weights = _unet_bits(executor)
    assert np.array_equal(image_of(executor, [("kohya_a", 0.0, 0.0)]), base)
    patched = image_of(executor, [("kohya_a", 1.5, 1.0)])
    assert not np.array_equal(patched, base)
    after = _unet_bits(executor)
    assert all(torch.equal(weights[k], after[k]) for k in weights), "the base was not restored bit for bit"
    assert np.array_equal(image_of(executor, []), base)


def test_stacked_loras_in_either_order_agree(executor):
    ab = image_of(executor, [("kohya_a", 0.7, 0.5), ("kohya_b", 1.2, 0.9)])
    ba = image_of(executor, [("kohya_b", 1.2, 0.9), ("kohya_a", 0.7, 0.5)])
    assert np.abs(ab - ba).max() <= 1e-5


def test_lora_strength_change_reruns_from_the_lora_node_without_reloading(executor):
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    first = image_of(executor, [("kohya_a", 0.5, 0.5)])
    loads = executor.resources[MODEL_CACHE_KEY].stats.loads
    result = executor.run(workflow([("kohya_a", 0.9, 0.5)]), outputs=["decode"])
    assert executor.resources[MODEL_CACHE_KEY].stats.loads == loads  # neither checkpoint nor LoRA re-read
    assert "ckpt" in result.cached and {"lora0", "run", "decode"} <= set(result.executed)
    assert not np.array_equal(np.asarray(result.outputs["decode"]["image"]), first)


def test_lora_unmatched_keys_warn_naming_how_many_and_a_sample(folder, executor):
    from ldmgraph.models.lora import LoraKeysWarning

    root, modules = folder
    tensors = kohya_lora(modules["unet"], modules["text_encoder"], seed=3)
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(RANK, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, RANK)
    save_file(tensors, str(root / "loras" / "extra_keys.safetensors"))
    with pytest.warns(LoraKeysWarning, match=r"2 key\(s\) of the LoRA extra_keys.safetensors .*no_such_block"):
        image_of(executor, [("extra_keys", 1.0, 1.0)])


def test_lora_for_another_architecture_is_refused_at_validation(folder, executor):
    from ldmgraph.graph.errors import ValidationError

    root, modules = folder
    tensors = kohya_lora(modules["unet"], modules["text_encoder"], seed=4)
    wide = {k: (torch.zeros(RANK, 1024) if "attn2_to_k.lora_down" in k else v) for k, v in tensors.items()}
    save_file(wide, str(root / "loras" / "sd2_context.safetensors"))
    sdxl = dict(tensors)
    sdxl["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(RANK, 1280)
    sdxl["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(1280, RANK)
    save_file(sdxl, str(root / "loras" / "sdxl_te2.safetensors"))
    zeros = {"lora_down.weight": torch.zeros(RANK, 8), "lora_up.weight": torch.zeros(8, RANK)}
    save_file({f"transformer.single_transformer_blocks.0.attn.to_q.{k}": v for k, v in zeros.items()},
              str(root / "loras" / "flux_style.safetensors"))
    save_file({"some.other.tensor": torch.zeros(3)}, str(root / "loras" / "not_a_lora.safetensors"))
    for name, words in (("sd2_context", "another shape"), ("sdxl_te2", "second text encoder"),
                        ("flux_style", "(Flux, SD3)"), ("not_a_lora", "not a LoRA of a known format")):
        with pytest.raises(ValidationError) as info:
            executor.validate(workflow([(name, 1.0, 1.0)]), outputs=["decode"])
        text = str(info.value)
        assert "lora0" in text and "lora_name" in text and words in text and "another architecture" in text


# ---------------------------------------------------------------------------------- LyCORIS closed forms


def _lycoris_modules(unet: Any) -> dict[str, str]:
    """kohya stem -> diffusers parameter name for one module of each adapter kind."""
    return {
        "locon": "down_blocks.0.resnets.0.conv1",
        "loha": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lokr": "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "dora_out": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "dora_in": "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    }


def _closed_forms(weights: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LyCORIS tensors, the delta each makes at strength 1), from each format's definition."""
    g = torch.Generator().manual_seed(seed)
    r, alpha = 4, 3.0
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    names = _lycoris_modules(None)
    stem = {k: "lora_unet_" + v.replace(".", "_") for k, v in names.items()}

    w = weights[names["locon"] + ".weight"]  # conv 3x3: LoCon = up @ down on the flattened kernels
    down, up = rnd(r, w.shape[1], 3, 3), rnd(w.shape[0], r, 1, 1)
    tensors |= {stem["locon"] + ".lora_down.weight": down, stem["locon"] + ".lora_up.weight": up,
                stem["locon"] + ".alpha": torch.tensor(alpha)}
    deltas[names["locon"]] = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha / r

    w = weights[names["loha"] + ".weight"]  # LoHa = (w1a @ w1b) * (w2a @ w2b) * alpha / r
    w1a, w1b, w2a, w2b = rnd(w.shape[0], r), rnd(r, w.shape[1]), rnd(w.shape[0], r), rnd(r, w.shape[1])
    tensors |= {f"{stem['loha']}.hada_{k}": v for k, v in (("w1_a", w1a), ("w1_b", w1b), ("w2_a", w2a), ("w2_b", w2b))}
    tensors[stem["loha"] + ".alpha"] = torch.tensor(alpha)
    deltas[names["loha"]] = (w1a @ w1b) * (w2a @ w2b) * alpha / r

    w = weights[names["lokr"] + ".weight"]  # LoKr = kron(w1, w2_a @ w2_b) * alpha / r
    w1 = rnd(4, 8)
    w2a, w2b = rnd(w.shape[0] // 4, r), rnd(r, w.shape[1] // 8)
    tensors |= {stem["lokr"] + ".lokr_w1": w1, stem["lokr"] + ".lokr_w2_a": w2a, stem["lokr"] + ".lokr_w2_b": w2b,
                stem["lokr"] + ".alpha": torch.tensor(alpha)}
    deltas[names["lokr"]] = torch.kron(w1, w2a @ w2b) * alpha / r

    for key, axis in (("dora_out", 1), ("dora_in", 0)):  # DoRA = m * V / ||V|| - W, V = W + LoRA delta
        w = weights[names[key] + ".weight"]
        down, up = rnd(r, w.shape[1]), rnd(w.shape[0], r)
        v = w + up @ down * alpha / r
        norm = v.norm(dim=axis, keepdim=True)
        m = norm * (1 + rnd(*norm.shape))
        tensors |= {stem[key] + ".lora_down.weight": down, stem[key] + ".lora_up.weight": up,
                    stem[key] + ".alpha": torch.tensor(alpha), stem[key] + ".dora_scale": m}
        deltas[names[key]] = m * v / norm - w
    return tensors, deltas


@pytest.mark.reference
def test_lora_locon_loha_lokr_dora_equal_their_closed_forms(folder, executor):
    """LoraLoaderModelOnly with LyCORIS modules gives the image of a checkpoint whose weights are
    W + strength * (closed-form delta), written by the test."""
    import shutil

    from safetensors.torch import load_file

    root, _ = folder
    strength = 0.7
    weights = load_file(str(root / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    tensors, deltas = _closed_forms(weights, seed=11)
    save_file(tensors, str(root / "loras" / "lycoris.safetensors"))
    expected = root / "pipe_closed_form"
    if not expected.exists():
        shutil.copytree(root / "pipe", expected)
    changed = {k: (v + strength * deltas[k[: -len(".weight")]] if k[: -len(".weight")] in deltas else v)
               for k, v in weights.items()}
    save_file(changed, str(expected / "unet" / "diffusion_pytorch_model.safetensors"))

    doc = workflow([])
    doc["nodes"]["lora"] = {"type": "LoraLoaderModelOnly", "inputs": {
        "model": _link("ckpt", "model"), "lora_name": "lycoris", "strength_model": strength}}
    for node in ("sigmas", "guider"):
        doc["nodes"][node]["inputs"]["model"] = _link("lora", "model")
    ours = np.asarray(executor.run(doc, outputs=["decode"]).outputs["decode"]["image"])
    reference = workflow([])
    reference["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "pipe_closed_form"
    closed = np.asarray(executor.run(reference, outputs=["decode"]).outputs["decode"]["image"])
    assert np.abs(ours - image_of(executor, [])).max() > 1e-2
    assert np.abs(ours - closed).max() <= 1e-4, np.abs(ours - closed).max()


# ---------------------------------------------------------------------------------- FreeU


@pytest.mark.reference
@pytest.mark.parametrize("factors", [(1.3, 1.4, 0.9, 0.2), (0.8, 1.6, 0.5, 1.5)])
def test_freeu_model_patch_equals_diffusers_enable_freeu(factors, folder, executor):
    import diffusers
    from transformers import CLIPTokenizer

    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    b1, b2, s1, s2 = factors
    doc = workflow([])
    doc["nodes"]["freeu"] = {"type": "FreeU", "inputs": {
        "model": _link("ckpt", "model"), "b1": b1, "b2": b2, "s1": s1, "s2": s2, "rule": "levels"}}
    for node in ("sigmas", "guider"):
        doc["nodes"][node]["inputs"]["model"] = _link("freeu", "model")
    ours = np.asarray(executor.run(doc, outputs=["decode"]).outputs["decode"]["image"])
    _, modules = folder
    pipe = diffusers.StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), pad_token="!"),
        unet=copy.deepcopy(modules["unet"]), scheduler=diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG,
                        height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images
    assert np.abs(ours - image_of(executor, [])).max() > 1e-2
    assert np.abs(ours - expected).max() <= 1e-3, np.abs(ours - expected).max()


def test_two_branches_on_one_base_with_different_loras_each_get_their_own(executor):
    """One graph, one checkpoint: a branch with LoRA a, one with LoRA b, one with the base; each
    image equals the same branch run alone (the shared module is patched per branch, then restored)."""
    alone = {name: image_of(executor, loras) for name, loras in
             (("a", [("kohya_a", 1.0, 1.0)]), ("b", [("kohya_b", 1.0, 1.0)]), ("base", []))}
    doc = {"format": "ldmgraph/1", "nodes": {}}
    for name, loras in (("a", [("kohya_a", 1.0, 1.0)]), ("b", [("kohya_b", 1.0, 1.0)]), ("base", [])):
        branch = workflow(loras)["nodes"]
        for node_id, node in branch.items():
            if node_id == "ckpt":
                doc["nodes"]["ckpt"] = node
                continue
            for key, value in node["inputs"].items():
                if isinstance(value, dict) and value.get("node") not in (None, "ckpt"):
                    node["inputs"][key] = {"node": f"{name}.{value['node']}", "output": value["output"]}
            doc["nodes"][f"{name}.{node_id}"] = node
    from ldmgraph.graph.executor import Executor

    fresh = Executor(executor.registry, executor.env)  # nothing cached: every branch runs here
    result = fresh.run(doc, outputs=["a.decode", "b.decode", "base.decode"])
    assert {"a.run", "b.run", "base.run"} <= set(result.executed)
    for name in ("a", "b", "base"):
        assert np.array_equal(np.asarray(result.outputs[f"{name}.decode"]["image"]), alone[name]), name
    assert not np.array_equal(alone["a"], alone["b"])


def test_lora_is_applied_once_per_sampling_run_not_per_step(executor, monkeypatch):
    from ldmgraph.models import patches

    applied: list[str] = []
    original = patches._PatchState.apply

    def counting(self, module, chosen):
        if chosen:
            applied.append(type(module).__name__)
        return original(self, module, chosen)

    monkeypatch.setattr(patches._PatchState, "apply", counting)
    image_of(executor, [("kohya_a", 0.35, 0.45)])  # strengths no other test uses: nothing cached
    assert applied.count("UNetModel") == 1, applied  # STEPS steps with cfg: 2 * STEPS model calls


# ---------------------------------------------------------------------------------- LCM


@pytest.mark.reference
@pytest.mark.parametrize("with_lora", [False, True])
def test_lcm_lora_sampling_equals_diffusers_lcm_scheduler(with_lora, folder, executor):
    """ModelSamplingDiscrete(lcm) + the `lcm` schedule and sampler (with an LCM-style LoRA or without)
    against diffusers' LCMScheduler (boundary condition, timesteps 999/759/499/259, fresh noise)."""
    import diffusers
    from transformers import CLIPTokenizer

    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    steps, cfg = 4, 1.5
    doc = workflow([("kohya_a", 0.8, 0.6)] if with_lora else [])
    model = _link("lora0", "model") if with_lora else _link("ckpt", "model")
    doc["nodes"]["lcm"] = {"type": "ModelSamplingDiscrete", "inputs": {"model": model, "sampling": "lcm"}}
    doc["nodes"]["sigmas"]["inputs"] |= {"model": _link("lcm", "model"), "schedule": "lcm", "steps": steps}
    doc["nodes"]["guider"]["inputs"] |= {"model": _link("lcm", "model"), "cfg": cfg}
    doc["nodes"]["sampler"]["inputs"]["sampler"] = "lcm"
    doc["nodes"]["noise"]["inputs"] |= {"start_noise": "vp", "convention": "diffusers"}
    ours = np.asarray(executor.run(doc, outputs=["decode"]).outputs["decode"]["image"])

    root, modules = folder
    pipe = diffusers.StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=copy.deepcopy(modules["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), pad_token="!"),
        unet=copy.deepcopy(modules["unet"]), scheduler=diffusers.LCMScheduler(**SD),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if with_lora:
        pipe.load_lora_weights(str(root / "loras"), weight_name="kohya_a.safetensors", adapter_name="x")
        pipe.fuse_lora(components=["unet"], lora_scale=0.8, adapter_names=["x"])
        pipe.fuse_lora(components=["text_encoder"], lora_scale=0.6, adapter_names=["x"])
        pipe.unload_lora_weights()
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg,
                        height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images
    assert np.abs(ours - expected).max() <= 1e-3, np.abs(ours - expected).max()


@pytest.fixture(scope="module")
def sd2_folder(folder) -> tuple[Path, dict[str, Any]]:
    """An SD2-shaped variant in the same model folder: linear proj_in / proj_out, 64-wide heads."""
    from diffusers import UNet2DConditionModel

    root, modules = folder
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32,
    ).eval()
    pipe = root / "pipe_sd2"
    if not pipe.exists():
        import shutil

        shutil.copytree(root / "pipe", pipe, ignore=shutil.ignore_patterns("unet"))
        unet.save_pretrained(pipe / "unet")
    save_file(kohya_lora(unet, modules["text_encoder"], seed=12), str(root / "loras" / "kohya_sd2.safetensors"))
    return root, {**modules, "unet": unet}


@pytest.mark.reference
def test_lora_sd2_linear_projections_equal_diffusers(sd2_folder, executor):
    doc = workflow([("kohya_sd2", 0.9, 0.7)])
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "pipe_sd2"
    ours = np.asarray(executor.run(doc, outputs=["decode"]).outputs["decode"]["image"])
    expected = diffusers_image(sd2_folder, "kohya_sd2.safetensors", 0.9, 0.7)
    assert np.abs(ours - expected).max() <= 1e-3, np.abs(ours - expected).max()
