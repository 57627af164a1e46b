"""ComfyUI's published editor against the real server, in headless Chromium (Selenium + chromedriver).

The page loads without console errors, ldmgraph's nodes are in its node library, a saved workflow
opens from its workflow list, and Run produces an image that the page shows. Needs Debian's
`chromium` and `chromium-driver` (installed by .ci/run) and `ldmgraph[ui]`. Set
LDMGRAPH_SERVER_SCREENSHOT=path to keep a screenshot of the editor (docs/server-editor.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from server_helpers import ROOT, ServerProcess

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("comfyui_frontend_package")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (Path(CHROMIUM).exists() and DRIVER), reason="needs chromium + chromedriver")]
FLAGS = ("--no-sandbox --headless --disable-gpu --no-first-run --disable-background-networking "
         "--disable-component-update --disable-sync --window-size=1600,1000").split()


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


@pytest.fixture(scope="module")
def editor_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A server whose saved workflows are the repository's txt2img with 3 steps (fast on a CPU)."""
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


def test_editor_loads_shows_nodes_opens_workflow_and_runs(editor_server: ServerProcess) -> None:
    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(editor_server.base + "/")
        wait_for(lambda: browser.execute_script("return !!(window.app && window.app.graph && window.app.canvas "
                                                "&& window.app.graph.nodes.length)"), 90, "the editor to start")
        click_when_ready(lambda: browser.find_elements(By.CSS_SELECTOR, "button[aria-label^='Node Library']"),
                         30, "the editor's sidebar")
        wait_for(lambda: [e for e in browser.find_elements(By.XPATH, "//*[normalize-space(.)='ldmgraph']")
                          if e.is_displayed()], 30, "the ldmgraph category in the node library")

        click_when_ready(lambda: browser.find_elements(By.CSS_SELECTOR, "button[aria-label^='Workflows']"),
                         20, "the workflows button")
        click_when_ready(lambda: [e for e in browser.find_elements(By.XPATH, "//*[normalize-space(.)='txt2img']")
                                  if e.is_displayed()], 20, "the saved workflow in the workflow list")
        types = wait_for(lambda: browser.execute_script(
            "return window.app && window.app.graph.nodes.some(n => n.type === 'Sampler') "
            "&& window.app.graph.nodes.map(n => n.type)"), 20, "the workflow's nodes on the canvas")
        assert sorted(types) == sorted(["CheckpointLoader", "TextEncode", "TextEncode", "EmptyLatent", "Sampler",
                                        "VAEDecode", "SaveImage"])

        click_when_ready(lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "button")
                                  if b.text.strip() == "Run" and b.is_displayed()], 20, "the Run button")
        shown = wait_for(lambda: browser.execute_script(
            "return Array.from(document.images).filter(i => i.src.includes('/api/view') && i.complete "
            "&& i.naturalWidth > 0).map(i => [i.src, i.naturalWidth, i.naturalHeight])"), 120,
            "the output image on the page")
        assert shown[0][1:] == [64, 64] and "filename=txt2img_" in shown[0][0]
        history = editor_server.http.get("/api/history").json()
        assert [h["status"]["status_str"] for h in history.values()] == ["success"]
        severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        if os.environ.get("LDMGRAPH_SERVER_SCREENSHOT"):
            browser.find_element(By.CSS_SELECTOR, "button[aria-label^='Workflows']").click()
            time.sleep(1)
            browser.save_screenshot(os.environ["LDMGRAPH_SERVER_SCREENSHOT"])
    except BaseException:
        browser.save_screenshot(str(editor_server.data_dir.parent / "failure.png"))
        print("screenshot of the failure:", editor_server.data_dir.parent / "failure.png")
        raise
    finally:
        browser.quit()
