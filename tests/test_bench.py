"""`luodi bench`: the JSON report against its schema with sane values, the CLI's exit codes and errors, the engines'
own profilers through the backends, and the HTML report in headless Chromium (no request leaves the file)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import luodi
from conftest import fcn_model, installed, small_cnn
from luodi.backends import LoadOptions, get_backend
from luodi.errors import OptionError

TARGETS = ["onnxruntime"] + (["openvino"] if installed("openvino") else [])


def luodi_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "cnn.luodi"
    luodi.compile(small_cnn(), out, targets=[*TARGETS, "reference"], name="small-cnn")
    return out


@pytest.fixture(scope="module")
def report(package: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One run of the CLI on every target that runs here, every output written."""
    folder = tmp_path_factory.mktemp("report")
    args = ["bench", str(package), "--batch", "1,4", "--concurrency", "1,2", "--iterations", "60", "--profile"]
    args += ["--top", "4", "--json", str(folder / "r.json"), "--csv", str(folder / "r.csv"), "--html"]
    done = luodi_cli(*args, str(folder / "r.html"))
    assert done.returncode == 0, done.stderr
    assert "latency and throughput" in done.stdout and "per-operator time" in done.stdout
    return json.loads((folder / "r.json").read_text()), folder


def test_json_report_follows_its_schema_with_sane_figures(report: tuple[dict, Path]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from luodi.bench import SCHEMA, SCHEMA_VERSION

    doc, folder = report
    jsonschema.validate(doc, SCHEMA)
    assert doc["schema"] == SCHEMA_VERSION
    # the reference evaluator is left out by default, and says why
    assert [t["target"] for t in doc["targets"]] == [f"{t}:fp32" for t in TARGETS]
    assert [s["target"] for s in doc["skipped"]] == ["reference:fp32"]
    for t in doc["targets"]:
        assert t["error"] is None
        assert [(r["batch"], r["concurrency"]) for r in t["results"]] == [(1, 1), (1, 2), (4, 1), (4, 2)]
        for r in t["results"]:
            assert 0 < r["min_ms"] <= r["p25_ms"] <= r["p50_ms"] <= r["p75_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["p99_ms"] <= r["max_ms"]
            assert r["calls"] == 60 * r["concurrency"] and r["samples"] == r["calls"] * r["batch"]
            assert sum(r["histogram"]["counts"]) == r["calls"]
            if r["concurrency"] == 1:  # one stream: the wall time is the calls' sum plus the loop's own cost
                ideal = r["batch"] * 1000 / r["mean_ms"]
                assert 0.6 * ideal <= r["throughput_per_s"] <= 1.001 * ideal
        cold = t["cold_start"]
        assert cold["load_ms"] > 0 and cold["first_inference_ms"] > 0 and cold["start_ms"] > cold["load_ms"] / 100
        assert cold["peak_rss_mb"] >= cold["baseline_rss_mb"] > 10  # Python with numpy is tens of MB
        assert t["artifact_bytes"] > 1000  # the CNN's weights
        assert t["accuracy"]["metric"] == "cosine" and t["accuracy"]["value"] > 0.9999
        over = t["overhead"]
        assert over["calls"] == 60 and over["session_p50_ms"] > 0 and over["engine_p50_ms"] > 0
        prof = t["profile"]
        assert prof["profiler"] == t["backend"] and 0 < len(prof["ops"]) <= 4
        assert sum(o["percent"] for o in prof["ops"]) <= 100.0 + 1e-6
        assert [o["ms"] for o in prof["ops"]] == sorted((o["ms"] for o in prof["ops"]), reverse=True)
        # the engines keep the graph's names: most of what they ran maps back to a node of the canonical graph
        canonical = {n.name for n in small_cnn().graph.node}
        assert {o["canonical"] for o in prof["ops"]} & canonical
        assert all(o["canonical"] in canonical for o in prof["ops"] if o["canonical"])
    assert doc["pareto"] and set(doc["pareto"]) <= {t["target"] for t in doc["targets"]}
    with open(folder / "r.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * len(TARGETS) and {r["target"] for r in rows} == {f"{t}:fp32" for t in TARGETS}


def test_bad_arguments_are_one_clean_error(package: Path, tmp_path: Path) -> None:
    for args, said in [
        (["-t", "tensorrt"], "the package has no target 'tensorrt'; it has: onnxruntime:fp32"),
        (["--batch", "0"], "--batch takes integers >= 1"),
        (["--batch", "one"], "--batch takes integers separated by commas"),
        (["--duration", "1", "--iterations", "3"], "give --duration or --iterations, not both"),
        (["--input-shape", "x=1x3x16..32x16"], "luodi bench runs at concrete sizes"),
        (["--input-shape", "nope=1x3x16x16"], "--input-shape names 'nope', which is no input"),
    ]:
        done = luodi_cli("bench", str(package), "--iterations", "2", "--no-cold-start", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = luodi_cli("bench", str(tmp_path / "missing.luodi"))
    assert done.returncode == 2 and "no such package" in done.stderr and "Traceback" not in done.stderr


def test_an_onnx_file_is_compiled_and_verified_first(tmp_path: Path) -> None:
    onnx.save(fcn_model(), str(tmp_path / "cnn.onnx"))  # dynamic height and width
    out = tmp_path / "r.json"
    done = luodi_cli(
        "bench", str(tmp_path / "cnn.onnx"), "--iterations", "5", "--no-cold-start", "--input-shape",
        "x=1x3x24x24", "--batch", "2", "--concurrency", "2", "--per-stream-sessions", "--json", str(out), "-q",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["model"]["source"] == "onnx" and [t["target"] for t in doc["targets"]] == ["onnxruntime:fp32"]
    assert doc["settings"]["shapes"] == {"x": [1, 3, 24, 24]}
    (result,) = doc["targets"][0]["results"]
    assert (result["batch"], result["concurrency"], result["calls"]) == (2, 2, 10)
    assert doc["settings"]["streams"] == "one session each" and doc["targets"][0]["cold_start"] is None
    assert doc["targets"][0]["accuracy"]["value"] > 0.9999  # verified while compiling
    assert any("compiled and verified to a temporary package" in n for n in doc["notes"])


@pytest.mark.parametrize("backend", TARGETS)
def test_profiling_is_a_load_option_of_the_backend(package: Path, backend: str) -> None:
    pkg = luodi.Package(package)
    artifact = pkg.artifact(pkg.find_target(backend))
    x = {"x": np.ones((1, 3, 16, 16), np.float32)}
    with get_backend(backend).load(artifact, LoadOptions()) as plain:
        plain.run(x)
        assert plain.profile() is None
    with get_backend(backend).load(artifact, LoadOptions(extra={"profiling": True})) as engine:
        for _ in range(3):
            engine.run(x)
        records = engine.profile()
    assert records and all(r["calls"] == 3 and r["ms"] >= 0 and r["node"] and r["op"] for r in records)
    with pytest.raises(OptionError, match="profiling"):
        get_backend(backend).load(artifact, LoadOptions(extra={"profiling": "yes"}))


def test_html_report_renders_offline_in_chromium(report: tuple[dict, Path], tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (make test installs them)")
    doc, folder = report
    page = folder / "r.html"
    text = page.read_text()
    assert "<script" not in text and " src=" not in text and "<link" not in text
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(page.as_uri())
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, height + 120)
        shot = tmp_path / "bench-report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        names = [t["target"] for t in doc["targets"]]
        results = sum(len(t["results"]) for t in doc["targets"])

        def points(chart: str, target: str | None = None) -> int:
            sel = f"svg#{chart} .point" + (f'[data-target="{target}"]' if target else "")
            return len(driver.find_elements(By.CSS_SELECTOR, sel))

        for name in names:
            assert points("latency", name) == 2 * len(doc["targets"][names.index(name)]["results"])  # median, max
            assert points("batch-scaling", name) == 2 and points("concurrency-scaling", name) == 2
            assert points("pareto", name) == 1 and points("memory", name) == 1
        assert points("latency") == 2 * results
        assert len(driver.find_elements(By.CSS_SELECTOR, 'svg#pareto .point[data-pareto="true"]')) == len(doc["pareto"])
        profiles = driver.find_elements(By.CSS_SELECTOR, "svg[id^=profile-] .point")
        assert len(profiles) == sum(len(t["profile"]["ops"]) for t in doc["targets"])
        for section in driver.find_elements(By.CSS_SELECTOR, "section"):
            legend = [li.text for li in section.find_elements(By.CSS_SELECTOR, ".legend li")]
            assert legend == names
        box = driver.find_element(By.ID, "latency").rect
        assert box["width"] > 600 and box["height"] > 100  # drawn, not collapsed
        # nothing but the file itself was requested
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        sent = [
            json.loads(e["message"])["message"]["params"]["request"]["url"]
            for e in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]
        ]
        assert sent and all(u == page.as_uri() for u in sent), sent
    finally:
        driver.quit()


def _served(text: str, metric: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(metric + "{"))


def test_url_loads_a_kserve_server_with_binary_tensors_and_counts_errors_by_code(package: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from serve_helpers import running

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "cnn.luodi").write_bytes(package.read_bytes())
    with running(repo, "--poll-s", "0", log=tmp_path / "server.log") as server:
        out = tmp_path / "url.json"
        args = ["bench", "--url", server.base, "--model", "cnn", "--concurrency", "1,4", "--batch", "1,2"]
        done = luodi_cli(*args, "--duration", "0.5", "--json", str(out), "-q", timeout=120)
        assert done.returncode == 0, done.stderr
        doc = json.loads(out.read_text())
        assert doc["schema"] == "luodi.bench.url/1" and doc["inputs"] == {
            "x": {"datatype": "FP32", "shape": [-1, 3, 16, 16]}
        }
        assert [(r["batch"], r["concurrency"]) for r in doc["results"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
        for r in doc["results"]:
            assert r["errors"] == {} and r["requests"] > 0
            assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"] < 500
            assert r["throughput_per_s"] == pytest.approx(r["requests"] / r["wall_s"])
            assert r["samples_per_s"] == pytest.approx(r["throughput_per_s"] * r["batch"])
        # the server answered every request counted here (and the few warm-up ones), no more
        answered = _served(httpx.get(server.base + "/metrics").text, "luodi_requests_total")
        counted = sum(r["requests"] for r in doc["results"])
        assert counted <= answered <= counted + 2 * 2 + 10
        # a shape the model refuses: every request answered 400, counted by code; exit status 3
        done = luodi_cli(*args[:5], "--input-shape", "x=1x3x17x17", "--duration", "0.3", "--json", str(out), "-q")
        assert done.returncode == 3, done.stderr
        (row,) = json.loads(out.read_text())["results"]
        assert row["requests"] == 0 and set(row["errors"]) == {"400"} and row["errors"]["400"] > 0
        done = luodi_cli(*args[:3], "--model", "nope", "--duration", "0.3")
        assert done.returncode == 2 and "no model 'nope'" in done.stderr and "Traceback" not in done.stderr
