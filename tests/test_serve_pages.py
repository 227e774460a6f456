"""The server's pages in headless Chromium that can reach no host but 127.0.0.1: /docs and /redoc render from
assets the server serves itself, and the web page fits 1280 px with a failed model's engine error in one line."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import onnx
import pytest

from luodi.package import write_package
from serve_helpers import Server, running

webdriver = pytest.importorskip("selenium.webdriver")

# A long model name, as real ones are ("efficientnet-lite0-int8-..."): a name is never cut, but must wrap.
FAILING = "detector-int8-per-channel-calibrated-on-coco-val2017-ethos-u65-256-vela-optimised-for-size-v3"


def engine_failing_package(source: Path, out: Path) -> None:
    """``source`` with its onnxruntime artifact's Relu renamed to an op onnxruntime does not have, and the manifest's
    pins updated, so that the package reads fine and the engine itself refuses it with its own long message."""
    with zipfile.ZipFile(source) as z:
        manifest = json.loads(z.read("manifest.json"))
        members = {n: z.read(n) for n in z.namelist() if n != "manifest.json"}
    (name,) = [n for n in members if n.startswith("targets/onnxruntime")]
    model = onnx.load_from_string(members[name])
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "NoSuchOp"
    members[name] = model.SerializeToString()
    manifest["targets"] = [t for t in manifest["targets"] if t.get("backend") == "onnxruntime"]
    write_package(out, manifest, members)


@pytest.fixture(scope="module")
def server(cnn_package: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(cnn_package, repo / "cnn.luodi")
    engine_failing_package(cnn_package, repo / f"{FAILING}.luodi")
    with running(repo, "--poll-s", "0", log=tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (make test installs them)")
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        # every host name but the loopback address resolves to nothing: a CDN asset cannot load
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--window-size=1280,800",
    ):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield driver
    finally:
        driver.quit()


def requested_hosts(driver) -> set[str]:
    """The hosts of every request the page sent since the last call (Chromium's performance log), leaving out those
    the page's Content-Security-Policy stopped before they left the browser."""
    sent, blocked = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(params["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                sent[params["requestId"]] = url.hostname
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    return {host for rid, host in sent.items() if rid not in blocked}


def test_docs_and_redoc_render_with_no_network(server: Server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    requested_hosts(browser)  # drop what came before
    browser.get(server.base + "/docs")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")]
    assert "/v2/health/ready" in paths and "/v2/models/{name}/infer" in paths and "/v2/models/{name}/stats" in paths
    assert requested_hosts(browser) == {"127.0.0.1"}

    browser.get(server.base + "/redoc")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']"))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "luodi model server" in text and "/v2/models/{name}/infer" in text
    assert requested_hosts(browser) == {"127.0.0.1"}

    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert httpx.get(f"{server.base}/luodi/docs-assets/{asset}").status_code == 200


def test_web_page_fits_1280_px_and_a_failed_models_reason_is_one_line_until_opened(server: Server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (failed,) = [m for m in httpx.get(f"{server.base}/luodi/models").json()["models"] if m["name"] == FAILING]
    reason = failed["reason"]
    assert failed["state"] == "UNAVAILABLE" and "NoSuchOp" in reason and len(reason) > 200  # the engine's own words

    wait = WebDriverWait(browser, 30)
    browser.get(server.base + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#models tr.failed details.reason"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#models td.READY"))
    assert browser.execute_script("return window.innerWidth") == 1280
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280

    summary = browser.find_element(By.CSS_SELECTOR, "#models tr.failed details.reason summary")
    one_line = browser.execute_script(
        "const s = arguments[0], cs = getComputedStyle(s);"
        "return {height: s.getBoundingClientRect().height,"
        " line: parseFloat(cs.lineHeight) || 1.3 * parseFloat(cs.fontSize),"
        " cut: s.scrollWidth > s.clientWidth, overflow: cs.textOverflow};",
        summary,
    )
    assert one_line["height"] < 1.6 * one_line["line"], one_line  # one line, not a row blown up by the error
    assert one_line["cut"] and one_line["overflow"] == "ellipsis", one_line
    assert summary.text.startswith("version 1 (")

    summary.click()  # the whole reason on demand, wrapped inside the table
    # Each check reads the page in one script: the table is rebuilt every second, so an element found in one call
    # can be gone by the next (a stale element reference, not a page fault).
    shown, text = browser.execute_script(
        "const p = document.querySelector('#models tr.failed details.reason pre');"
        "return [p.getClientRects().length > 0 && p.offsetHeight > 0, p.innerText];"
    )
    assert shown and text == reason
    browser.execute_script("return new Promise((done) => setTimeout(done, 1500))")  # the page refreshes every second
    assert browser.execute_script("return document.querySelector('#models tr.failed details.reason').open")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280
