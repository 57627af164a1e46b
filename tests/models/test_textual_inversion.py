"""Textual-inversion embeddings (`embedding:name` in a prompt) through the executor, against diffusers.

A tiny SD1-layout checkpoint and an embedding of two random vectors, written in each file format we
read; the reference is diffusers' `load_textual_inversion` into transformers' CLIPTextModel on the
same weights, its tokenizer extended with the token, run on the prompt diffusers would build.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import write

from ldmgraph.graph import codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import ValidationError
from ldmgraph.graph.executor import Executor
from ldmgraph.models.embedding_files import load_embedding
from ldmgraph.models.embeddings import EmbeddingError, available_embeddings
from ldmgraph.plugins import load_registry

TOL = 1e-5
WIDTH = 128  # the tiny CLIP's width (model_helpers.clip_model)


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(11)) * 0.02


def save_formats(folder: Path, vectors: torch.Tensor) -> dict[str, Path]:
    """The same two vectors as an A1111 .pt, an A1111 .safetensors, diffusers' learned_embeds (pickled and
    safetensors) and an SDXL file (whose clip_l part an SD1 encoder takes)."""
    folder.mkdir(parents=True, exist_ok=True)
    param = vectors.clone().requires_grad_(True)  # A1111 saves the trained tensor as it is
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": "tok", "step": 500,
             "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny"}
    torch.save(a1111, folder / "a1111.pt")
    torch.save({"<tok>": vectors.clone()}, folder / "learned_embeds.bin")
    return {
        "a1111.pt": folder / "a1111.pt",
        "emb_params": write(folder / "emb_params.safetensors", {"emb_params": vectors.clone()}),
        "learned_embeds.bin": folder / "learned_embeds.bin",
        "diffusers_safetensors": write(folder / "diffusers_style.safetensors", {"<tok>": vectors.clone()}),
        "sdxl": write(folder / "sdxl_pair.safetensors", {"clip_l": vectors.clone(), "clip_g": torch.zeros(2, 96)}),
    }


def encode_through_executor(models: Path, ckpt: Path, text: str, executor: Executor | None = None) -> torch.Tensor:
    doc = {
        "format": "ldmgraph/1",
        "nodes": {
            "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt.name}},
            "positive": {"type": "TextEncode", "inputs": {
                "text_encoder": {"node": "ckpt", "output": "text_encoder"}, "text": text}},
        },
    }
    result = (executor or make_executor(models)).run(doc, outputs=["positive"])
    return result.outputs["positive"]["conditioning"][0].context


def make_executor(models: Path) -> Executor:
    return Executor(load_registry(), Environment(input_dir=models, output_dir=models / "out", model_dirs=(models,)))


@torch.no_grad()
def diffusers_context(tiny_clip: Any, vectors: torch.Tensor, prompt: str) -> torch.Tensor:
    """diffusers' textual inversion: the token added to the tokenizer, its vectors to the embedding matrix,
    the prompt expanded to one token per vector, padded with EOS to 77 as SD1 pads."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer

    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    class Loader(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict[str, Any] = {}

    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), local_files_only=True)
    text_encoder = copy.deepcopy(tiny_clip)
    loader = Loader()
    loader.load_textual_inversion({"<tok>": vectors}, tokenizer=tokenizer, text_encoder=text_encoder)
    ids = tokenizer(loader.maybe_convert_prompt(prompt, tokenizer), padding="max_length", max_length=77,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(input_ids=ids).last_hidden_state


@pytest.fixture
def models(tmp_path: Path, sd1_file: Path, vectors: torch.Tensor) -> tuple[Path, dict[str, Path]]:
    return sd1_file.parent, save_formats(sd1_file.parent / "embeddings", vectors)


@pytest.mark.reference
@pytest.mark.parametrize("fmt", ["a1111.pt", "emb_params", "learned_embeds.bin", "diffusers_safetensors", "sdxl"])
def test_textual_inversion_matches_diffusers_for_each_file_format(models, sd1_file, tiny_clip, vectors, fmt):
    folder, files = models
    name = files[fmt].relative_to(folder / "embeddings").as_posix()
    ours = encode_through_executor(folder, sd1_file, f"a photo of embedding:{name}, at night")
    reference = diffusers_context(tiny_clip, vectors, "a photo of <tok>, at night")
    assert ours.shape == reference.shape == (1, 77, WIDTH)
    assert (ours - reference).abs().max().item() < TOL
    # the vectors matter: the plain text differs from the prompt with the embedding
    plain = diffusers_context(tiny_clip, vectors, "a photo of , at night")
    assert (plain - reference).abs().max().item() > 100 * TOL


@pytest.mark.reference
def test_textual_inversion_name_without_extension_and_weighted(models, sd1_file, tiny_clip, vectors):
    folder, _ = models
    ours = encode_through_executor(folder, sd1_file, "a photo of embedding:emb_params")
    reference = diffusers_context(tiny_clip, vectors, "a photo of <tok>")
    assert (ours - reference).abs().max().item() < TOL
    # ComfyUI's rule on the embedding's two positions (tokens 4 and 5 after BOS a photo of)
    weighted = encode_through_executor(folder, sd1_file, "a photo of (embedding:emb_params:1.5)")
    empty = diffusers_context(tiny_clip, vectors, "")
    expected = reference.clone()
    expected[:, 4:6] = (reference[:, 4:6] - empty[:, 4:6]) * 1.5 + empty[:, 4:6]
    assert (weighted - expected).abs().max().item() < TOL


def test_textual_inversion_missing_name_is_a_validation_error_naming_the_node_and_what_exists(models, sd1_file):
    folder, _ = models
    with pytest.raises(ValidationError) as info:
        encode_through_executor(folder, sd1_file, "a photo of embedding:nope")
    (problem,) = info.value.problems
    assert (problem.node_id, problem.input, problem.code) == ("positive", "text", codes.FILE_NOT_FOUND)
    assert "'nope'" in problem.message and "emb_params" in problem.message
    with pytest.raises(ValidationError) as info:
        encode_through_executor(folder, sd1_file, "embedding:../tiny-sd1")
    assert info.value.problems[0].code == codes.UNSAFE_PATH


def test_textual_inversion_replaced_file_is_read_again(models, sd1_file, vectors):
    folder, files = models
    executor = make_executor(folder)  # one executor: its cache would serve an unchanged file
    first = encode_through_executor(folder, sd1_file, "embedding:emb_params", executor)
    write(files["emb_params"], {"emb_params": vectors.flip(0).clone()})
    second = encode_through_executor(folder, sd1_file, "embedding:emb_params", executor)
    assert (first - second).abs().max().item() > 1e-4


def test_textual_inversion_files_are_listed_and_widths_checked(models, vectors):
    folder, files = models
    assert available_embeddings([folder]) == ["a1111", "diffusers_style", "emb_params", "learned_embeds", "sdxl_pair"]
    pair = load_embedding(files["sdxl"])
    assert torch.equal(pair.vectors_for(WIDTH, "clip-l"), vectors) and pair.vectors_for(96, "openclip-bigg").shape == (2, 96)
    with pytest.raises(EmbeddingError, match="trained for another model family"):
        load_embedding(files["emb_params"]).vectors_for(1024, "openclip-h")


def test_textual_inversion_server_lists_embeddings(models, tmp_path):
    """GET /embeddings (ComfyUI's route, and under /api) names the files of the embeddings/ folders."""
    from fastapi.testclient import TestClient

    from ldmgraph.server.app import create_app
    from ldmgraph.server.state import ServerConfig, ServerState

    folder, _ = models
    config = ServerConfig(data_dir=tmp_path / "data", model_dirs=(folder,), allowed_hosts=("testserver",),
                          frontend=False)
    with TestClient(create_app(ServerState.build(config, load_registry()))) as client:
        for route in ("/embeddings", "/api/embeddings"):
            reply = client.get(route)
            assert reply.status_code == 200
            assert reply.json() == ["a1111", "diffusers_style", "emb_params", "learned_embeds", "sdxl_pair"]
