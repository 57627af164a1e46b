"""Each release of the paper (CompVis/latent-diffusion) built from its real config on the meta device
has exactly the keys and shapes of the release, as listed in `data/paper_releases.json.gz`.

The manifest holds, per release, the config (as in the release's `config.yaml`, without training-only
sections) and every parameter name and shape, read off the original repository's modules
(`openaimodel.UNetModel`, `model.Encoder`/`Decoder`, x-transformers' `TransformerWrapper`, the
encoders) built from that config. Schedule buffers and EMA copies are not part of it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ldmgraph.models.build import modules_from_config
from ldmgraph.models.ldm_config import read_ldm_config

MANIFEST: dict[str, Any] = json.loads(
    gzip.decompress((Path(__file__).parent / "data" / "paper_releases.json.gz").read_bytes())
)


def built_keys(config: dict[str, Any]) -> dict[str, list[int]]:
    cfg = read_ldm_config(yaml.safe_dump(config), "config.yaml")
    with torch.device("meta"):
        modules = modules_from_config(cfg)
    if cfg.unet is None:  # a first stage on its own: its keys have no prefix
        return {k: list(v.shape) for k, v in modules["first_stage_model."].state_dict().items()}
    return {prefix + k: list(v.shape) for prefix, m in modules.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("release", sorted(MANIFEST))
def test_release_built_from_its_config_has_every_key_and_shape(release: str) -> None:
    expected = MANIFEST[release]["keys"]
    got = built_keys(MANIFEST[release]["config"])
    assert sorted(set(expected) - set(got)) == [], "missing"
    assert sorted(set(got) - set(expected)) == [], "unexpected"
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert wrong == {}


def test_manifest_covers_every_release_family() -> None:
    names = set(MANIFEST)
    assert {"txt2img-f8-large", "cin256-v2", "bsr_sr", "inpainting_big", "celeba256", "ffhq256",
            "lsun_churches256", "lsun_beds256", "semantic_synthesis256", "layout2img-openimages256"} <= names
    assert {"kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f16"} <= names
    sizes = {n: len(m["keys"]) for n, m in MANIFEST.items()}
    assert sizes["txt2img-f8-large"] > 1000 and sizes["vq-f4-noattn"] < sizes["vq-f4"]


def _heads(module: torch.nn.Module) -> list[int]:
    return [int(getattr(m, "num_heads", 0) or getattr(m, "heads", 0)) for m in module.modules()
            if type(m).__name__ in ("AttentionBlock", "CrossAttention")]


@pytest.mark.parametrize("release", sorted(r for r in MANIFEST if "unet_config" in MANIFEST[r]["config"]["model"]["params"]))
def test_release_is_detected_from_its_key_shapes_alone(release: str) -> None:
    """No config: the U-Net (heads included), first stage, conditioning and schedule come from the weights."""
    from ldmgraph.models.files import StateDict
    from ldmgraph.models.paper import detect_paper
    from ldmgraph.models.unet import UNetModel

    entry = MANIFEST[release]
    state = StateDict(Path(f"/nowhere/{release}.safetensors"),
                      {k: torch.empty(v, device="meta") for k, v in entry["keys"].items()})
    info = detect_paper(state)
    assert info is not None
    cfg = read_ldm_config(yaml.safe_dump(entry["config"]), "config.yaml")
    with torch.device("meta"):
        detected, real = UNetModel(**info.unet), UNetModel(**cfg.unet)  # type: ignore[arg-type]
    assert {k: v.shape for k, v in detected.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert _heads(detected) == _heads(real)
    assert info.vae is not None and ("n_embed" in info.vae) == ("n_embed" in cfg.first_stage)
    params = entry["config"]["model"]["params"]
    assert info.schedule["linear_start"] == params["linear_start"]
    assert info.schedule["linear_end"] == params["linear_end"]
    assert info.scale_factor == params.get("scale_factor", 1.0)
    expected_concat = {"bsr_sr": "lowres-image", "inpainting_big": "ldm-inpaint"}.get(release)
    if release.startswith("semantic"):
        expected_concat = "segmentation"
    assert info.concat_kind == expected_concat
    assert info.metadata["cond_stage"] == (cfg.cond_stage["kind"] if cfg.cond_stage else None) or (
        release == "bsr_sr" and info.metadata["cond_stage"] == "identity")


VQ = {"embed_dim": 3, "n_embed": 16, "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 64,
      "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}


def _paper_file(tmp_path: Path, unet: dict[str, Any]) -> Path:
    """A U-Net of no released shape with a VQ first stage (so the paper's loader reads it)."""
    from ldmgraph.models.single_file import write_state_dict
    from ldmgraph.models.unet import UNetModel
    from ldmgraph.models.vq import VQModel

    torch.manual_seed(0)
    tensors = {f"model.diffusion_model.{k}": v for k, v in UNetModel(**unet).state_dict().items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in VQModel(**VQ).state_dict().items()})
    path = tmp_path / "model.safetensors"
    return write_state_dict(path, tensors)


def test_self_attention_unet_of_unknown_shape_asks_for_its_config(tmp_path: Path) -> None:
    """Heads are not in the weights: a self-attention U-Net no release has is refused with the fix."""
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.files import ModelError

    unet = {"in_channels": 6, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16}
    path = _paper_file(tmp_path, unet)
    with pytest.raises(ModelError, match="config"):
        load_checkpoint(path)
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "cond_stage_config": {"target": "torch.nn.Identity"},
        "unet_config": {"target": "x.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": VQ}}}}
    (tmp_path / "given.yaml").write_text(yaml.safe_dump(config))
    ckpt = load_checkpoint(path, config=tmp_path / "given.yaml")  # the loader's config input
    assert ckpt.info.architecture == "ldm-paper:ldm" and ckpt.info.concat_kind == "lowres-image"
    attention = [m for m in ckpt.unet.diffusion_model.modules() if type(m).__name__ == "AttentionBlock"]
    assert attention and all(m.num_heads == m.qkv.in_channels // 16 for m in attention)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))  # beside the file, as the original repo ships it
    assert load_checkpoint(path).info.schedule["linear_end"] == 0.0155


def test_run_refuses_a_pickled_checkpoint_and_names_convert(tmp_path: Path, capsys: Any) -> None:
    import json as _json

    from ldmgraph.cli import main

    models = tmp_path / "models"
    models.mkdir()
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, models / "old.ckpt")
    workflow = {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "old.ckpt"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": {"node": "ckpt", "output": "vae"},
                                                   "latent": {"node": "l", "output": "latent"}}},
        "l": {"type": "EmptyLatent", "inputs": {}},
        "save": {"type": "SaveImage", "inputs": {"images": {"node": "decode", "output": "image"}}}}}
    (tmp_path / "w.json").write_text(_json.dumps(workflow))
    code = main(["run", str(tmp_path / "w.json"), "--models-dir", str(models), "--output-dir", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "ldmgraph convert" in err and "old.converted.safetensors" in err


@pytest.mark.parametrize("release", sorted(r for r in MANIFEST if "unet_config" not in MANIFEST[r]["config"]["model"]["params"]))
def test_first_stage_is_detected_from_its_key_shapes_alone(release: str) -> None:
    """KL f4..f32 and VQ f4 (with and without attention), f8, f16: the detected config builds every key."""
    from ldmgraph.models.detection import detect_vae_config
    from ldmgraph.models.vq import autoencoder_class

    keys = MANIFEST[release]["keys"]
    config = detect_vae_config({k: torch.empty(v, device="meta") for k, v in keys.items()}, release)
    with torch.device("meta"):
        model = autoencoder_class(config)(**config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    assert ("n_embed" in config) == release.startswith("vq")
