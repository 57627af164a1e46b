"""Third-party ComfyUI client libraries from PyPI, driven as their READMEs say, get the saved image back.

- comfy-api-simplified (``ComfyApiWrapper.queue_and_wait_images``): posts the prompt with
  ``requests`` and no Content-Type, listens with ``websockets`` and returns binary frames if any
  arrive during the job, else the output node's images from ``/history`` and ``/view``; so it
  returns the saved file only when previews are off by default and outputs are not pushed as
  previews.
- comfyapi (``ComfyAPIManager``): polls ``/history`` and fetches ``/view?filename=...&type=output``
  with no subfolder, so outputs must not sit in a folder per job.
- pycomfy (``ComfyAPI.text_to_image``): its own SD1.5 template (checkpoint, size and steps
  changed), the images of the first ``executed`` message, fetched from ``/view``.

Each returned image is compared with the file the server wrote in its output folder.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from PIL import Image
from server_helpers import ROOT, TXT2IMG, ServerProcess, comfy_graph

pytestmark = pytest.mark.slow


def exported_api_workflow(path: Path, prefix: str) -> Path:
    """The graph as the editor's "Export (API)" writes it: node titles in `_meta`."""
    graph: dict[str, Any] = comfy_graph(seed=1, prefix=prefix)
    titles = {"3": "KSampler", "4": "Load Checkpoint", "5": "Empty Latent Image", "6": "positive",
              "7": "negative", "8": "VAE Decode", "9": "Save Image"}
    for node_id, node in graph.items():
        node["_meta"] = {"title": titles[node_id]}
    path.write_text(json.dumps(graph, indent=2))
    return path


def saved(server: ServerProcess, filename: str, subfolder: str = "") -> bytes:
    return (server.data_dir / "output" / subfolder / filename).read_bytes()


def test_comfy_api_simplified_queue_and_wait_images(server: ServerProcess, tmp_path: Path) -> None:
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(f"http://127.0.0.1:{server.port}/")
    wf = ComfyWorkflowWrapper(str(exported_api_workflow(tmp_path / "workflow_api.json", "simplified")))
    wf.set_node_param("KSampler", "seed", 1234)
    wf.set_node_param("positive", "text", "a blue square on the right")
    results = api.queue_and_wait_images(wf, "Save Image")
    assert list(results) and all(name.startswith("simplified_") for name in results)  # files, not frames
    [(filename, data)] = results.items()
    assert data == saved(server, filename)
    assert Image.open(io.BytesIO(data)).size == (32, 32)


def test_comfyapi_manager_submit_poll_and_download(server: ServerProcess, tmp_path: Path) -> None:
    from comfyapi import ComfyAPIManager

    manager = ComfyAPIManager()
    manager.set_base_url(f"http://127.0.0.1:{server.port}")
    manager.load_workflow(str(exported_api_workflow(tmp_path / "workflow.json", "comfyapi")))
    manager.edit_workflow(["6", "inputs", "text"], "a green triangle in the middle")
    manager.edit_workflow(["3", "inputs", "seed"], 123456)
    prompt_id = manager.submit_workflow()
    for _ in range(600):
        if manager.check_queue(prompt_id):
            break
        time.sleep(0.2)
    output_url, filename = manager.find_output(prompt_id, with_filename=True)
    assert "type=output" in output_url and "subfolder" not in output_url
    path = manager.download_output(output_url, save_path=str(tmp_path / "output_images"), filename=filename)
    assert Path(path).read_bytes() == saved(server, filename)


def test_pycomfy_text_to_image(server: ServerProcess) -> None:
    from pycomfy import ComfyAPI

    before = set((server.data_dir / "output").glob("ComfyUI_*.png"))
    api = ComfyAPI(f"127.0.0.1:{server.port}")
    images = api.text_to_image(positive_prompt="a red circle on the left", negative_prompt="", checkpoint_name=TXT2IMG,
                               steps=1, cfg=1.0, sampler_name="euler", width=32, height=32, seed=77)
    api.close()
    [written] = set((server.data_dir / "output").glob("ComfyUI_*.png")) - before
    assert len(images) == 1 and images[0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0].convert("RGB")), np.asarray(Image.open(written).convert("RGB")))


def test_readme_names_the_client_libraries_tested_here() -> None:
    """The README's claim: the libraries it names are the ones this file drives, all in the test extra."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    named = re.search(r"client libraries (.+?) work against it unchanged", readme)
    assert named is not None
    libraries = re.split(r", | and ", named[1])
    assert libraries == ["comfy-api-simplified", "comfyapi", "pycomfy"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    source = Path(__file__).read_text()
    for library in libraries:
        assert any(re.match(rf"{re.escape(library)}\b", requirement) for requirement in extra), library
        assert f"from {library.replace('-', '_')} import" in source, library
