"""The U-Net's context refiner: a small transformer that mixes the caption's tokens before the
cross-attention reads them. It must start as "no change" when added to a trained U-Net, learn,
travel through export and the loader bit for bit, and be what a saved workflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_training import ae_run, jitter_unet, saved_txt2img_images, tiny_pool, tiny_unet

from ldmgraph.models.unet import UNetModel
from ldmgraph.train.ldm import LDMConfig, build_unet, initial_weights, train_ldm

REFINER = {"width": 32, "depth": 1, "heads": 2, "max_tokens": 32}
ROOT = Path(__file__).resolve().parents[2]


def config(steps: int, **extra) -> LDMConfig:
    return LDMConfig(kind="ldm", steps=steps, batch_size=3, unet=tiny_unet("ldm"), scale_factor=0.5,
                     checkpoint_every=1, caption_dropout=0.0, context_refiner=dict(REFINER), **extra)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([20, 700]), torch.randn(2, 32, 384, generator=g)


def test_the_refiner_mixes_tokens_and_a_new_one_changes_nothing() -> None:
    plain = UNetModel(**tiny_unet("ldm"))
    with torch.no_grad():  # a fresh U-Net's zero output layers would hide any difference
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    refined = UNetModel(**tiny_unet("ldm"), context_refiner=dict(REFINER))
    refined.load_state_dict({**refined.state_dict(), **plain.state_dict()})
    x, t, ctx = inputs()
    with torch.no_grad():
        assert plain(x, t, ctx).abs().amax() > 0
        assert torch.equal(plain(x, t, ctx), refined(x, t, ctx))  # proj_out starts at zero
        torch.nn.init.normal_(refined.context_refiner.proj_out.weight, std=0.1)
        out = refined.context_refiner(ctx)
        moved = ctx.clone()
        moved[:, 5] += 1.0  # change one token: the others change too (the tokens are mixed)
        changed = (refined.context_refiner(moved) - out).abs().amax(-1)
    assert changed[:, 0].gt(1e-4).all() and changed[:, 20].gt(1e-4).all()
    assert not torch.equal(plain(x, t, ctx), refined(x, t, ctx))
    with pytest.raises(ValueError, match="at most 32"):
        refined.context_refiner(torch.zeros(1, 33, 384))
    with pytest.raises(ValueError, match="needs a context_dim"):
        UNetModel(**{**tiny_unet("superres")}, context_refiner=dict(REFINER))


def test_a_refiner_added_to_a_trained_unet_starts_as_that_unet(tmp_path: Path) -> None:
    base = tmp_path / "base"
    train_ldm(LDMConfig(kind="ldm", steps=2, batch_size=3, unet=tiny_unet("ldm"), scale_factor=0.5,
                        checkpoint_every=1), tiny_pool(), base, progress=False)
    source = UNetModel(**tiny_unet("ldm"))
    source.load_state_dict({k[4:]: v for k, v in load_file(str(base / "checkpoint.safetensors")).items()
                            if k.startswith("ema.")})
    cfg = config(1, init_from=str(base))
    assert cfg.unet["context_refiner"] == REFINER
    model = build_unet(cfg)
    assert initial_weights(model, base) == {"copied": len(source.state_dict()), "widened": 0}
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), source(x, t, ctx))


def test_training_moves_the_refiner(tmp_path: Path) -> None:
    pool = tiny_pool()
    train_ldm(config(8), pool, tmp_path / "run", progress=False)
    trained = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    fresh = build_unet(config(8)).state_dict()
    # a fresh U-Net passes no gradient to its context at first (its output layers start at zero);
    # within a few steps the refiner's output layer and then the blocks behind it move
    assert trained["model.context_refiner.proj_out.weight"].abs().sum() > 0
    assert not torch.equal(trained["model.context_refiner.blocks.0.attn.to_q.weight"],
                           fresh["context_refiner.blocks.0.attn.to_q.weight"])


def test_a_refined_model_exports_loads_bit_identical_and_a_workflow_runs_its_refiner(tmp_path: Path) -> None:
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.train.export import export_bundled

    ae_run(tmp_path / "ae", 1)
    train_ldm(config(3), tiny_pool(), tmp_path / "run", progress=False)
    models = tmp_path / "models"
    path = export_bundled("ldm", tmp_path / "run", tmp_path / "ae", 0.5, models / "refined.safetensors")
    ema = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ldmgraph"])
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["unet"]["context_refiner"] == REFINER
    refiner_keys = [k for k in saved if k.startswith("model.diffusion_model.context_refiner.")]
    assert refiner_keys
    for key in refiner_keys:
        assert torch.equal(saved[key], ema["ema." + key.removeprefix("model.diffusion_model.")]), key

    unet = load_checkpoint(path, text_encoder=False).unet.diffusion_model
    assert unet.context_refiner is not None
    reference = UNetModel(**meta["unet"])
    reference.load_state_dict({k[4:]: v for k, v in ema.items() if k.startswith("ema.")})
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), reference(x, t, ctx))

    # the saved text-to-image workflow runs the refiner: the same file with the refiner's output at zero draws
    # another image. A few steps leave a fresh U-Net's cross-attention at zero, so both files get random U-Net
    # weights (the text reaches the image through them).
    noisy = jitter_unet(saved)
    save_file(noisy, str(models / "refined.safetensors"), metadata={"ldmgraph": json.dumps(meta)})
    save_file({k: (torch.zeros_like(v) if k.endswith("context_refiner.proj_out.weight") else v)
               for k, v in noisy.items()}, str(models / "silenced.safetensors"), metadata={"ldmgraph": json.dumps(meta)})
    images = saved_txt2img_images(tmp_path, models, ["refined", "silenced"])
    assert images["refined"].shape == (1, 64, 64, 3)
    assert not torch.equal(images["refined"], images["silenced"])


def test_a_bad_refiner_in_metadata_is_named(tmp_path: Path) -> None:
    from ldmgraph.models.errors import BadMetadataError
    from ldmgraph.models.header import inspect_model

    meta = {"format": "ldmgraph-bundled/1", "kind": "txt2img", "unet": {**tiny_unet("ldm"), "context_refiner": {"width": "wide"}}}
    path = tmp_path / "bad.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(path), metadata={"ldmgraph": json.dumps(meta)})
    with pytest.raises(BadMetadataError, match="context_refiner"):
        inspect_model(path)


def test_controlnet_and_diffusers_conversion_see_the_refiner() -> None:
    from ldmgraph.models.controlnet import ControlNet
    from ldmgraph.models.diffusers_keys import unet_config_to_diffusers

    unet_config = {**tiny_unet("ldm"), "context_refiner": dict(REFINER)}
    control = ControlNet(unet_config, (8, 16, 16), 3)
    assert any(k.startswith("context_refiner.") for k in control.state_dict())
    with pytest.raises(ValueError, match="context refiner"):
        unet_config_to_diffusers(unet_config)


def test_cli_refuses_a_negative_refiner_depth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ldmgraph.cli import main

    code = main(["train", "ldm", "--context-refiner", "-1", "--ae", str(tmp_path), "--pool", str(tmp_path / "pool"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "--context-refiner -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "pool").exists()


def test_a_fine_tuned_export_keeps_the_history_of_the_file_it_started_from(tmp_path: Path) -> None:
    from ldmgraph.train.export import export_bundled

    ae_run(tmp_path / "ae", 1)
    train_ldm(LDMConfig(kind="ldm", steps=2, batch_size=3, unet=tiny_unet("ldm"), scale_factor=0.5,
                        checkpoint_every=1), tiny_pool(), tmp_path / "base", progress=False)
    base = export_bundled("ldm", tmp_path / "base", tmp_path / "ae", 0.5, tmp_path / "base.safetensors")
    train_ldm(config(1, init_from=str(base), lr=5e-4), tiny_pool(), tmp_path / "tuned", progress=False)
    tuned = export_bundled("ldm", tmp_path / "tuned", tmp_path / "ae", 0.5, tmp_path / "tuned.safetensors")
    meta = {}
    for name, path in (("base", base), ("tuned", tuned)):
        with safe_open(str(path), "pt") as f:
            meta[name] = json.loads(f.metadata()["ldmgraph"])["training"]
    assert "fine_tuned_from" not in meta["base"]
    assert meta["tuned"]["steps"] == 1 and meta["tuned"]["lr"] == 5e-4
    assert meta["tuned"]["fine_tuned_from"] == {"from": "base.safetensors", "training": meta["base"]}


def test_a_fine_tune_from_a_run_folder_records_the_step_it_started_from(tmp_path: Path) -> None:
    from ldmgraph.train.export import export_bundled

    ae_run(tmp_path / "ae", 1)
    base = LDMConfig(kind="ldm", steps=2, batch_size=3, unet=tiny_unet("ldm"), scale_factor=0.5, checkpoint_every=1)
    train_ldm(base, tiny_pool(), tmp_path / "base", progress=False)
    train_ldm(config(1, init_from=str(tmp_path / "base")), tiny_pool(), tmp_path / "tuned", progress=False)
    base.steps = 4  # the source run goes on after the fine-tune started from it
    train_ldm(base, tiny_pool(), tmp_path / "base", resume=True, progress=False)
    tuned = export_bundled("ldm", tmp_path / "tuned", tmp_path / "ae", 0.5, tmp_path / "tuned.safetensors")
    with safe_open(str(tuned), "pt") as f:
        record = json.loads(f.metadata()["ldmgraph"])["training"]["fine_tuned_from"]
    assert record == {"from": "base", "steps": 2}
