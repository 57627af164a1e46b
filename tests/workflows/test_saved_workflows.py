"""The saved workflows: each validates, runs at a reduced step count, and writes a non-blank image
of the expected size; parameters override by name; caching across runs is visible in the events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmgraph.cli import main

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"

EXPECTED_SIZE = {  # (width, height) of each workflow's image
    "txt2img": (64, 64),
    "img2img": (64, 64),
    "inpaint": (64, 64),
    "superres": (64, 64),
    "hires_fix": (64, 64),
    "area_composition": (96, 64),
}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZE))
def test_saved_workflow_runs_and_writes_a_non_blank_image(name, make_executor):
    result = make_executor().run(load(name), overrides={"steps": 3, "seed": 7})
    assert len(result.files) == 1 and result.files[0].name.startswith(name)
    image = pixels(result.files[0])
    assert (image.shape[1], image.shape[0]) == EXPECTED_SIZE[name]
    assert image.std() > 2.0, "the image is blank (one flat colour)"


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZE))
def test_ldmgraph_validate_accepts_every_saved_workflow(name, models_dir, capsys):
    assert main(["validate", str(WORKFLOWS / f"{name}.json"), "--models-dir", str(models_dir)]) == 0
    assert "ok" in capsys.readouterr().out


def test_every_saved_workflow_declares_steps_and_seed_and_text_ones_a_prompt():
    for name in EXPECTED_SIZE:
        params = load(name)["parameters"]
        assert {"steps", "seed"} <= set(params), name
        if name == "area_composition":  # a prompt per area
            assert {"left_prompt", "right_prompt"} <= set(params)
        elif name != "superres":
            assert "prompt" in params, name


def test_cli_run_with_set_and_output_dir(models_dir, tmp_path, capsys):
    out = tmp_path / "cli-out"
    code = main(
        [
            "run",
            str(WORKFLOWS / "txt2img.json"),
            "--models-dir",
            str(models_dir),
            "--output-dir",
            str(out),
            "--set",
            "steps=2",
            "--set",
            "seed=11",
            "--set",
            "prompt=a blue square at the top",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    files = sorted(out.glob("txt2img_*.png"))
    assert len(files) == 1
    with Image.open(files[0]) as image:
        params = json.loads(image.text["ldmgraph:parameters"])
        embedded = json.loads(image.text["ldmgraph:workflow"])
    assert params["seed"] == 11 and params["steps"] == 2 and params["prompt"] == "a blue square at the top"
    assert embedded["nodes"]["positive"]["inputs"]["text"] == "a blue square at the top"


def test_seed_change_reruns_only_sampler_decode_save_and_img2img_reuses_the_checkpoint(make_executor):
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    executor = make_executor(fresh_models=True)
    events: list = []

    def run(doc, **overrides):
        events.clear()
        executor.run(doc, overrides={"steps": 2, **overrides}, on_event=events.append)
        return {e.node_id for e in events if e.kind == "start"}, {
            e.node_id for e in events if e.kind == "cached"
        }

    started, _ = run(load("txt2img"), seed=1)
    assert {"ckpt", "positive", "negative", "latent", "sampler", "decode", "save"} <= started
    cache = executor.resources[MODEL_CACHE_KEY]
    loads_after_first = cache.stats.loads
    started, cached = run(load("txt2img"), seed=2)
    assert started == {"sampler", "decode", "save"}
    assert {"ckpt", "positive", "negative", "latent"} <= cached
    hits_before = cache.stats.hits
    started, cached = run(load("img2img"), seed=2)
    assert cache.stats.loads == loads_after_first, "img2img loaded the checkpoint a second time"
    assert "ckpt" in cached or cache.stats.hits > hits_before
    assert {"image", "encode", "sampler", "decode", "save"} <= started


def test_sampler_reports_per_step_progress(make_executor):
    events: list = []
    make_executor().run(load("txt2img"), overrides={"steps": 3, "seed": 5}, on_event=events.append)
    steps = [(e.k, e.n) for e in events if e.kind == "progress" and e.node_id == "sampler"]
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_cancelling_during_sampling_stops_the_run_and_writes_nothing(make_executor, tmp_path):
    from ldmgraph.graph.context import CancelToken
    from ldmgraph.graph.errors import Cancelled

    token = CancelToken()

    def on_event(event):
        if event.kind == "progress" and event.k == 1:
            token.cancel()

    out = tmp_path / "cancelled"
    with pytest.raises(Cancelled):
        make_executor(output_dir=out).run(
            load("txt2img"), overrides={"steps": 4}, on_event=on_event, cancel=token
        )
    assert not list(out.glob("*.png")) if out.exists() else True


def test_validating_a_diffusion_workflow_does_not_import_torch(models_dir):
    import subprocess
    import sys

    code = (
        "import sys; from ldmgraph.cli import main; "
        f"rc = main(['validate', {str(WORKFLOWS / 'inpaint.json')!r}, '--models-dir', {str(models_dir)!r}]); "
        "sys.exit(rc or ('torch' in sys.modules) * 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr)
