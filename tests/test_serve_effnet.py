"""The server on the real EfficientNet-Lite0 package: the pipeline route, overload, and the web page in Chromium."""

from __future__ import annotations

import shutil
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import httpx
import numpy as np
import pytest

import luodi
from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request
from luodi.zoo.images import skimage_picture
from serve_helpers import Server, running

CATS = range(281, 286)  # ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian


@pytest.fixture(scope="module")
def server(effnet_package: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(effnet_package, repo / "effnet.luodi")
    # one engine thread leaves the other core to the overload test's clients, so that they can out-send the server
    args = (
        "--max-batch-size",
        "8",
        "--max-queue-delay-ms",
        "5",
        "--max-queue-size",
        "16",
        "--poll-s",
        "0",
        "--threads",
        "1",
    )
    with running(repo, *args, log=tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def local(effnet_package: Path):
    with luodi.Session(effnet_package, backend="onnxruntime") as s:
        yield s


def test_pipeline_route_classifies_an_uploaded_photo(server: Server, local) -> None:
    photo = skimage_picture("chelsea")
    with open(photo, "rb") as f:
        r = httpx.post(f"{server.base}/v2/models/effnet/predict?k=3", files={"file": ("chelsea.png", f)}, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    want = local.predict(str(photo), k=3)
    assert [p["index"] for p in result] == [p.index for p in want]
    assert result[0]["index"] in CATS and abs(result[0]["score"] - want[0].score) < 1e-4
    (figures,) = httpx.get(f"{server.base}/luodi/models").json()["models"][0]["versions"]
    assert figures["requests"] >= 1 and figures["mean_compute_ms"] > 0  # the pipeline's model call was batched
    r = httpx.post(f"{server.base}/v2/models/effnet/predict", files={"file": ("x.png", b"not an image")}, timeout=60)
    assert r.status_code == 400 and "image" in r.json()["error"].lower()


@pytest.mark.slow
def test_overload_gets_answers_or_503_and_the_server_stays_up(server: Server, local) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = local.run({"images": x})["logits"]
    body, n = encode_infer_request({"images": x})
    path = "/v2/models/effnet/infer"
    url = server.base + path
    headers = {HEADER_LENGTH: str(n), "Content-Type": "application/octet-stream"}

    def load(clients: int, seconds: float) -> list[tuple[int, float]]:
        """``clients`` threads send back to back for ``seconds`` (and at most 20,000 requests in all)."""
        done: list[tuple[int, float]] = []
        stop = time.monotonic() + seconds
        bad: list[str] = []

        def client() -> None:  # http.client: a keep-alive connection, cheap enough to out-send the server
            http = HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                while time.monotonic() < stop and len(done) < 20_000:
                    http.request("POST", path, body=body, headers=headers)
                    r = http.getresponse()
                    content = r.read()
                    if r.status == 200:
                        y = decode_infer_response(content, r.getheader(HEADER_LENGTH))["logits"]
                        if not np.allclose(y, want, rtol=1e-4, atol=1e-4):
                            bad.append("wrong logits")
                    elif r.status in (429, 503):
                        if int(r.getheader("Retry-After", "0")) < 1:
                            bad.append(f"{r.status} without Retry-After")
                    else:
                        bad.append(f"{r.status}: {content[:200]!r}")
                    done.append((r.status, time.monotonic()))
            finally:
                http.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        assert not bad, bad[:5]
        return done

    load(4, 1.0)  # warm: the first batches of each size are slower
    # The server's capacity is what it answers while saturated (the 200s per second during the storm); the
    # clients offer far more. A second, larger storm runs only if the first did not reach 4x (a loaded host).
    for clients in (48, 96):
        t0 = time.monotonic()
        storm = load(clients, 3.0)
        elapsed = time.monotonic() - t0
        offered = len(storm) / elapsed
        served = sum(code == 200 for code, _ in storm)
        capacity = served / elapsed
        refused = len(storm) - served
        print(f"{clients} clients: capacity {capacity:.1f} req/s; offered {offered:.1f} req/s; {refused} refused")
        if offered >= 4 * capacity:
            break
    assert offered >= 4 * capacity, f"the test offered only {offered / capacity:.1f}x the capacity"
    assert refused > 0 and sum(code == 200 for code, _ in storm) > 0
    assert httpx.get(f"{server.base}/v2/health/ready").status_code == 200
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    assert r.status_code == 200 and server.proc.poll() is None


@pytest.mark.slow
def test_web_page_shows_models_and_classifies_an_uploaded_photo(server: Server, local) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (make test installs them)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server.base + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#models tbody tr td.READY"))
        row = driver.find_element(By.CSS_SELECTOR, "#models tbody tr").text
        assert "effnet" in row and "READY" in row and "onnxruntime" in row
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value=effnet]"))
        photo = skimage_picture("chelsea")
        driver.find_element(By.ID, "file").send_keys(str(photo))
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result tr.prediction"))
        label = driver.find_element(By.CSS_SELECTOR, "#result tr.prediction td.label").text
        index = int(driver.find_element(By.CSS_SELECTOR, "#result tr.prediction td.index").text)
        top = local.predict(str(photo))[0]
        assert index in CATS and (index, label) == (top.index, top.label)
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
