"""A conditioner from a throwaway plugin package, installed in the test (a distribution with an
``ldmgraph`` entry point on sys.path), reaches the sampler on every route with no change to ldmgraph;
its node is listed (with its inputs' types) and validated; one that raises fails naming its node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import ValidationError
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import PluginManager

PLUGIN = '''
import torch
from typing import Any

from ldmgraph.conditioners import Conditioner
from ldmgraph.diffusion import NoiseSchedule
from ldmgraph.graph import Node, NodeInputs, NodeOutputs
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import FLOAT, INT, MODEL
from ldmgraph.plugins import hookimpl


class RecordingModel:
    """A DiffusionModel that records what reaches it, by route."""

    prediction_type = "eps"

    def __init__(self):
        self.noise_schedule = NoiseSchedule.from_config()
        self.calls = []

    def apply_model(self, x, t, context=None, concat=None, y=None, control=()):
        residuals = [c.residuals(x, t, context, y) for c in control]
        self.calls.append({"context": context, "concat": concat, "y": y, "control": residuals})
        return 0.1 * x


class RecordingModelLoader(Node):
    """A model that records its calls."""

    type_name = "RecordingModelLoader"
    deterministic = False

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL)

    def run(self, inputs, ctx):
        return self.Outputs(model=RecordingModel())


class TokenPlug(Conditioner):
    """Three tokens of a constant."""

    type_name = "TokenPlug"
    route = "crossattn"
    sides = "new"

    class Inputs(NodeInputs):
        value: float = InputField(FLOAT, 2.0)

    def contribute(self, inputs, ctx):
        return torch.full((1, 3, 8), inputs.value)


class ChannelPlug(Conditioner):
    """Two constant channels at the latent's size."""

    type_name = "ChannelPlug"
    route = "concat"

    class Inputs(NodeInputs):
        side: int = InputField(INT, 4, ge=1, le=64)

    def contribute(self, inputs, ctx):
        return torch.full((1, 2, inputs.side, inputs.side), 0.5)


class VectorPlug(Conditioner):
    """A class index."""

    type_name = "VectorPlug"
    route = "vector"

    class Inputs(NodeInputs):
        label: int = InputField(INT, 7)

    def contribute(self, inputs, ctx):
        return torch.tensor([inputs.label])


class Residual:
    def __init__(self, strength, start, end):
        self.strength, self.start_percent, self.end_percent = strength, start, end

    def residuals(self, x, t, context, y):
        return [torch.full_like(x[:, :1], self.strength)]


class ControlPlug(Conditioner):
    """A residual source, for the first half of the schedule."""

    type_name = "ControlPlug"
    route = "control"

    class Inputs(NodeInputs):
        strength: float = InputField(FLOAT, 0.25)

    def contribute(self, inputs, ctx):
        return Residual(inputs.strength, 0.0, 0.5)


class BrokenPlug(Conditioner):
    """Raises."""

    type_name = "BrokenPlug"
    route = "crossattn"

    def contribute(self, inputs, ctx):
        raise RuntimeError("plug exploded")


@hookimpl
def ldmgraph_nodes():
    return [RecordingModelLoader]


@hookimpl
def ldmgraph_conditioners():
    return [TokenPlug, ChannelPlug, VectorPlug, ControlPlug, BrokenPlug]
'''


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The package `routeplug` installed into a site folder: module plus dist-info with its entry point."""
    site = tmp_path / "site"
    (site / "routeplug").mkdir(parents=True)
    (site / "routeplug" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "routeplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: routeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ldmgraph]\nrouteplug = routeplug\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def link(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


def routes_workflow() -> dict:
    return {"format": "ldmgraph/1", "nodes": {
        "model": {"type": "RecordingModelLoader", "inputs": {}},
        "tokens": {"type": "TokenPlug", "inputs": {"value": 2.0}},
        "channels": {"type": "ChannelPlug", "inputs": {"conditioning": link("tokens", "conditioning"), "side": 4}},
        "vector": {"type": "VectorPlug", "inputs": {"conditioning": link("channels", "conditioning"), "label": 7}},
        "control": {"type": "ControlPlug", "inputs": {"conditioning": link("vector", "conditioning")}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "sample": {"type": "Sampler", "inputs": {
            "model": link("model", "model"), "positive": link("control", "conditioning"),
            "negative": link("control", "conditioning"), "latent": link("latent", "latent"), "seed": 1,
            "steps": 4, "cfg": 1.0, "sampler": "euler", "schedule": "normal"}},
    }}


def test_a_plugin_conditioner_reaches_the_sampler_on_every_route(installed: Path, tmp_path: Path) -> None:
    manager = PluginManager(use_env=False)
    status = next(s for s in manager.statuses if s.name.startswith("routeplug"))
    assert status.ok and status.source == "entry-point", status.error
    registry = manager.registry
    assert status.conditioners == ["TokenPlug", "ChannelPlug", "VectorPlug", "ControlPlug", "BrokenPlug"]
    assert {"TokenPlug", "ControlPlug"} <= set(registry.nodes)  # each conditioner got its node
    described = registry.nodes["ChannelPlug"].spec.describe(registry)  # what `nodes --json` prints
    assert described["inputs"]["conditioning"]["type"] == "CONDITIONING"
    assert described["inputs"]["side"]["type"] == "INT" and described["outputs"]["conditioning"]["type"] == "CONDITIONING"

    executor = Executor(registry, Environment(output_dir=tmp_path / "out"))
    result = executor.run(routes_workflow(), outputs=["model", "sample"])
    calls = result.outputs["model"]["model"].calls
    assert len(calls) == 4  # one network call per euler step (cfg 1)
    first = calls[0]
    assert first["context"].shape == (1, 3, 8) and float(first["context"].mean()) == 2.0  # crossattn
    assert first["concat"].shape == (1, 2, 4, 4) and float(first["concat"].mean()) == 0.5  # concat
    assert first["y"].tolist() == [7]  # vector
    assert [float(r[0].mean()) for r in first["control"]] == [0.25]  # control, in its range
    assert calls[-1]["control"] == []  # past end_percent 0.5: the residual source is off

    with pytest.raises(ValidationError) as caught:  # validation knows the generated node's inputs
        doc = routes_workflow()
        del doc["nodes"]["channels"]["inputs"]["conditioning"]
        doc["nodes"]["vector"]["inputs"]["label"] = "seven"
        executor.validate(doc)
    text = str(caught.value)
    assert "channels" in text and "conditioning" in text and "vector" in text and "label" in text


def test_a_conditioner_that_raises_fails_naming_its_node_and_writes_nothing(installed: Path, tmp_path: Path) -> None:
    doc = {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {}},
        "text": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": "a red circle"}},
        "boom": {"type": "BrokenPlug", "inputs": {"conditioning": link("text", "conditioning")}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
        "sample": {"type": "Sampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("boom", "conditioning"),
            "negative": link("text", "conditioning"), "latent": link("latent", "latent"), "steps": 2}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
        "save": {"type": "SaveImage", "inputs": {"images": link("decode", "image")}},
    }}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", str(path), "--output-dir", str(out),
                          "--no-progress"], capture_output=True, text=True, env=env)
    assert run.returncode == 1
    assert "boom" in run.stderr and "BrokenPlug" in run.stderr and "plug exploded" in run.stderr
    assert not out.exists() or not any(out.rglob("*"))
