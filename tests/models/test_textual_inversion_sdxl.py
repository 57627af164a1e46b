"""SDXL: prompt weights and a `clip_l` / `clip_g` textual-inversion file through TextEncode, against
transformers' two text models (and diffusers' `load_textual_inversion` into each) on the same weights.

SDXL's context is ViT-L's and bigG's penultimate hidden states (no final norm), concatenated along
features; each encoder applies ComfyUI's weight rule to its own states, and an SDXL embedding file
gives ViT-L its `clip_l` rows and bigG its `clip_g` rows.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import write

from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import load_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdxl_models as sm  # noqa: E402

pytestmark = pytest.mark.reference
TOL = 1e-5


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sdxl")
    modules = sm.build(root / "diffusers")
    sm.write_single_file(root / "tiny_sdxl.safetensors", modules["base"], refiner=False)
    g = torch.Generator().manual_seed(21)
    pair = {"clip_l": torch.randn(2, 64, generator=g) * 0.05, "clip_g": torch.randn(2, 64, generator=g) * 0.05}
    (root / "embeddings").mkdir()
    write(root / "embeddings" / "pair.safetensors", pair)
    return root, {**modules["base"], **pair}


def encode(root: Path, text: str) -> Any:
    doc = {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny_sdxl.safetensors"}},
        "positive": {"type": "TextEncode", "inputs": {
            "text_encoder": {"node": "ckpt", "output": "text_encoder"}, "text": text}},
    }}
    env = Environment(input_dir=root, output_dir=root / "out", model_dirs=(root,))
    return Executor(load_registry(), env).run(doc, outputs=["positive"]).outputs["positive"]["conditioning"][0]


@torch.no_grad()
def penultimate(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return model(input_ids=ids, output_hidden_states=True).hidden_states[-2]


def weighted(z: torch.Tensor, empty: torch.Tensor, positions: range, w: float) -> torch.Tensor:
    out = z.clone()
    out[:, positions] = (z[:, positions] - empty[:, positions]) * w + empty[:, positions]
    return out


def test_prompt_weight_sdxl_each_encoder_applies_comfyui_rule(sdxl):
    root, m = sdxl
    tok_l, tok_g = sm.tokenizers()
    ours = encode(root, "a (red:1.3) circle").context
    red = range(2, 2 + len(tok_l("red", add_special_tokens=False).input_ids))  # after BOS and "a"
    parts = []
    for model, tok in ((m["text_encoder"], tok_l), (m["text_encoder_2"], tok_g)):
        z, empty = penultimate(model, tok, "a red circle"), penultimate(model, tok, "")
        parts.append(weighted(z, empty, red, 1.3))
    expected = torch.cat(parts, dim=-1)
    assert ours.shape == expected.shape == (1, 77, 128)
    assert (ours - expected).abs().max().item() < TOL


def test_textual_inversion_sdxl_file_gives_each_encoder_its_part(sdxl):
    from diffusers.loaders import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict[str, Any] = {}

    root, m = sdxl
    ours = encode(root, "a photo of embedding:pair").context
    parts = []
    for model, tok, key in ((m["text_encoder"], sm.tokenizers()[0], "clip_l"), (m["text_encoder_2"], sm.tokenizers()[1], "clip_g")):
        model = copy.deepcopy(model)
        loader = Loader()
        loader.load_textual_inversion({"<pair>": m[key]}, tokenizer=tok, text_encoder=model)
        parts.append(penultimate(model, tok, loader.maybe_convert_prompt("a photo of <pair>", tok)))
    expected = torch.cat(parts, dim=-1)
    assert (ours - expected).abs().max().item() < TOL
    # the vectors replaced the token embeddings only for this prompt: the plain encoder is unchanged
    plain = encode(root, "a photo of").context
    assert (plain - torch.cat([penultimate(mod, tok, "a photo of") for mod, tok in
                               ((m["text_encoder"], sm.tokenizers()[0]), (m["text_encoder_2"], sm.tokenizers()[1]))],
                              dim=-1)).abs().max().item() < TOL
