"""ComfyUI's published editor against the real server, in headless Chromium (Selenium + chromedriver).

On a new data folder the editor opens on a graph that runs here, with nothing marked missing, and its
template browser lists the saved workflows. A classic ComfyUI graph (CheckpointLoaderSimple,
CLIPTextEncode x2, EmptyLatentImage, KSampler, VAEDecode, SaveImage) on the bundled model, loaded
from a ComfyUI UI-format file, queues from the page, shows its image, and that image is the one
`ldmgraph run` makes from the same file; the output PNG dropped back on the page restores the graph.
A saved workflow opens from the workflow list and runs. Needs Debian's `chromium` and
`chromium-driver` (installed by .ci/run) and `ldmgraph[ui]`. Set LDMGRAPH_EDITOR_SCREENSHOTS=folder
to keep screenshots of each step (the ones in docs/ come from here).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_helpers import ROOT, ServerProcess

from ldmgraph.interop.comfyui_nodes import COMFYUI_NODES

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("comfyui_frontend_package")
from PIL import Image  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (Path(CHROMIUM).exists() and DRIVER), reason="needs chromium + chromedriver")]
FLAGS = ("--no-sandbox --headless --disable-gpu --no-first-run --disable-background-networking "
         "--disable-component-update --disable-sync --window-size=1600,1000").split()
COMFY_GRAPH = ROOT / "ldmgraph" / "assets" / "editor" / "comfyui_txt2img.json"
CLASSIC = sorted(["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
                  "VAEDecode", "SaveImage"])
SHOWN_IMAGES = ("return Array.from(document.images).filter(i => i.src.includes('/api/view') && i.complete "
                "&& i.naturalWidth > 0).map(i => [i.src, i.naturalWidth, i.naturalHeight])")


def wait_for(condition, timeout: float, what: str):  # noqa: ANN001, ANN201 - a polling helper
    """Poll `condition` until it is truthy; an element that the page re-rendered while it was being
    read (Selenium's StaleElementReferenceException) counts as not there yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def click_when_ready(find, timeout: float, what: str) -> None:  # noqa: ANN001 - find: () -> elements
    """Click the first element `find` returns, looking it up again if the page re-rendered it."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_for(find, max(deadline - time.monotonic(), 0.5), what)[0].click()
            return
        except StaleElementReferenceException:
            if time.monotonic() > deadline:
                raise


def visible_text(browser: Any, text: str) -> list[Any]:
    return [e for e in browser.find_elements(By.XPATH, f"//*[normalize-space(.)={json.dumps(text)}]")
            if e.is_displayed()]


def screenshot(browser: Any, name: str) -> None:
    folder = os.environ.get("LDMGRAPH_EDITOR_SCREENSHOTS")
    if folder:
        browser.save_screenshot(str(Path(folder) / name))


@pytest.fixture(scope="module")
def editor_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on a new data folder whose saved workflows are the repository's txt2img with 3 steps."""
    folder = tmp_path_factory.mktemp("browser")
    workflows = folder / "workflows"
    workflows.mkdir()
    doc = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    doc["nodes"]["sampler"]["inputs"]["steps"] = 3
    (workflows / "txt2img.json").write_text(json.dumps(doc))
    server = ServerProcess(folder / "data")
    server.args[server.args.index("--workflows-dir") + 1] = str(workflows)
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def browser(editor_server: ServerProcess) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, editor_server: ServerProcess) -> Iterator[Any]:
    """The browser, with a screenshot of the page kept when the test fails and no severe console error
    allowed when it passes."""
    failed = True
    try:
        yield browser
        failed = False
    finally:
        if failed:
            browser.save_screenshot(str(editor_server.data_dir.parent / "failure.png"))
            print("screenshot of the failure:", editor_server.data_dir.parent / "failure.png")
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def graph_types(browser: Any) -> list[str]:
    return sorted(browser.execute_script("return window.app.graph.nodes.map(n => n.type)"))


def test_editor_first_view_runs_nothing_missing_draws_every_comfyui_widget_and_lists_templates(
        page: Any, editor_server: ServerProcess) -> None:
    page.get(editor_server.base + "/")
    wait_for(lambda: page.execute_script("return !!(window.app && window.app.graph && window.app.canvas "
                                         "&& window.app.graph.nodes.length)"), 180, "the editor to start")
    assert graph_types(page) == CLASSIC
    unknown = page.execute_script("return window.app.graph.nodes.filter(n => !(n.type in "
                                  "LiteGraph.registered_node_types) || n.has_errors).map(n => n.type)")
    assert unknown == []
    time.sleep(2)  # the page reports missing nodes and models in a dialog or toast once it has loaded
    body = page.find_element(By.TAG_NAME, "body").text
    assert "Missing" not in body and "missing" not in body
    ckpt = page.execute_script("return window.app.graph.nodes.find(n => n.type === 'CheckpointLoaderSimple')"
                               ".widgets[0].value")
    assert ckpt == "ldmgraph-shapes-txt2img.safetensors"
    screenshot(page, "editor-first-view.png")

    drawn = page.execute_script("return Object.fromEntries(arguments[0].map(t => [t, "
                                "(LiteGraph.createNode(t).widgets || []).map(w => w.name)]))", sorted(COMFYUI_NODES))
    for name, mapping in COMFYUI_NODES.items():  # every widget, in the order the importer reads them
        expected = [w for widget in mapping.widgets
                    for w in ([widget, "control_after_generate"] if widget in mapping.seed_widgets else [widget])]
        assert drawn[name] == expected, name

    page.execute_script("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    for title in ("Text to image (ComfyUI nodes)", "txt2img"):
        wait_for(lambda t=title: visible_text(page, t), 30, f"the template {title!r} in the template browser")
    screenshot(page, "editor-templates.png")
    click_when_ready(lambda: visible_text(page, "txt2img"), 20, "the saved workflow's template card")
    types = wait_for(lambda: page.execute_script("return window.app.graph.nodes.some(n => n.type === 'Sampler') "
                                                 "&& window.app.graph.nodes.map(n => n.type)"), 30,
                     "the template's graph on the canvas")
    assert sorted(types) == sorted(["ldmgraph.CheckpointLoader", "TextEncode", "TextEncode", "EmptyLatent", "Sampler",
                                    "ldmgraph.VAEDecode", "ldmgraph.SaveImage"])
    page.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)


def test_comfyui_graph_from_a_ui_file_runs_like_ldmgraph_run_and_its_png_restores_it(
        page: Any, editor_server: ServerProcess, tmp_path: Path) -> None:
    graph = json.loads(COMFY_GRAPH.read_text())
    sampler = next(n for n in graph["nodes"] if n["type"] == "KSampler")
    steps = 20 if os.environ.get("LDMGRAPH_EDITOR_SCREENSHOTS") else 3  # the file's 20 for the pictures in docs/
    sampler["widgets_values"][2] = steps  # [seed, control after generate, steps, cfg, sampler, scheduler, denoise]
    ui_file = tmp_path / "classic_sd15_graph.json"
    ui_file.write_text(json.dumps(graph))

    page.get(editor_server.base + "/")
    wait_for(lambda: page.execute_script("return !!(window.app && window.app.graph && window.app.graph.nodes.length)"),
             180, "the editor to start")
    page.find_element(By.ID, "comfy-file-input").send_keys(str(ui_file))
    wait_for(lambda: page.execute_script("const k = window.app.graph.nodes.find(n => n.type === 'KSampler'); "
                                         f"return k && k.widgets.find(w => w.name === 'steps').value === {steps}"),
             30, "the UI-format file on the canvas")
    assert graph_types(page) == CLASSIC

    click_when_ready(lambda: [b for b in page.find_elements(By.CSS_SELECTOR, "button")
                              if b.text.strip() == "Run" and b.is_displayed()], 20, "the Run button")
    shown = wait_for(lambda: page.execute_script(SHOWN_IMAGES), 300, "the output image on the page")
    assert shown[0][1:] == [64, 64] and "filename=ldmgraph_" in shown[0][0]
    history = editor_server.http.get("/api/history").json()
    [entry] = [h for h in history.values() if h["prompt"][2].get("3", {}).get("class_type") == "KSampler"]
    assert entry["status"]["status_str"] == "success"
    [saved] = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    png = tmp_path / saved["filename"]
    png.write_bytes(editor_server.http.get("/api/view", params=saved).content)
    screenshot(page, "editor-comfyui-graph.png")

    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", str(ui_file), "--output-dir", str(out),
                    "--no-progress"], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    [cli_png] = sorted(out.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(Image.open(cli_png).convert("RGB")))

    page.execute_script("window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    wait_for(lambda: page.execute_script("return window.app.graph.nodes.length === 0"), 20, "a blank graph")
    page.find_element(By.ID, "comfy-file-input").send_keys(str(png))
    wait_for(lambda: page.execute_script("return window.app.graph.nodes.length === 7"), 30,
             "the graph restored from the output PNG")
    assert graph_types(page) == CLASSIC
    widgets = page.execute_script("return window.app.graph.nodes.find(n => n.type === 'KSampler')"
                                  ".widgets.map(w => [w.name, w.value])")
    expected = {"seed": 42, "steps": steps, "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
    assert {k: v for k, v in widgets if k in expected} == expected
    screenshot(page, "editor-restored-from-png.png")


def test_saved_workflow_opens_from_the_workflow_list_runs_and_its_saved_graph_runs_in_ldmgraph_run(
        page: Any, editor_server: ServerProcess, tmp_path: Path) -> None:
    page.get(editor_server.base + "/")
    wait_for(lambda: page.execute_script("return !!(window.app && window.app.graph && window.app.canvas "
                                         "&& window.app.graph.nodes.length)"), 180, "the editor to start")
    click_when_ready(lambda: page.find_elements(By.CSS_SELECTOR, "button[aria-label^='Node Library']"),
                     30, "the editor's sidebar")
    wait_for(lambda: visible_text(page, "ldmgraph"), 30, "the ldmgraph category in the node library")

    click_when_ready(lambda: page.find_elements(By.CSS_SELECTOR, "button[aria-label^='Workflows']"),
                     20, "the workflows button")
    click_when_ready(lambda: visible_text(page, "txt2img"), 20, "the saved workflow in the workflow list")
    types = wait_for(lambda: page.execute_script(
        "return window.app && window.app.graph.nodes.some(n => n.type === 'Sampler') "
        "&& window.app.graph.nodes.map(n => n.type)"), 20, "the workflow's nodes on the canvas")
    assert sorted(types) == sorted(["ldmgraph.CheckpointLoader", "TextEncode", "TextEncode", "EmptyLatent", "Sampler",
                                    "ldmgraph.VAEDecode", "ldmgraph.SaveImage"])
    before = {tuple(i) for i in page.execute_script(SHOWN_IMAGES)}
    click_when_ready(lambda: [b for b in page.find_elements(By.CSS_SELECTOR, "button")
                              if b.text.strip() == "Run" and b.is_displayed()], 20, "the Run button")
    shown = wait_for(lambda: [i for i in page.execute_script(SHOWN_IMAGES) if tuple(i) not in before], 300,
                     "the output image on the page")
    assert shown[0][1:] == [64, 64] and "filename=txt2img_" in shown[0][0]
    history = editor_server.http.get("/api/history").json()
    assert all(h["status"]["status_str"] == "success" for h in history.values())
    screenshot(page, "server-editor.png")

    # the graph as the editor saves it (UI format, ldmgraph's own nodes) runs headless to the same image
    ui_file = tmp_path / "saved_from_editor.json"
    ui_file.write_text(json.dumps(page.execute_script("return window.app.graph.serialize()")))
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", str(ui_file), "--output-dir", str(out),
                    "--no-progress"], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    [cli_png] = sorted(out.glob("*.png"))
    served = editor_server.http.get(shown[0][0].replace(editor_server.base, "")).content
    assert np.array_equal(np.asarray(Image.open(cli_png).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(served)).convert("RGB")))
