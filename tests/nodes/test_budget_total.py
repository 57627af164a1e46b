"""The memory and disk budget is total: every node type declares its estimate (plugins' included), so
no node in a chain hides what comes after it, and graphs built to walk around the budget are refused
at validation with `over_budget`, naming the node. A fuzz composes random chains of image nodes and
runs each chain the budget accepts in a fresh process, whose peak memory must stay within it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmgraph.graph.node import Node
from ldmgraph.plugins import PluginManager

REPO = Path(__file__).resolve().parents[2]
INPUTS = REPO / "workflows" / "inputs"
RULES = ("small", "same", "writes", "expanded")


def test_every_node_type_declares_its_estimate_plugins_included() -> None:
    registry = PluginManager().registry
    assert "ExampleGrayscale" in registry.nodes and "PromptAppend" in registry.nodes  # the example plugins
    undeclared = []
    for name, cls in sorted(registry.nodes.items()):
        if cls.estimate.__func__ is not Node.estimate.__func__:  # type: ignore[attr-defined]
            continue
        kind, _, source = (cls.estimate_rule or "").partition(":")
        if kind not in RULES or (kind in ("same", "writes") and source not in cls.spec.inputs):
            undeclared.append(f"{name} ({cls.__module__}): {cls.estimate_rule!r}")
    assert not undeclared, "node types without a memory estimate:\n" + "\n".join(undeclared)


def validate(doc: dict[str, Any], tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "w.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "validate", str(path), "--json",
                           "--input-dir", str(INPUTS), *extra], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.returncode, json.loads(proc.stdout)


def chain(*steps: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    nodes: dict[str, Any] = {"load": {"type": "LoadImage", "inputs": {"image": "shapes.png"}}}
    previous = "load"
    for index, (kind, inputs) in enumerate(steps):
        nodes[f"n{index}"] = {"type": kind, "inputs": {"image": {"node": previous, "output": "image"}, **inputs}}
        previous = f"n{index}"
    nodes["save"] = {"type": "SaveImage", "inputs": {"images": {"node": previous, "output": "image"}}}
    return {"format": "ldmgraph/1", "nodes": nodes}


def over_budget(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in result.get("problems", []) if p["code"] == "over_budget"]


@pytest.mark.parametrize("first", [("LineArtThreshold", {}), ("Canny", {})])
def test_a_threshold_node_no_longer_hides_the_chain_below_it(tmp_path: Path, first: tuple[str, Any]) -> None:
    doc = chain(first, ("ImageScaleBy", {"scale_by": 16}), ("ImageScaleBy", {"scale_by": 16}),
                ("ImagePadForOutpaint", {"left": 8192, "top": 8192, "right": 8192, "bottom": 8192}))
    code, result = validate(doc, tmp_path, "--memory-budget", "8G")
    assert code == 2 and over_budget(result), result


def test_ddim_sampler_counts_like_sampler(tmp_path: Path) -> None:
    doc = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    sampler = doc["nodes"]["sampler"]
    sampler["type"] = "DDIMSampler"
    sampler["inputs"] = {k: v for k, v in sampler["inputs"].items()
                         if k in ("model", "positive", "negative", "latent", "seed", "steps", "cfg")}
    doc.pop("parameters")
    doc["nodes"]["latent"]["inputs"].update(width=16384, height=16384, batch_size=64)
    code, result = validate(doc, tmp_path, "--memory-budget", "16G")
    assert code == 2 and "sampler" in [p["node_id"] for p in over_budget(result)], result


def test_sampler_custom_advanced_counts_its_guider_model(tmp_path: Path) -> None:
    doc = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    nodes = doc["nodes"]
    old = nodes.pop("sampler")["inputs"]
    nodes.update({
        "guider": {"type": "CFGGuider", "inputs": {k: old[k] for k in ("model", "positive", "negative", "cfg")}},
        "noise": {"type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "select": {"type": "SamplerSelect", "inputs": {"sampler": "euler"}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": old["model"], "steps": 2}},
        "sampler": {"type": "SamplerCustomAdvanced", "inputs": {
            "noise": {"node": "noise", "output": "noise"}, "guider": {"node": "guider", "output": "guider"},
            "sampler": {"node": "select", "output": "sampler"}, "sigmas": {"node": "sigmas", "output": "sigmas"},
            "latent": old["latent"]}},
    })
    nodes["decode"]["inputs"]["latent"] = {"node": "sampler", "output": "output"}
    doc.pop("parameters", None)
    nodes["latent"]["inputs"].update(width=16384, height=16384, batch_size=64)
    code, result = validate(doc, tmp_path, "--memory-budget", "16G")
    assert code == 2 and "sampler" in [p["node_id"] for p in over_budget(result)], result


def test_five_thousand_save_nodes_embedding_a_large_workflow_are_refused_by_the_disk_budget(tmp_path: Path) -> None:
    nodes: dict[str, Any] = {"load": {"type": "LoadImage", "inputs": {"image": "shapes.png"}}}
    for i in range(5000):
        nodes[f"save{i}"] = {"type": "SaveImage", "inputs": {"images": {"node": "load", "output": "image"},
                                                             "filename_prefix": f"s{i}"}}
    doc = {"format": "ldmgraph/1", "nodes": nodes, "metadata": {"notes": "x" * 400_000}}
    code, result = validate(doc, tmp_path)
    problems = over_budget(result)
    assert code == 2 and problems and "disk budget" in problems[0]["message"], result
    code, result = validate(doc, tmp_path, "--disk-budget", "0")
    assert code == 0, result


# --- fuzz: random chains of image nodes; what the budget accepts runs within it -----------------------

_STEPS = st.one_of(
    st.tuples(st.just("ImageScaleBy"), st.fixed_dictionaries({"scale_by": st.sampled_from([0.5, 2, 4, 8, 16])})),
    st.tuples(st.just("ImageInvert"), st.just({})),
    st.tuples(st.just("LineArtThreshold"), st.just({})),
    st.tuples(st.just("ImagePadForOutpaint"), st.fixed_dictionaries(
        {"left": st.sampled_from([0, 64, 512, 2048]), "bottom": st.sampled_from([0, 256, 1024])})),
    st.tuples(st.just("ImageCrop"), st.fixed_dictionaries({"width": st.sampled_from([8, 64, 1024]),
                                                            "height": st.sampled_from([8, 64, 1024])})),
)
BUDGET = 600 * 2**20
PROBE = """
import json, resource, sys
from pathlib import Path
from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import load_registry

def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024

doc, inputs, out, budget = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
env = Environment(input_dir=inputs, output_dir=out, memory_budget=budget)
executor = Executor(load_registry(), env)
try:
    compiled = executor.validate(doc)
except Exception as exc:
    print(json.dumps({"accepted": False, "codes": [p.code for p in getattr(exc, "problems", [])]}))
    sys.exit(0)
before = hwm()
executor.execute(compiled)
print(json.dumps({"accepted": True, "growth": hwm() - before}))
"""


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(_STEPS, min_size=1, max_size=4))
def test_fuzz_image_chains_the_budget_accepts_run_within_it(tmp_path_factory: Any, steps: list[Any]) -> None:
    out = tmp_path_factory.mktemp("out")
    doc = chain(*steps)
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(doc), str(INPUTS), str(out), str(BUDGET)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["accepted"]:
        assert result["growth"] <= BUDGET, (steps, result)
    else:
        assert "over_budget" in result["codes"] or result["codes"], (steps, result)


def test_a_4096_squared_segmentation_map_is_refused_before_its_one_hot_map_is_made(tmp_path: Path) -> None:
    """The paper's semantic-synthesis workflow (any checkpoint stands in for the model at validation)."""
    from PIL import Image

    Image.new("RGB", (4096, 4096)).save(tmp_path / "segmentation.png")
    doc = json.loads((REPO / "workflows" / "paper" / "semantic.json").read_text())
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "ldmgraph-shapes-txt2img.safetensors"
    doc.pop("parameters")
    path = tmp_path / "w.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "validate", str(path), "--json", "--input-dir",
                           str(tmp_path), "--memory-budget", "16G"], capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout)
    assert proc.returncode == 2 and "condition" in [p["node_id"] for p in over_budget(result)], result
    assert "one-hot" in " ".join(p["message"] for p in over_budget(result))
