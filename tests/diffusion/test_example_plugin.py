"""The example sampler plugin (plugins/ldmgraph-example-sampler): registered and usable by name."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch

from ldmgraph.diffusion import CondEntry, Latent, NoiseSchedule, sample
from ldmgraph.plugins import PluginManager

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "ldmgraph-example-sampler"
INSTALL_HINT = "pip install -e plugins/ldmgraph-example-sampler"


def _installed() -> bool:
    try:
        distribution("ldmgraph-example-sampler")
    except PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(not _installed(), reason=f"example plugin not installed: {INSTALL_HINT}")


@pytest.fixture
def plugin_registry(monkeypatch):
    """Built-in samplers plus the example plugin module registered as a plugin (no install needed)."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    module = importlib.import_module("ldmgraph_example_sampler")
    manager = PluginManager(builtins=["ldmgraph.diffusion.registry"], entry_points_group=None, use_env=False)
    status = manager.register(module, "example_sampler")
    assert status.ok, status.error
    return manager.registry


class ToyModel:
    prediction_type = "eps"
    noise_schedule = NoiseSchedule.from_config()

    def apply_model(self, x, t, context=None, concat=None, y=None):
        return 0.8 * x * torch.cos(t / 700).view(-1, 1, 1, 1) + 0.3 * torch.sin(x)


def _final(registry, sampler: str, steps: int) -> torch.Tensor:
    pos = [CondEntry(torch.zeros(1, 2, 4))]
    latent = Latent(torch.zeros(1, 4, 8, 8))
    return sample(
        ToyModel(),
        latent,
        pos,
        [],
        seed=5,
        steps=steps,
        cfg=1.0,
        sampler=sampler,
        schedule="karras",
        registry=registry,
    ).samples


def test_midpoint_is_registered_and_second_order(plugin_registry):
    assert "midpoint" in plugin_registry.choices("samplers")
    assert plugin_registry.owner("sampler", "midpoint") == "example_sampler"
    reference = _final(plugin_registry, "heun", 200)
    euler_error = (_final(plugin_registry, "euler", 12) - reference).abs().max()
    midpoint_error = (_final(plugin_registry, "midpoint", 12) - reference).abs().max()
    assert midpoint_error < euler_error / 3  # a 2nd-order method beats Euler clearly at equal steps


@needs_install
def test_entry_point_registers_the_sampler_without_importing_torch():
    script = textwrap.dedent(
        """
        import sys
        from ldmgraph.plugins import PluginManager
        manager = PluginManager(builtins=["ldmgraph.diffusion.registry"], use_env=False)
        registry = manager.registry
        print(registry.owner("sampler", "midpoint"), "euler" in registry.samplers, "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["example_sampler", "(ldmgraph_example_sampler)", "True", "False"]


@needs_install
def test_midpoint_is_a_choice_of_the_sampler_node_in_ldmgraph_nodes_json():
    cmd = [
        sys.executable,
        "-c",
        "import sys; from ldmgraph.cli import main; sys.exit(main())",
        "nodes",
        "--json",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    for node_type in ("Sampler", "SamplerAdvanced"):
        assert "midpoint" in listing[node_type]["inputs"]["sampler"]["choices"]
    assert "euler" in listing["Sampler"]["inputs"]["sampler"]["choices"]


def _plugin_with_nodes(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    module = importlib.import_module("ldmgraph_example_sampler")
    manager = PluginManager(
        builtins=["ldmgraph.diffusion.registry", "ldmgraph.nodes.sampling"], entry_points_group=None, use_env=False
    )
    status = manager.register(module, "example_sampler")
    assert status.ok, status.error
    return manager.registry, status


def _select_midpoint(alpha):
    return {"format": "ldmgraph/1", "nodes": {"pick": {"type": "SamplerSelect.midpoint", "inputs": {"alpha": alpha}}}}


def test_plugin_option_is_a_node_input_checked_by_validation(monkeypatch):
    from ldmgraph.graph.errors import ValidationError
    from ldmgraph.graph.validate import validate_workflow

    registry, status = _plugin_with_nodes(monkeypatch)
    assert "SamplerSelect.midpoint" in status.nodes  # credited to the plugin that declared the option
    described = registry.node("SamplerSelect.midpoint").spec.describe(registry)["inputs"]["alpha"]
    assert (described["type"], described["default"], described["ge"], described["le"]) == ("FLOAT", 0.5, 0.1, 1.0)
    validate_workflow(_select_midpoint(2 / 3), registry, outputs=["pick"])
    with pytest.raises(ValidationError) as caught:
        validate_workflow(_select_midpoint(2.0), registry, outputs=["pick"])
    problem = caught.value.problems[0]
    assert (problem.node_id, problem.input, problem.code) == ("pick", "alpha", "out_of_bounds")
    assert "1.0" in problem.message


def test_plugin_option_reaches_the_sampler(monkeypatch):
    """alpha 1 is Heun's method: the same numbers as the built-in heun on the same sigmas."""
    from ldmgraph.diffusion.sampling import sampler_choice

    registry, _ = _plugin_with_nodes(monkeypatch)
    denoiser = lambda x, sigma: 0.7 * x / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5  # noqa: E731
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 14.6
    sigmas = torch.tensor([14.6, 5.0, 1.0, 0.3, 0.0])
    midpoint = sampler_choice("midpoint", {"alpha": 1.0}, registry)
    heun = sampler_choice("heun", None, registry)
    assert torch.allclose(midpoint(denoiser, x, sigmas), heun(denoiser, x, sigmas), atol=1e-5)
    assert not torch.allclose(sampler_choice("midpoint", None, registry)(denoiser, x, sigmas), heun(denoiser, x, sigmas))


@needs_install
def test_plugin_option_shows_in_ldmgraph_nodes_json():
    cmd = [sys.executable, "-c", "import sys; from ldmgraph.cli import main; sys.exit(main())", "nodes", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    alpha = json.loads(result.stdout)["SamplerSelect.midpoint"]["inputs"]["alpha"]
    assert (alpha["type"], alpha["default"], alpha["ge"], alpha["le"]) == ("FLOAT", 0.5, 0.1, 1.0)
