"""The paper-release workflows (workflows/paper/): each validates, and runs end to end on a random-weight
file with the structure of its release at reduced width (written in the original key layout, with the
release's config reduced the same way beside it, as the original repository's `models/ldm/<name>/`)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldmgraph.cli import main

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "workflows" / "paper"
MANIFEST = json.loads(gzip.decompress((REPO / "tests" / "models" / "data" / "paper_releases.json.gz").read_bytes()))

# workflow -> (release in the manifest, folder name the workflow loads from)
WORKFLOW_RELEASES = {
    "txt2img": ("txt2img-f8-large", "text2img-large"),
    "class_conditional": ("cin256-v2", "cin256-v2"),
    "unconditional": ("celeba256", "celeba256"),
    "ldsr": ("bsr_sr", "bsr_sr"),
    "inpainting": ("inpainting_big", "inpainting_big"),
    "semantic": ("semantic_synthesis256", "semantic_synthesis256"),
    "layout": ("layout2img-openimages256", "layout2img-openimages256"),
}


def reduced_config(release: str) -> dict[str, Any]:
    """The release's config with every width shrunk (levels, attention places, channel counts kept)."""
    config = copy.deepcopy(MANIFEST[release]["config"])
    params = config["model"]["params"]
    unet = params["unet_config"]["params"]
    unet.update(model_channels=32, num_res_blocks=1)
    if "num_head_channels" in unet:
        unet["num_head_channels"] = 16
    if unet.get("context_dim"):
        unet["context_dim"] = 32
    first = params["first_stage_config"]["params"]
    first["ddconfig"]["ch"] = 32
    first["ddconfig"]["num_res_blocks"] = 1
    if "n_embed" in first:
        first["n_embed"] = 64
    cond = params.get("cond_stage_config")
    if isinstance(cond, dict) and "params" in cond:
        if cond["target"].endswith("BERTEmbedder"):
            cond["params"].update(n_embed=32, n_layer=2)
        elif cond["target"].endswith("ClassEmbedder"):
            cond["params"]["embed_dim"] = 32
    return config


def write_release(folder: Path, release: str, seed: int = 0) -> Path:
    """A random-weight safetensors file of the release's structure (reduced width) plus its config.yaml."""
    from ldmgraph.models.build import modules_from_config
    from ldmgraph.models.ldm_config import read_ldm_config
    from ldmgraph.models.single_file import write_state_dict

    config = reduced_config(release)
    text = yaml.safe_dump(config)
    cfg = read_ldm_config(text, "config.yaml")
    torch.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules_from_config(cfg).items():
        with torch.no_grad():
            for p in module.parameters():
                if not p.any():  # zero-initialised output layers: give them weights so every path matters
                    p.normal_(0.0, 0.02)
        tensors.update({prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    s = cfg.schedule
    betas = torch.linspace(s["linear_start"] ** 0.5, s["linear_end"] ** 0.5, s["timesteps"], dtype=torch.float64) ** 2
    tensors["betas"] = betas.float()
    folder.mkdir(parents=True, exist_ok=True)
    write_state_dict(folder / "model.safetensors", tensors)
    (folder / "config.yaml").write_text(text)
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def paper_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper-models")
    for release, folder in WORKFLOW_RELEASES.values():
        write_release(root / "ldm" / folder, release)
    return root


def small_inputs(folder: Path) -> Path:
    """Inputs at the reduced test size: 32x32 images (LDSR: 12x12 -> 48x48)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "photo.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(folder / "photo_mask.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / "lowres.png")
    labels = np.zeros((32, 32, 3), np.uint8)
    labels[:16, :, 0] = 156
    labels[16:, :, 0] = 125
    Image.fromarray(labels).save(folder / "segmentation.png")
    return folder


OVERRIDES: dict[str, dict[str, Any]] = {
    "txt2img": {"steps": 2, "width": 64, "height": 64, "prompt": "a red apple"},  # f8 and 3 downsamplings
    "class_conditional": {"steps": 2, "width": 32, "height": 32, "class_name": "tench"},
    "unconditional": {"steps": 2, "width": 32, "height": 32},
    "ldsr": {"steps": 2, "tile": 8, "overlap": 4},
    "inpainting": {"steps": 2},
    "semantic": {"steps": 2},
    "layout": {"steps": 2, "width": 32, "height": 32},
}
SIZES = {"ldsr": (48, 48), "txt2img": (64, 64)}


@pytest.mark.parametrize("name", sorted(WORKFLOW_RELEASES))
def test_paper_workflow_validates(name: str, paper_models: Path, capsys: Any) -> None:
    code = main(["validate", str(PAPER / f"{name}.json"), "--models-dir", str(paper_models)])
    assert code == 0, capsys.readouterr()


@pytest.mark.parametrize("name", sorted(WORKFLOW_RELEASES))
def test_paper_workflow_runs_on_a_release_shaped_file(name: str, paper_models: Path, tmp_path: Path) -> None:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    env = Environment(input_dir=small_inputs(tmp_path / "in"), output_dir=tmp_path / "out", model_dirs=(paper_models,))
    result = Executor(load_registry(), env).run(json.loads((PAPER / f"{name}.json").read_text()),
                                                overrides={**OVERRIDES[name], "seed": 3})
    assert len(result.files) == 1
    with Image.open(result.files[0]) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels.shape[1], pixels.shape[0]) == SIZES.get(name, (32, 32))
    assert pixels.std() > 1.0, "a flat image"


def test_layout_tokens_follow_the_bounding_box_builder() -> None:
    """Closed form: 90 x 90 coordinate grid (int(sqrt(8192))), token = row * 90 + column, none = 8191,
    the crop (whole image) last; 30 objects x 3 + 2 = the released model's 92 tokens."""
    from ldmgraph.models.layouts import layout_tokens

    tokens = layout_tokens([(5, 0.1, 0.2, 0.3, 0.4), (600, 0.0, 0.0, 1.0, 1.0)])
    assert len(tokens) == 92
    assert tokens[:6] == [5, round(0.2 * 89) * 90 + round(0.1 * 89), round(0.6 * 89) * 90 + round(0.4 * 89),
                          600, 0, 89 * 90 + 89]
    assert tokens[6:90] == [8191] * 84 and tokens[90:] == [0, 8099]
    with pytest.raises(ValueError, match="not inside"):
        layout_tokens([(1, 0.8, 0.0, 0.5, 0.1)])
