"""ComfyUI's editor, served by `ldmgraph serve`, offers ldmgraph's workflow components in its node
library: in headless Chromium the component is a registered node type under the ldmgraph category,
a graph built on the page from it and a save node runs from the Run button, and the server ran the
component's inner nodes. Needs Debian's `chromium` and `chromium-driver` and `ldmgraph[ui]`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

pytest.importorskip("fastapi")
from selenium.webdriver.common.by import By  # noqa: E402
from server_helpers import ServerProcess  # noqa: E402
from test_browser import (  # noqa: E402
    CHROMIUM,
    DRIVER,
    FLAGS,
    SHOWN_IMAGES,
    Service,
    click_when_ready,
    visible_text,
    wait_for,
    webdriver,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (Path(CHROMIUM).exists() and DRIVER), reason="needs chromium + chromedriver")]


@pytest.fixture(scope="module")
def editor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Any]]:
    server = ServerProcess(tmp_path_factory.mktemp("subgraph-editor") / "data").start()
    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield server, driver
    finally:
        driver.quit()
        server.stop()


BUILD = """
const core = LiteGraph.createNode('workflow/txt2img_core');
const save = LiteGraph.createNode(arguments[0]);
app.graph.add(core); app.graph.add(save);
core.connect(0, save, 0);
for (const [name, value] of [['steps', 1], ['width', 32], ['height', 32], ['seed', 7]]) {
  core.widgets.find(w => w.name === name).value = value;
}
return [core.outputs.map(o => o.name), core.widgets.map(w => w.name)];
"""


def test_comfyui_subgraph_editor_library_offers_components_that_run(editor):
    server, page = editor
    page.get(server.base + "/")
    wait_for(lambda: page.execute_script("return !!(window.app && window.app.graph && window.app.canvas "
                                         "&& window.app.graph.nodes.length)"), 90, "the editor to start")
    registered = page.execute_script("return Object.keys(LiteGraph.registered_node_types)"
                                     ".filter(t => t.startsWith('workflow/'))")
    assert {"workflow/txt2img_core", "workflow/upscale_pass"} <= set(registered)
    click_when_ready(lambda: page.find_elements(By.CSS_SELECTOR, "button[aria-label^='Node Library']"),
                     30, "the editor's sidebar")
    wait_for(lambda: visible_text(page, "ldmgraph"), 30, "the ldmgraph category in the node library")

    page.execute_script("window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    wait_for(lambda: page.execute_script("return window.app.graph.nodes.length === 0"), 20, "a blank graph")
    save_type = page.execute_script("return 'ldmgraph.SaveImage' in LiteGraph.registered_node_types "
                                    "? 'ldmgraph.SaveImage' : 'SaveImage'")
    outputs, widgets = page.execute_script(BUILD, save_type)
    assert outputs == ["image", "latent", "model", "vae", "positive", "negative"]
    assert {"prompt", "seed", "steps", "width", "height"} <= set(widgets)
    click_when_ready(lambda: [b for b in page.find_elements(By.CSS_SELECTOR, "button")
                              if b.text.strip() == "Run" and b.is_displayed()], 20, "the Run button")
    shown = wait_for(lambda: page.execute_script(SHOWN_IMAGES), 180, "the output image on the page")
    assert shown[0][1:] == [32, 32]
    [entry] = server.http.get("/api/history").json().values()
    assert entry["status"]["status_str"] == "success"
    assert "workflow/txt2img_core" in json.dumps(entry["prompt"][2])  # the editor sent the component node
