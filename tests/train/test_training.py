"""Training is reproducible and resumable, and exports load through the library's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldmgraph.train.autoencoder import AEConfig, train_autoencoder
from ldmgraph.train.ldm import LDMConfig, default_unet, train_ldm

TINY_VAE = {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 8,
    "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "norm_groups": 4,
}


def tiny_unet(kind: str) -> dict:
    return {**default_unet(kind), "model_channels": 16, "num_head_channels": 16, "norm_groups": 8}


def tiny_pool(n: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "mean": torch.randn(n, 4, 16, 16, generator=g), "std": torch.rand(n, 4, 16, 16, generator=g) * 0.1,
        "lowres": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "inpaint_mask": torch.ones(n, 1, 16, 16),
        "inpaint_masked": torch.randn(n, 4, 16, 16, generator=g), "contexts": torch.randn(5, 32, 384, generator=g),
        "inpaint_mean": torch.randn(n, 4, 16, 16, generator=g), "inpaint_std": torch.rand(n, 4, 16, 16, generator=g) * 0.1,
        "caption_index": torch.randint(0, 5, (n,), generator=g),
        "inpaint_caption_index": torch.randint(0, 5, (n,), generator=g),
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "checkpoint.safetensors")).items() if k.startswith("model.")}


def ae_run(folder: Path, steps: int, seed: int = 0, resume: bool = False) -> dict[str, torch.Tensor]:
    cfg = AEConfig(steps=steps, batch_size=4, seed=seed, crop=32, ddconfig=dict(TINY_VAE), grid_every=10**6)
    train_autoencoder(cfg, folder, resume=resume, progress=False)
    return weights(folder)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_autoencoder_same_seed_same_weights_and_resume_is_exact(tmp_path: Path) -> None:
    straight = ae_run(tmp_path / "a", 4)
    assert_same(straight, ae_run(tmp_path / "b", 4))
    ae_run(tmp_path / "c", 2)
    assert_same(straight, ae_run(tmp_path / "c", 4, resume=True))
    other = ae_run(tmp_path / "d", 4, seed=1)
    assert any(not torch.equal(straight[k], other[k]) for k in straight)


@pytest.mark.parametrize("kind", ["ldm", "superres", "inpaint"])
def test_diffusion_same_seed_same_weights(tmp_path: Path, kind: str) -> None:
    def run(folder: Path, steps: int, resume: bool = False) -> dict[str, torch.Tensor]:
        cfg = LDMConfig(kind=kind, steps=steps, batch_size=4, unet=tiny_unet(kind), scale_factor=0.5)
        train_ldm(cfg, tiny_pool(), folder, resume=resume, progress=False)
        return weights(folder)

    straight = run(tmp_path / "a", 3)
    assert_same(straight, run(tmp_path / "b", 3))
    run(tmp_path / "c", 1)
    assert_same(straight, run(tmp_path / "c", 3, resume=True))


def test_training_seconds_add_up_over_resumed_segments(tmp_path: Path) -> None:
    """The exported metadata's `seconds` is the run's whole training time, not its last segment's."""
    ae_run(tmp_path / "ae", 2)
    state_file = tmp_path / "ae" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "seconds": 1000.0}))  # as if the first segment took 1000 s
    ae_run(tmp_path / "ae", 4, resume=True)
    assert 1000.0 < json.loads(state_file.read_text())["seconds"] < 1100.0


def test_export_is_a_bundled_checkpoint_the_loader_runs(tmp_path: Path) -> None:
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.train.export import export_bundled
    from ldmgraph.train.sampling import superres

    ae_run(tmp_path / "ae", 1)
    cfg = LDMConfig(kind="superres", steps=1, batch_size=2, unet=tiny_unet("superres"), scale_factor=0.5)
    train_ldm(cfg, tiny_pool(), tmp_path / "sr", progress=False)
    path = export_bundled("superres", tmp_path / "sr", tmp_path / "ae", 0.5, tmp_path / "out" / "sr.safetensors")

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ldmgraph"])
        keys = list(f.keys())
    assert meta["format"] == "ldmgraph-bundled/1" and meta["kind"] == "superres"
    assert meta["concat"] == "lowres-image" and meta["text_encoder"] is None
    assert meta["schedule"] == {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012,
                                "timesteps": 1000}
    assert meta["training"]["steps"] == 1 and meta["scale_factor"] == 0.5
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)

    ckpt = load_checkpoint(path, text_encoder=False)
    assert ckpt.info.architecture == "bundled-superres" and ckpt.vae.scale_factor == 0.5
    images = superres(ckpt, torch.zeros(2, 3, 16, 16), steps=2)
    assert images.shape == (2, 64, 64, 3) and 0 <= images.min() and images.max() <= 1


def jitter_unet(tensors: dict[str, torch.Tensor], seed: int = 3, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A bundled file's tensors with noise on the U-Net's: a few training steps leave a fresh U-Net's
    cross-attention at zero, and a test that the text reaches the image needs it to be otherwise."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if k.startswith("model.diffusion_model.") else v)
            for k, v in tensors.items()}


def saved_txt2img_images(tmp_path: Path, models: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The image the saved text-to-image workflow draws (2 steps) with each of these files in ``models``."""
    import copy

    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    doc = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "txt2img.json").read_text())
    env = Environment(input_dir=tmp_path, output_dir=tmp_path / "out", model_dirs=(models,))
    images = {}
    for name in names:
        run = copy.deepcopy(doc)
        run["nodes"]["ckpt"]["inputs"]["ckpt_name"] = f"{name}.safetensors"
        result = Executor(load_registry(), env).run(run, overrides={"steps": 2}, outputs=["decode"])
        images[name] = torch.as_tensor(result.outputs["decode"]["image"])
    return images
