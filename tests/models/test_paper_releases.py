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

from ldmgraph.models.ldm_config import read_ldm_config
from ldmgraph.models.paper import modules_from_config

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
