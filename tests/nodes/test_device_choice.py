"""The sampler's device: the node's choice, else the run's --device, else CUDA > MPS > CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldmgraph.nodes.common import NodeInputError, pick_device


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    ctx = SimpleNamespace(device=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", ctx) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto", ctx) == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto", ctx) == "cpu"


def test_the_node_choice_beats_the_run_override_which_beats_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", SimpleNamespace(device="cpu")) == "cpu"
    assert pick_device("cpu", SimpleNamespace(device="cuda:1")) == "cpu"
    assert pick_device("auto", SimpleNamespace(device="cuda:1")) == "cuda:1"


def test_asking_for_a_missing_accelerator_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NodeInputError, match="CUDA is not available; use 'auto' or 'cpu'"):
        pick_device("cuda", SimpleNamespace(device=None))


def test_loaders_put_the_weights_on_the_runs_device():
    """A run's device reaches the loaders, so the sampler, text encoder and autoencoder compute where
    their weights are (on a GPU machine the loaders once kept everything on the CPU). The "meta"
    device stands in for an accelerator: the modules move, no memory is allocated."""
    from ldmgraph.nodes.loaders import BUNDLED_TXT2IMG, CheckpointLoader, VAELoader
    from ldmgraph.train.export import assets_dir

    ctx = SimpleNamespace(device="meta", model_dirs=(assets_dir(),), progress=None,
                          resource=lambda key, factory: factory())
    out = CheckpointLoader().run(CheckpointLoader.Inputs(ckpt_name=BUNDLED_TXT2IMG), ctx)
    assert out.model.device.type == "meta"
    assert out.vae.device.type == "meta"
    assert next(out.text_encoder.parameters()).device.type == "meta"
    vae = VAELoader().run(VAELoader.Inputs(vae_name=BUNDLED_TXT2IMG), ctx).vae
    assert vae.device.type == "meta"
    ctx.device = "cpu"
    assert CheckpointLoader().run(CheckpointLoader.Inputs(ckpt_name=BUNDLED_TXT2IMG), ctx).model.device.type == "cpu"
