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
