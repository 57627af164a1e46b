"""The text-to-image conditioning options: the jointly trained text transformer and the ablation's routes.

Tiny U-Nets, a random pool with real captions, a few optimizer steps each.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_training import ae_run, tiny_pool, tiny_unet

from ldmgraph.train.conditioning import Conditioning, adapt_unet
from ldmgraph.train.ldm import LDMConfig, train_ldm

CAPTIONS = ["", "a red circle on the left", "a blue square at the top", "a green triangle on the right",
            "a small yellow circle at the bottom and a red square on the left"]
TINY_TEXT = {"dim": 64, "depth": 1, "heads": 1, "dim_head": 64, "ff_mult": 2, "vocab_size": 30522,
             "max_seq_len": 16, "lm_head": False}


def pool() -> dict:
    return {**tiny_pool(), "captions": list(CAPTIONS)}


def config(steps: int = 2, **options) -> LDMConfig:
    cond = Conditioning(**{k: v for k, v in options.items() if k in Conditioning.__dataclass_fields__})
    text = dict(TINY_TEXT, max_seq_len=cond.context_length) if cond.text_encoder == "transformer" else {}
    unet = tiny_unet("ldm")
    if not cond.is_default:
        unet = adapt_unet(unet, cond, text)
    return LDMConfig(kind="ldm", steps=steps, batch_size=3, unet=unet, scale_factor=0.5, checkpoint_every=1,
                     text_transformer=text, caption_dropout=0.0, **options)


def test_joint_training_moves_the_text_transformer_and_its_gradients_reach_the_token_table(tmp_path: Path) -> None:
    from ldmgraph.train.common import load_checkpoint
    from ldmgraph.train.conditioning import build_model, prepare_pool
    from ldmgraph.train.ldm import alphas_cumprod, diffusion_loss, make_batch

    # after two steps: the U-Net's output convolution and its attention blocks' proj_out start at zero,
    # so step 0 moves only the former and step 1 the latter; from step 2 on gradients reach the context
    cfg = config(steps=2, text_encoder="transformer", context_length=16)
    train_ldm(cfg, pool(), tmp_path / "one", progress=False)
    model = build_model(cfg)
    load_checkpoint(tmp_path / "one", model)
    batch = make_batch(cfg, prepare_pool(cfg, pool()), 2)
    assert batch["ids"].shape == (3, 16) and batch["context"] is None
    loss = diffusion_loss(model, batch, alphas_cumprod(), torch.Generator().manual_seed(0))
    loss.backward()
    token_grad = model.text.token_emb.weight.grad
    used = batch["ids"].unique()
    assert token_grad is not None and token_grad[used].abs().sum(1).gt(0).all(), "a caption's tokens got no gradient"
    unused = torch.ones(token_grad.shape[0], dtype=torch.bool)
    unused[used] = False
    assert token_grad[unused].abs().sum() == 0
    for name, p in model.text.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached text.{name}"

    before = {k: v.clone() for k, v in build_model(cfg).text.state_dict().items()}
    train_ldm(config(steps=4, text_encoder="transformer", context_length=16), pool(), tmp_path / "run",
              progress=False)
    trained = {k[len("model.text."):]: v for k, v in load_file(str(tmp_path / "run" / "checkpoint.safetensors")).items()
               if k.startswith("model.text.")}
    assert trained.keys() == before.keys()
    assert not torch.equal(trained["attn_layers.layers.0.1.to_q.weight"], before["attn_layers.layers.0.1.to_q.weight"])


def test_joint_model_exports_loads_bit_identical_and_runs_the_same_through_a_workflow(tmp_path: Path) -> None:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.text_encoders import LDMBertTextEncoder, LDMBertTransformer, bert_tokenizer
    from ldmgraph.plugins import load_registry
    from ldmgraph.train.export import export_bundled

    ae_run(tmp_path / "ae", 1)
    cfg = config(steps=2, text_encoder="transformer", context_length=16)
    train_ldm(cfg, pool(), tmp_path / "joint", progress=False)
    path = export_bundled("ldm", tmp_path / "joint", tmp_path / "ae", 0.5, tmp_path / "models" / "joint.safetensors")

    ema = load_file(str(tmp_path / "joint" / "checkpoint.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ldmgraph"])
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["text_encoder"] == "ldm-bert" and meta["conditioning"]["text_encoder"] == "transformer"
    text_keys = [k for k in saved if k.startswith("cond_stage_model.transformer.")]
    assert text_keys and all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
                             for k in saved)
    for key in text_keys:  # the EMA text weights, bit for bit
        assert torch.equal(saved[key], ema["ema.text." + key.removeprefix("cond_stage_model.transformer.")]), key

    ckpt = load_checkpoint(path)
    encoder = ckpt.text_encoder
    assert encoder.kind == "ldm-bert" and encoder.context_dim == 64 and encoder.max_length == 16
    for name, value in encoder.transformer.state_dict().items():
        assert torch.equal(value, ema["ema.text." + name]), name

    # the loader's encoder gives what the trained module computes from the training tokens
    reference = LDMBertTransformer(**TINY_TEXT)
    reference.load_state_dict({k[len("ema.text."):]: v for k, v in ema.items() if k.startswith("ema.text.")})
    direct = LDMBertTextEncoder(reference, bert_tokenizer(), max_length=16).encode([CAPTIONS[1]]).context
    assert torch.equal(encoder.encode([CAPTIONS[1]]).context, direct)

    doc = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "txt2img.json").read_text())
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "joint.safetensors"
    env = Environment(input_dir=tmp_path, output_dir=tmp_path / "out", model_dirs=(tmp_path / "models",))
    images = []
    for _ in range(2):  # two executors: a fresh load each time
        result = Executor(load_registry(), env).run(copy.deepcopy(doc), overrides={"steps": 2}, outputs=["decode"])
        images.append(result.outputs["decode"]["image"])
    assert images[0].shape == (1, 64, 64, 3)
    assert (images[0] == images[1]).all()


@pytest.mark.parametrize("options", [
    {"route": "vector", "cross_attention": "none"},
    {"route": "both"},
    {"cross_attention": "lowest"},
    {"text_encoder": "transformer", "route": "vector", "cross_attention": "none", "context_length": 8},
])
def test_each_ablation_option_builds_and_trains(tmp_path: Path, options: dict) -> None:
    from ldmgraph.models.attention import SpatialTransformer
    from ldmgraph.train.conditioning import build_model

    cfg = config(**options)
    model = build_model(cfg)
    unet = getattr(model, "unet", model)
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    if options.get("route") == "vector":
        assert unet.context_dim is None and not transformers, "the vector-only U-Net has cross-attention layers"
        assert unet.num_classes == "sequential"
    elif options.get("cross_attention") == "lowest":
        assert len(transformers) == 1 and transformers[0] is unet.middle_block[1]
    else:
        assert len(transformers) == len([m for m in build_model(config()).modules() if isinstance(m, SpatialTransformer)])
    train_ldm(cfg, pool(), tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2
    for key, value in options.items():
        assert state["config"][key] == value


def test_impossible_combinations_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="--cross-attention none"):
        LDMConfig(kind="ldm", route="vector")
    with pytest.raises(ValueError, match="--text-encoder transformer"):
        LDMConfig(kind="ldm", context_length=16)
    with pytest.raises(ValueError, match="ldmgraph train ldm"):
        LDMConfig(kind="superres", text_encoder="transformer")


def test_vector_route_model_takes_the_prompt_through_a_saved_workflow(tmp_path: Path) -> None:
    """A model trained with the vector route gets TextEncode's pooled vector as its `y`: the saved
    txt2img workflow runs on it, and the prompt changes the image exactly as the library's sampler
    given that vector by hand."""
    from ldmgraph.diffusion import CondEntry, Latent, sample
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.plugins import load_registry
    from ldmgraph.train.export import export_bundled

    ae_run(tmp_path / "ae", 1)
    options = {"text_encoder": "transformer", "route": "vector", "cross_attention": "none", "context_length": 8}
    train_ldm(config(steps=2, **options), pool(), tmp_path / "vector", progress=False)
    path = export_bundled("ldm", tmp_path / "vector", tmp_path / "ae", 0.5, tmp_path / "models" / "vector.safetensors")
    # two training steps barely move the zero-initialised output layers: give the U-Net random
    # weights of the same structure so that its `y` visibly matters
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    generator = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if key.startswith("model.diffusion_model.") and value.is_floating_point():
            tensors[key] = 0.2 * torch.randn(value.shape, generator=generator)
    save_file(tensors, str(path), metadata=metadata)

    doc = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "txt2img.json").read_text())
    env = Environment(input_dir=tmp_path, output_dir=tmp_path / "out", model_dirs=(tmp_path / "models",))
    executor = Executor(load_registry(), env)
    run = {"ckpt_name": "vector.safetensors", "steps": 3, "sampler": "euler", "schedule": "karras", "cfg": 3.0}
    results = [executor.run(copy.deepcopy(doc), overrides={**run, "prompt": p}, outputs=["latent", "decode"])
               for p in CAPTIONS[1:3]]
    first, second = (torch.as_tensor(r.outputs["decode"]["image"]) for r in results)
    assert (first - second).abs().max() > 1e-4, "the prompt did not reach the vector-route U-Net"

    ckpt = load_checkpoint(tmp_path / "models" / "vector.safetensors")
    seed = doc["nodes"]["sampler"]["inputs"]["seed"]
    negative = doc["nodes"]["negative"]["inputs"]["text"]
    pos, neg = (ckpt.text_encoder.encode([t]) for t in (CAPTIONS[1], negative))
    latent = Latent(samples=results[0].outputs["latent"]["latent"].samples)
    out = sample(ckpt.unet, latent, [CondEntry(context=None, vector=pos.pooled)],
                 [CondEntry(context=None, vector=neg.pooled)], seed=seed, steps=3, cfg=3.0, sampler="euler",
                 schedule="karras")
    by_hand = ckpt.vae.decode(out.samples)
    assert torch.allclose(torch.as_tensor(by_hand), first, atol=1e-5)
