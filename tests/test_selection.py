"""backend="auto": the fastest target measured on this host within the accuracy budget, with reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

import luodi
from conftest import installed
from luodi import selection
from luodi.errors import OptionError


def test_single_candidate_needs_no_timing(cnn_package):
    target, why = selection.select_target(luodi.Package(cnn_package))
    assert target["backend"] == "onnxruntime"
    assert "the only target" in why and "reference" in why


def test_by_name_is_taken_as_given(cnn_package):
    target, why = selection.select_target(luodi.Package(cnn_package), backend="reference")
    assert target["backend"] == "reference" and why.endswith("asked for by name")


def test_unknown_budget_is_an_error(cnn_package, tmp_path, cnn_model):
    with pytest.raises(luodi.PackageError, match="accuracy budget"):
        selection.select_target(luodi.Package(cnn_package), accuracy_budget="fp8")
    with pytest.raises(luodi.CompileError, match="accuracy budget"):
        luodi.compile(cnn_model, tmp_path / "x.luodi", accuracy_budget="fp8")


def test_tune_stores_timings_for_this_host(tmp_path, cnn_model):
    pkg = luodi.compile(cnn_model, tmp_path / "t.luodi", targets=["onnxruntime", "reference"], tune=True)
    ort_t, ref_t = pkg.targets
    assert ort_t["timing"]["host"] == selection.host_key() and ort_t["timing"]["median_ms"] > 0
    assert "timing" not in ref_t  # the reference is never a candidate
    assert pkg.manifest["accuracy_budget"] == "fp32"


@pytest.mark.skipif(not installed("openvino"), reason="needs a second engine: pip install 'luodi[openvino]'")
def test_auto_picks_the_fastest_measured_and_caches_it(tmp_path, cnn_model, monkeypatch):
    pkg = luodi.compile(cnn_model, tmp_path / "two.luodi", targets=["onnxruntime", "openvino"])
    calls = []
    real_measure = selection.measure_many  # a spy: the real measurement runs, the calls are recorded
    monkeypatch.setattr(
        selection,
        "measure_many",
        lambda arts, *a, **k: calls.extend(x.backend for x in arts.values()) or real_measure(arts, *a, **k),
    )
    with luodi.Session(pkg.path) as s:
        assert sorted(calls) == ["onnxruntime", "openvino"]
        cached = selection.TimingCache().get(f"{pkg.manifest_sha256}:cpu")
        assert set(cached) == {"onnxruntime:fp32", "openvino:fp32"}
        fastest = min(cached, key=cached.get)
        assert f"{s.backend}:{s.precision}" == fastest
        assert "fastest measured on this host" in s.selection and "ms" in s.selection
        x = np.ones((2, 3, 16, 16), np.float32)
        assert s.run({"x": x})["y"].shape == (2, 5)
    calls.clear()
    with luodi.Session(pkg.path) as again:  # measured once per host and package
        assert calls == [] and again.backend == s.backend
    data = json.loads((selection.cache_dir() / "timings.json").read_text())
    assert pkg.manifest_sha256 + ":cpu" in data[selection.host_key()]


@pytest.mark.skipif(not installed("torch"), reason="needs torch for a bf16 target: pip install 'luodi[torch]'")
@pytest.mark.slow
def test_bf16_is_never_chosen_silently(tmp_path, effnet_source):
    # torch's CPU autocast runs bf16 on any x86 CPU (emulated where the CPU has no bf16), so this
    # holds on every host; OpenVINO's bf16 exists only on CPUs with AVX512_BF16/AMX.
    strict = luodi.compile(effnet_source, tmp_path / "b.luodi", targets=["torch:bf16", "onnxruntime"])
    bf16 = strict.find_target("torch", "bf16")
    assert bf16["verification"]["passed"]  # fine for bf16 ...
    assert not selection.within_budget(bf16, "fp32")  # ... but not fp32-accurate
    with luodi.Session(strict.path) as s:
        assert s.backend == "onnxruntime"
        assert "torch:bf16: its measured error is outside the 'fp32' accuracy budget" in s.selection
    with luodi.Session(strict.path, accuracy_budget="bf16") as s:
        assert "torch:bf16" in s.selection  # now a candidate, measured against onnxruntime


@pytest.mark.skipif(not installed("openvino"), reason="needs a second engine: pip install 'luodi[openvino]'")
def test_a_damaged_target_does_not_stop_auto(tmp_path, cnn_model):
    import zipfile

    pkg = luodi.compile(cnn_model, tmp_path / "two.luodi", targets=["openvino", "onnxruntime"])
    bad = tmp_path / "damaged.luodi"
    with zipfile.ZipFile(pkg.path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "targets/openvino-fp32/model.bin":
                data = bytes(len(data))
            dst.writestr(info.filename, data)
    with luodi.Session(bad) as s:
        assert s.backend == "onnxruntime"
        assert "openvino:fp32: could not be loaded to time it" in s.selection and "sha256" in s.selection


@pytest.mark.skipif(not installed("openvino"), reason="needs a second engine: pip install 'luodi[openvino]'")
def test_auto_keeps_the_engine_that_won_the_timing_round(tmp_path, cnn_model, monkeypatch):
    """auto loads each candidate once, reads each target's files once, and the session runs the winner's very
    engine from the timing round (the loser closed); engine options go to the candidates that take them."""
    from luodi.backends.base import Backend, Engine

    pkg = luodi.compile(cnn_model, tmp_path / "two.luodi", targets=["onnxruntime", "openvino"])
    loads, reads, closed = [], [], []
    real_load, real_artifact, real_close = Backend.load, luodi.Package.artifact, Engine.close

    def counted_load(self, artifact, options=None):  # the real load; the calls are recorded
        engine = real_load(self, artifact, options)
        loads.append((self.name, dict(options.extra), engine))
        return engine

    monkeypatch.setattr(Backend, "load", counted_load)
    monkeypatch.setattr(luodi.Package, "artifact", lambda p, t: reads.append(t["backend"]) or real_artifact(p, t))
    monkeypatch.setattr(Engine, "close", lambda e: closed.append(e) or real_close(e))
    with luodi.Session(pkg.path, options={"performance_hint": "THROUGHPUT"}) as s:
        assert "fastest measured on this host" in s.selection
        assert sorted(name for name, _, _ in loads) == ["onnxruntime", "openvino"]  # once each, the winner too
        assert sorted(reads) == ["onnxruntime", "openvino"]  # each target's files read (decrypted) once
        assert {name: extra for name, extra, _ in loads} == {
            "onnxruntime": {},  # an option only openvino takes never reaches onnxruntime
            "openvino": {"performance_hint": "THROUGHPUT"},
        }
        (winner,) = [e for name, _, e in loads if name == s.backend]
        (loser,) = [e for name, _, e in loads if name != s.backend]
        assert s._engine is winner and winner not in closed and loser in closed
        assert s.run({"x": np.ones((2, 3, 16, 16), np.float32)})["y"].shape == (2, 5)
    assert winner in closed
    with pytest.raises(OptionError, match="no backend of two.luodi's targets has a load option 'perfomance_hint'"):
        luodi.Session(pkg.path, options={"perfomance_hint": "LATENCY"})
    with pytest.raises(OptionError, match="performance_hint' must be str"):
        luodi.Session(pkg.path, options={"performance_hint": 1})
    with pytest.raises(OptionError, match="backend 'onnxruntime' has no load option 'performance_hint'"):
        luodi.Session(pkg.path, backend="onnxruntime", options={"performance_hint": "LATENCY"})  # by name: as before
