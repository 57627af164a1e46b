"""The `ldmgraph` command line as a user runs it: exit codes, outputs, metadata, speed, no torch."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from graph_helpers import WORKFLOWS, write_png
from PIL import Image

from ldmgraph.graph import codes


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LDMGRAPH_PLUGIN_DIR", None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ldmgraph.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=clean_env(), timeout=300)


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A folder with invert.json and inputs/photo.png beside it (the default input folder)."""
    shutil.copy(WORKFLOWS / "invert.json", tmp_path / "invert.json")
    pixels = write_png(tmp_path / "inputs" / "photo.png", size=(20, 12))
    return tmp_path, pixels


def expected_blend(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Closed form of invert.json: (1 - f) x + f (1 - x), saved as 8-bit."""
    x = pixels.astype(np.float32) / 255
    return np.clip(np.rint(((1 - factor) * x + factor * (1 - x)) * 255), 0, 255).astype(np.uint8)


def test_validate_broken_workflow_lists_codes_exits_2_and_runs_nothing(tmp_path: Path) -> None:
    shutil.copy(WORKFLOWS / "broken.json", tmp_path / "broken.json")
    result = cli("validate", "broken.json", "--json", cwd=tmp_path)
    assert result.returncode == 2
    found = {(p["node_id"], p["code"]) for p in json.loads(result.stdout)["problems"]}
    assert {("typo", codes.UNKNOWN_NODE_TYPE), ("nolink", codes.MISSING_INPUT), ("dangling", codes.DANGLING_LINK),
            ("mismatch", codes.TYPE_MISMATCH), ("bounds", codes.OUT_OF_BOUNDS), ("loop_a", codes.CYCLE)} <= found
    text = cli("validate", "broken.json", cwd=tmp_path)
    assert text.returncode == 2 and "[cycle] node 'loop_a'" in text.stderr
    run = cli("run", "broken.json", cwd=tmp_path)
    assert run.returncode == 2 and not (tmp_path / "output").exists()


def test_validate_does_not_import_torch_and_is_fast(project) -> None:
    folder, _ = project
    probe = ("import json, sys\nfrom ldmgraph.cli import main\nrc = main(['validate', 'invert.json', '--json'])\n"
             "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True,
                         env=clean_env(), timeout=120)
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    assert verdict == {"rc": 0, "torch": False}, out.stderr
    walls, cpus = [], []
    for _ in range(3):
        cpu_before = _children_cpu()
        started = time.perf_counter()
        assert cli("validate", "invert.json", cwd=folder).returncode == 0
        walls.append(time.perf_counter() - started)
        cpus.append(_children_cpu() - cpu_before)
    # CPU time is what validate costs; wall time also counts the wait for a CPU, so it is only a
    # fair measure when the machine is not oversubscribed by other processes.
    assert min(cpus) < 1.0, f"ldmgraph validate used {min(cpus):.2f} s of CPU at best"
    if os.getloadavg()[0] < (os.cpu_count() or 1):
        assert min(walls) < 1.0, f"ldmgraph validate took {min(walls):.2f} s of wall time at best"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_run_writes_png_with_metadata_and_rerun_from_png(project) -> None:
    folder, pixels = project
    result = cli("run", "invert.json", "--no-progress", cwd=folder)
    assert result.returncode == 0, result.stderr
    first = folder / "output" / "inverted_00001_.png"
    assert f"wrote {first}" in result.stdout
    with Image.open(first) as image:
        np.testing.assert_array_equal(np.asarray(image), expected_blend(pixels, 0.25))
        embedded = json.loads(image.text["ldmgraph:workflow"])
        assert json.loads(image.text["ldmgraph:parameters"]) == {"prefix": "inverted", "strength": 0.25}
    assert embedded["nodes"]["blend"]["inputs"]["blend_factor"] == 0.25

    again = cli("run", "invert.json", "--json", cwd=folder)  # new process: never overwrites
    assert json.loads(again.stdout)["files"] == [str(folder / "output" / "inverted_00002_.png")]

    from_png = cli("run", first, "--input-dir", "inputs", "--set", "strength=1", "--set", "prefix=from_png", "--json",
                   cwd=folder)
    assert from_png.returncode == 0, from_png.stderr
    [path] = json.loads(from_png.stdout)["files"]
    assert Path(path).name == "from_png_00001_.png"
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), 255 - pixels)


def test_bad_override_exits_2(project) -> None:
    folder, _ = project
    result = cli("run", "invert.json", "--set", "strenght=0.5", cwd=folder)
    assert result.returncode == 2 and "bad_parameter" in result.stderr and "strength" in result.stderr
    result = cli("validate", "invert.json", "--set", "strength=7", "--json", cwd=folder)
    assert result.returncode == 2 and json.loads(result.stdout)["problems"][0]["node_id"] == "blend"


def test_failed_run_exits_1_naming_the_node(project) -> None:
    folder, _ = project
    (folder / "inputs" / "photo.png").write_bytes(b"not a png at all")
    result = cli("run", "invert.json", "--json", cwd=folder)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["node_id"] == "load" and report["node_type"] == "LoadImage"
    assert not list((folder / "output").glob("*.png")) if (folder / "output").exists() else True


def test_nodes_json_lists_inputs_bounds_defaults_and_help(tmp_path: Path) -> None:
    result = cli("nodes", "--json", cwd=tmp_path)
    listing = json.loads(result.stdout)
    scale = listing["ImageScale"]
    assert scale["inputs"]["width"] == {"type": "INT", "required": False, "default": 512, "ge": 1, "le": 16384,
                                        "description": "new width in pixels"}
    assert scale["inputs"]["upscale_method"]["choices"][:2] == ["nearest", "bilinear"]
    assert scale["outputs"] == {"image": {"type": "IMAGE", "description": ""}}
    assert listing["SaveImage"]["output_node"] is True and listing["Seed"]["inputs"]["mode"]["choices"] == [
        "fixed", "random"]
    assert listing["ImageInvert"]["plugin"] == "ldmgraph.nodes.image"


def test_schema_is_the_workflow_json_schema(tmp_path: Path) -> None:
    schema = json.loads(cli("schema", cwd=tmp_path).stdout)
    assert schema["type"] == "object" and set(schema["required"]) == {"format", "nodes"}
    assert schema["properties"]["format"]["const"] == "ldmgraph/1"
    assert set(schema["$defs"]["Link"]["required"]) == {"node", "output"}


def test_comfyui_api_workflow_runs(project) -> None:
    pytest.importorskip("ldmgraph.interop.comfyui")
    folder, pixels = project
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "comfy"}}}
    (folder / "api.json").write_text(json.dumps(api))
    result = cli("run", "api.json", "--json", cwd=folder)
    assert result.returncode == 0, result.stderr
    [path] = json.loads(result.stdout)["files"]
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_lazy_subcommands_load_only_when_used(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ldmgraph import cli as cli_module

    monkeypatch.setitem(cli_module.LAZY_SUBCOMMANDS, "hello", "graph_fake_subcommand")
    monkeypatch.setitem(cli_module.LAZY_SUBCOMMANDS, "ghost", "no_such_module_anywhere")
    sys.modules.pop("graph_fake_subcommand", None)
    assert cli_module.main(["schema"]) == 0
    assert "graph_fake_subcommand" not in sys.modules  # not imported for other commands
    capsys.readouterr()
    assert cli_module.main(["hello", "--code", "3"]) == 3
    assert "hello from a lazy subcommand" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_module.main(["ghost"])  # a module that does not exist is simply not offered


# modules a plain txt2img run on the bundled model has no use for, each costing start-up time
HEAVY_MODULES = ("transformers", "torch._dynamo", "scipy", "sympy", "torchsde", "kornia", "fastapi", "ray",
                 "diffusers", "safetensors.torch")
MAIN_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "txt2img.json"  # README's main command


def test_run_profile_breaks_down_the_main_command_without_heavy_imports(tmp_path: Path) -> None:
    """README's main command with --profile --json: one profile event whose phases cover the run,
    torch imported by the loader node (not at start-up), nothing heavy that txt2img does not use."""
    probe = ("import json, sys\nfrom ldmgraph.cli import main\n"
             f"rc = main(['run', {str(MAIN_WORKFLOW)!r}, '--set', 'steps=2', '--output-dir', 'out', "
             "'--no-progress', '--profile', '--json'])\n"
             f"print(json.dumps({{'rc': rc, 'heavy': sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)}}))")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env=clean_env(), timeout=300)
    wall = time.perf_counter() - started
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}, out.stderr
    [report] = [json.loads(line) for line in out.stderr.splitlines() if line.startswith('{"kind": "profile"')]
    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases)[:4] == ["interpreter start", "start-up imports", "plugin discovery", "validation"]
    for node in ("ckpt (CheckpointLoader)", "positive (TextEncode)", "sampler (Sampler)", "decode (VAEDecode)",
                 "save (SaveImage)"):
        assert f"node {node}" in phases
    assert all(p["wall_s"] >= 0 and (p["import_s"] or 0) <= p["wall_s"] + 1e-3 for p in phases.values())
    assert abs(sum(p["wall_s"] for p in phases.values()) - report["total_s"]) < 1e-2
    assert report["total_s"] <= wall  # the phases tile the process's life, start-up included
    assert phases["node ckpt (CheckpointLoader)"]["import_s"] > 0  # torch arrives with the first model
    assert (tmp_path / "out").is_dir()


def test_run_profile_prints_a_table_on_stderr(project) -> None:
    folder, _ = project
    result = cli("run", "invert.json", "--no-progress", "--profile", cwd=folder)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("phase"))
    assert lines[header].split() == ["phase", "wall", "s", "cpu", "s", "imports", "s"]
    names = [line.rsplit(None, 3)[0] for line in lines[header + 1:] if not line.startswith("done:")]
    assert names[:4] == ["interpreter start", "start-up imports", "plugin discovery", "validation"]
    assert "node load (LoadImage)" in names and names[-1] == "total"
    assert "wrote" in result.stdout  # stdout keeps the command's own output
