"""Sampling from its parts through the executor: SIGMAS, SAMPLER, GUIDER and NOISE nodes give
the same latents as the convenience Sampler / SamplerAdvanced nodes with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (on a shared machine more threads only spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
CKPT = {"node": "ckpt", "output": "model"}


def _link(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


def _base(batch: int = 2) -> dict:
    """txt2img.json's loader, prompts and empty latent, without its sampler and decoder."""
    doc = json.loads((WORKFLOWS / "txt2img.json").read_text())
    nodes = {k: v for k, v in doc["nodes"].items() if k in ("ckpt", "positive", "negative", "latent")}
    nodes["latent"]["inputs"].update(width=32, height=32, batch_size=batch)
    return {"format": doc["format"], "nodes": nodes}


def _custom(nodes: dict, name: str, noise: str, sampler: str, sigmas: dict, latent: dict) -> None:
    nodes[name] = {
        "type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": _link(noise, "noise"),
            "guider": _link("guider", "guider"),
            "sampler": _link(sampler, "sampler"),
            "sigmas": sigmas,
            "latent": latent,
        },
    }


def _parts(nodes: dict, seed: int, cfg: float, schedule: str, steps: int) -> None:
    nodes["guider"] = {
        "type": "CFGGuider",
        "inputs": {"model": CKPT, "positive": _link("positive", "conditioning"),
                   "negative": _link("negative", "conditioning"), "cfg": cfg},
    }
    nodes["noise"] = {"type": "RandomNoise", "inputs": {"noise_seed": seed}}
    nodes["off"] = {"type": "DisableNoise", "inputs": {}}
    nodes["sigmas"] = {"type": "Scheduler", "inputs": {"model": CKPT, "schedule": schedule, "steps": steps}}


def _sampler_inputs(**settings) -> dict:
    return {
        "model": CKPT,
        "positive": _link("positive", "conditioning"),
        "negative": _link("negative", "conditioning"),
        **settings,
    }


def _latent(result, node: str, output: str = "latent") -> torch.Tensor:
    return result.outputs[node][output].samples


def test_custom_advanced_equals_sampler_bit_for_bit(make_executor):
    doc = _base()
    nodes = doc["nodes"]
    _parts(nodes, seed=7, cfg=4.0, schedule="karras", steps=4)
    nodes["pick"] = {"type": "SamplerSelect", "inputs": {"sampler": "euler_ancestral"}}
    _custom(nodes, "custom", "noise", "pick", _link("sigmas", "sigmas"), _link("latent", "latent"))
    nodes["plain"] = {
        "type": "Sampler",
        "inputs": _sampler_inputs(latent=_link("latent", "latent"), seed=7, steps=4, cfg=4.0,
                                  sampler="euler_ancestral", schedule="karras"),
    }
    result = make_executor().run(doc, outputs=["custom", "plain"])
    custom, plain = _latent(result, "custom", "output"), _latent(result, "plain")
    assert torch.equal(custom, plain)
    assert not torch.equal(custom[0], custom[1])  # image 1 has its own noise (seed + 1)


def test_split_schedule_ancestral_then_deterministic_equals_advanced_passes(make_executor):
    """SplitSigmas at step 2 of 5: euler_ancestral on the high sigmas from seeded noise, then euler
    on the low sigmas without new noise. Two SamplerAdvanced passes (0..2 with leftover noise,
    then 2.. without adding noise) run exactly the same steps, so they must agree; and a split
    Euler run must equal one Sampler pass of Euler."""
    doc = _base(batch=1)
    nodes = doc["nodes"]
    _parts(nodes, seed=3, cfg=3.0, schedule="normal", steps=5)
    nodes["split"] = {"type": "SplitSigmas", "inputs": {"sigmas": _link("sigmas", "sigmas"), "step": 2}}
    nodes["ancestral"] = {"type": "SamplerSelect.euler_ancestral", "inputs": {"eta": 1.0, "s_noise": 1.0}}
    nodes["euler"] = {"type": "SamplerSelect", "inputs": {"sampler": "euler"}}
    _custom(nodes, "high", "noise", "ancestral", _link("split", "high_sigmas"), _link("latent", "latent"))
    _custom(nodes, "low", "off", "euler", _link("split", "low_sigmas"), _link("high", "output"))
    _custom(nodes, "euler_high", "noise", "euler", _link("split", "high_sigmas"), _link("latent", "latent"))
    _custom(nodes, "euler_low", "off", "euler", _link("split", "low_sigmas"), _link("euler_high", "output"))
    common = dict(seed=3, steps=5, cfg=3.0, schedule="normal")
    nodes["first"] = {
        "type": "SamplerAdvanced",
        "inputs": _sampler_inputs(latent=_link("latent", "latent"), sampler="euler_ancestral", start_step=0,
                                  end_step=2, return_with_leftover_noise=True, **common),
    }
    nodes["second"] = {
        "type": "SamplerAdvanced",
        "inputs": _sampler_inputs(latent=_link("first", "latent"), sampler="euler", start_step=2,
                                  add_noise=False, **common),
    }
    nodes["one_pass"] = {
        "type": "Sampler", "inputs": _sampler_inputs(latent=_link("latent", "latent"), sampler="euler", **common)
    }
    result = make_executor().run(doc, outputs=["high", "low", "first", "second", "euler_low", "one_pass"])
    assert torch.equal(_latent(result, "high", "output"), _latent(result, "first"))
    assert torch.equal(_latent(result, "low", "output"), _latent(result, "second"))
    assert torch.allclose(_latent(result, "euler_low", "output"), _latent(result, "one_pass"), atol=1e-6)
    assert not torch.allclose(_latent(result, "low", "output"), _latent(result, "one_pass"), atol=1e-3)


def test_sampler_options_reach_the_solver(make_executor):
    """eta 0 makes euler_ancestral deterministic Euler: the same latent as the euler sampler."""
    doc = _base(batch=1)
    nodes = doc["nodes"]
    _parts(nodes, seed=11, cfg=2.0, schedule="karras", steps=3)
    nodes["eta0"] = {"type": "SamplerSelect.euler_ancestral", "inputs": {"eta": 0.0}}
    nodes["euler"] = {"type": "SamplerSelect", "inputs": {"sampler": "euler"}}
    _custom(nodes, "a", "noise", "eta0", _link("sigmas", "sigmas"), _link("latent", "latent"))
    _custom(nodes, "b", "noise", "euler", _link("sigmas", "sigmas"), _link("latent", "latent"))
    result = make_executor().run(doc, outputs=["a", "b"])
    assert torch.allclose(_latent(result, "a", "output"), _latent(result, "b", "output"), atol=1e-6)
