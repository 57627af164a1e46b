"""The example patch plugin, installed (pip install -e plugins/ldmgraph-example-patch): registered by
its entry point, its node listed, and its patch checked through the executor on the bundled model.

Dividing the attention logits by T is dividing the queries by T, so the patched model's image must
equal the image of a copy of the checkpoint whose attention `to_q` weights are divided by T (written
by the test): an independent closed form. The shared base must come back unchanged after the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import PluginManager

BUNDLED = Path(__import__("ldmgraph").__file__).resolve().parent / "assets" / "models"
TXT2IMG = "ldmgraph-shapes-txt2img.safetensors"


@pytest.fixture(scope="module")
def registry():
    manager = PluginManager(use_env=False)
    status = next(s for s in manager.statuses if s.name.startswith("example_patch"))
    assert status.ok and status.source == "entry-point" and status.nodes == ["AttentionTemperature"], status.error
    return manager.registry


def test_its_node_is_listed_with_its_inputs() -> None:
    listing = json.loads(subprocess.run([sys.executable, "-m", "ldmgraph.cli", "nodes", "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    node = listing["AttentionTemperature"]
    assert node["plugin"].startswith("example_patch")
    assert {k: v["type"] for k, v in node["inputs"].items()} == {"model": "MODEL", "temperature": "FLOAT", "which": "ENUM"}


def _workflow(ckpt: str, temperature: float | None, which: str = "attn1") -> dict:
    link = lambda n, o: {"node": n, "output": o}  # noqa: E731
    model = link("ckpt", "model")
    nodes = {"ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt}}}
    if temperature is not None:
        nodes["temper"] = {"type": "AttentionTemperature",
                           "inputs": {"model": model, "temperature": temperature, "which": which}}
        model = link("temper", "model")
    nodes |= {
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": ""}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
        "sample": {"type": "Sampler", "inputs": {"model": model, "positive": link("pos", "conditioning"),
                                                 "negative": link("neg", "conditioning"), "latent": link("latent", "latent"),
                                                 "steps": 4, "cfg": 3.0, "seed": 3}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
    }
    return {"format": "ldmgraph/1", "nodes": nodes}


@pytest.fixture(scope="module")
def executor(registry, tmp_path_factory):
    if not (BUNDLED / TXT2IMG).is_file():
        pytest.skip("the bundled text-to-image model is not installed")
    from safetensors.torch import save_file

    from ldmgraph.models.files import read_state_dict

    folder = tmp_path_factory.mktemp("models")
    state = read_state_dict(BUNDLED / TXT2IMG)
    for temperature in (2.0, 0.5):  # the closed form: the same file with attn1's queries divided by T
        tensors = {k: (v / temperature if ".attn1.to_q." in k else v) for k, v in state.tensors.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"queries_over_{temperature}.safetensors"),
                  metadata=state.metadata)
    torch.set_num_threads(1)
    return Executor(registry, Environment(input_dir=folder, output_dir=folder / "out", model_dirs=(folder, BUNDLED)))


def _image(executor: Executor, doc: dict) -> np.ndarray:
    return np.asarray(executor.run(doc, outputs=["decode"]).outputs["decode"]["image"])


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_attention_temperature_equals_queries_divided_by_t_and_the_base_comes_back(executor, temperature):
    base = _image(executor, _workflow(TXT2IMG, None))
    tempered = _image(executor, _workflow(TXT2IMG, temperature))
    closed_form = _image(executor, _workflow(f"queries_over_{temperature}", None))
    assert np.abs(tempered - base).max() > 1e-2  # the patch changes the image
    assert np.abs(tempered - closed_form).max() <= 1e-4, np.abs(tempered - closed_form).max()
    # the shared base is unchanged: no attention replacement left installed, and a new run (another
    # prompt, so nothing comes from the output cache) gives what a fresh executor gives
    unet = _loaded_unet(executor)
    assert all(getattr(m, "attention_override", None) is None for m in unet.modules())
    other = _workflow(TXT2IMG, None)
    other["nodes"]["pos"]["inputs"]["text"] = "a blue square"
    fresh = Executor(executor.registry, executor.env)
    assert np.array_equal(_image(executor, other), _image(fresh, other))


def _loaded_unet(executor: Executor):
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    cache = executor.resources[MODEL_CACHE_KEY]
    (key,) = [k for k in cache.keys() if k[0] == "checkpoint" and TXT2IMG in str(k[1])]
    return cache.get_or_load(key, lambda: None).unet.diffusion_model


def test_temperature_one_is_the_model_unchanged(executor):
    base = _image(executor, _workflow(TXT2IMG, None))
    assert np.abs(_image(executor, _workflow(TXT2IMG, 1.0, "both")) - base).max() <= 1e-5
