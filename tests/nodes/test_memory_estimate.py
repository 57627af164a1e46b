"""Memory estimates at validation: over-budget graphs refused before running (node and figure
named), a graph within budget runs, and the estimate follows measured peak memory (factor 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldmgraph.cli import main

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
BUNDLED = REPO / "ldmgraph" / "assets" / "models"
PROBE = Path(__file__).with_name("memory_probe.py")

pytestmark = pytest.mark.skipif(not (BUNDLED / "ldmgraph-shapes-txt2img.safetensors").is_file(),
                                reason="needs the bundled models")


def txt2img() -> dict:
    return json.loads((WORKFLOWS / "txt2img.json").read_text())


def link(node: str, output: str) -> dict:
    return {"node": node, "output": output}


def repeated_latents(doc: dict) -> dict:
    """Three RepeatLatentBatch(64) after a batch of 64: 64^4 latents."""
    doc["nodes"]["latent"]["inputs"]["batch_size"] = 64
    source = "latent"
    for i in range(3):
        doc["nodes"][f"repeat{i}"] = {"type": "RepeatLatentBatch",
                                      "inputs": {"latent": link(source, "latent"), "amount": 64}}
        source = f"repeat{i}"
    doc["nodes"]["sampler"]["inputs"]["latent"] = link(source, "latent")
    return doc


def padded_images(doc: dict) -> dict:
    """Three ImagePadForOutpaint(8192 on every side) after a decoded image, then saved."""
    source = ("decode", "image")
    for i in range(3):
        doc["nodes"][f"pad{i}"] = {"type": "ImagePadForOutpaint", "inputs": {
            "image": link(*source), "left": 8192, "right": 8192, "top": 8192, "bottom": 8192}}
        source = (f"pad{i}", "image")
    doc["nodes"]["save"]["inputs"]["images"] = link(*source)
    return doc


def huge_latent(doc: dict) -> dict:
    doc["nodes"]["latent"]["inputs"].update(width=16384, height=16384)
    doc["nodes"]["decode"]["inputs"]["tiled"] = "off"  # in one piece (tiles would bound the memory)
    return doc


def big_batch(doc: dict) -> dict:
    doc["nodes"]["latent"]["inputs"].update(width=2048, height=2048, batch_size=64)
    return doc


@pytest.mark.parametrize(("build", "node"), [(repeated_latents, "sampler"), (padded_images, "pad2"),
                                             (huge_latent, "decode"), (big_batch, "sampler")])
def test_validate_refuses_a_graph_over_budget_naming_node_and_figure(build, node, tmp_path, capsys):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(build(txt2img())))
    out = tmp_path / "out"
    code = main(["validate", str(path), "--json", "--memory-budget", "24G", "--output-dir", str(out)])
    assert code == 2
    problems = json.loads(capsys.readouterr().out)["problems"]
    (problem,) = [p for p in problems if "disk budget" not in p["message"]]  # (huge images also fill the disk)
    assert problem["code"] == "over_budget" and problem["node_id"] == node
    assert "GiB" in problem["message"] and "24.0 GiB" in problem["message"]
    assert not out.exists()


def test_the_same_graph_within_a_larger_budget_is_ok(tmp_path, capsys):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(big_batch(txt2img())))
    assert main(["validate", str(path), "--memory-budget", "0"]) == 0  # 0: no limit
    assert main(["validate", str(path), "--memory-budget", "500G"]) == 0


def test_a_graph_within_budget_still_runs_and_streams_progress(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(WORKFLOWS / "txt2img.json"), "--json", "--memory-budget", "4G",
                 "--set", "steps=3", "--output-dir", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is True
    events = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    steps = [(e["k"], e["n"]) for e in events if e["kind"] == "progress" and e["node_id"] == "sampler"]
    assert steps == [(1, 3), (2, 3), (3, 3)]  # each step as it happens, before the sampler is done
    sampler_done = next(i for i, e in enumerate(events) if e["kind"] == "done" and e["node_id"] == "sampler")
    first_step = next(i for i, e in enumerate(events) if e["kind"] == "progress" and e["node_id"] == "sampler")
    assert first_step < sampler_done
    loading = [(e["k"], e["n"]) for e in events if e["kind"] == "progress" and e["node_id"] == "ckpt"]
    assert loading[-1] == (4, 4) and len(loading) >= 2  # the checkpoint's parts, as they load
    assert len(list(out.glob("*.png"))) == 1


def probe(doc: dict, overrides: dict, tmp_path: Path, model_dir: Path, name: str) -> dict:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(PROBE), str(path), json.dumps(overrides), str(WORKFLOWS / "inputs"),
                           str(model_dir), str(tmp_path / f"out-{name}")], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_within_factor_2(small: dict, large: dict, floor: bool = False) -> None:
    """The growth from a small to a large run, estimated and measured (the fixed cost of the
    interpreter and libraries is the same in both and cancels)."""
    estimated = large["estimate"] - small["estimate"]
    measured = large["growth"] - small["growth"]
    assert measured > 100 * 2**20, (small, large)  # a difference well above the noise
    print(f"estimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert 0.5 <= estimated / measured <= 2.0, (estimated, measured)
    # and (`floor`) the larger run's estimate never falls more than 10% below its measured peak (the small
    # run's growth is mostly one-time costs of the interpreter and libraries, which vary by machine)
    print(f"estimate {large['estimate'] / 2**20:.0f} MiB, peak growth {large['growth'] / 2**20:.0f} MiB")
    assert not floor or large["estimate"] >= 0.9 * large["growth"], large


def test_estimate_follows_measured_peak_memory_on_the_bundled_model(tmp_path):
    small = probe(txt2img(), {"steps": 1, "width": 64, "height": 64}, tmp_path, BUNDLED, "small")
    large = probe(txt2img(), {"steps": 1, "width": 256, "height": 256}, tmp_path, BUNDLED, "large")
    assert_within_factor_2(small, large, floor=True)  # benchmarks/memory_estimate.py adds 1024^2 and 2048^2


def test_estimate_follows_measured_peak_memory_on_a_tiny_sd(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "models"))
    from model_helpers import clip_model, clip_sd1_keys, prefixed, tiny_unet, unet_state, vae_state, write

    models = tmp_path / "models"
    models.mkdir()
    write(models / "tiny-sd1.safetensors", {**prefixed("model.diffusion_model.", unet_state(tiny_unet(context_dim=128))),
                                            **prefixed("first_stage_model.", vae_state()),
                                            **clip_sd1_keys(clip_model())})
    doc = txt2img()
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = "tiny-sd1.safetensors"
    small = probe(doc, {"steps": 1, "width": 32, "height": 32}, tmp_path, models, "sd-small")
    large = probe(doc, {"steps": 1, "width": 128, "height": 128}, tmp_path, models, "sd-large")
    assert_within_factor_2(small, large)


def test_a_small_png_claiming_12000x12000_pixels_is_refused_from_its_header(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (12000, 12000)).save(inputs / "bomb.png", optimize=True)
    assert (inputs / "bomb.png").stat().st_size < 200_000
    out = tmp_path / "out"
    code = main(["validate", str(WORKFLOWS / "img2img.json"), "--json", "--input-dir", str(inputs),
                 "--set", "image=bomb.png", "--output-dir", str(out)])
    assert code == 2
    problems = json.loads(capsys.readouterr().out)["problems"]
    (problem,) = [p for p in problems if "disk budget" not in p["message"]]  # (huge images also fill the disk)
    assert problem["code"] == "image_too_large" and problem["input"] == "image"
    assert "12000x12000" in problem["message"] and "bomb.png" in problem["message"]
    # the limit is configurable: raised, the header check lets it through (the budget still applies)
    code = main(["validate", str(WORKFLOWS / "img2img.json"), "--json", "--input-dir", str(inputs),
                 "--set", "image=bomb.png", "--max-image-pixels", "200000000", "--memory-budget", "0"])
    assert code == 0
    assert not out.exists()
