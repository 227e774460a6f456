"""The onnx2tf toolchain's side: an ONNX graph to a float ``.tflite``, in a bare worker process.

Runs in the toolchain's own environment (TensorFlow 2.19, numpy 1.26, onnx 1.19, onnx2tf) as the factory of a bare
``luodi.worker.Worker``: it imports only the standard library, numpy and the toolchain, never anything of luodi.
The graph comes in as a uint8 array and the ``.tflite`` goes back as one.

onnx2tf is handled at arm's length:

- it only ever sees a copy of the graph in a private temporary folder, and runs with that folder as its working
  directory (it runs ``onnxsim`` over its input file in place, and writes beside it);
- it runs ``onnxsim`` as a command, so the environment's ``bin`` goes first on ``PATH``;
- for a graph whose inputs are all 4-D with 3 channels last (after its own NCHW -> NHWC move) it loads sample images
  for its checks from GitHub unless ``calibration_image_sample_data_20x128x128x3_float32.npy`` is in the working
  directory: a local file of uniform noise is put there, so it never reaches for the network;
- its output goes to a log file (fd 1 and 2), whose last lines come back with an error.

Layout: inputs of rank 3 to 5 keep their NCW/NCHW/NCDHW layout (``keep_ncw_or_nchw_or_ncdhw_input_names``), so the
``.tflite`` reads luodi's canonical tensors. Outputs are what onnx2tf makes them (a 4-D output comes out NHWC):
each ``.tflite`` output is matched to the ONNX output of the same name, and, where the shapes differ, to the axis
permutation under which its values equal onnxruntime's on the same random input. The permutations come back with
the file, for the engine to put the outputs back in the graph's layout.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ._child_log import redirected

SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SIGNATURE = "serving_default"


class _Log:
    """fd 1 and 2 into a log file while the converter runs (TensorFlow writes from C++ too)."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "onnx2tf.log")

    def __call__(self) -> Any:
        return redirected(self.path)

    def tail(self, n: int = 8) -> str:
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        keep = [ln for ln in lines if re.search(r"error|exception|failed", ln, re.IGNORECASE)]
        return " | ".join((keep or lines)[-n:])[-1500:]


class Onnx2tfHandler:
    def __init__(self, args: dict[str, Any]) -> None:
        self.info = {
            "onnx2tf": _version("onnx2tf"),
            "tensorflow": _version("tensorflow-cpu"),
            "python": sys.version.split()[0],
        }

    def call(self, op: str, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        if op == "convert":
            return self._convert(args, arrays["model"])
        raise ValueError(f"unknown operation {op!r}")

    def close(self) -> None:
        pass

    def _convert(self, args: dict[str, Any], model: np.ndarray) -> tuple[dict, dict]:
        inputs = [str(n) for n in args["inputs"]]
        outputs = [str(n) for n in args["outputs"]]
        shapes = {n: [int(d) for d in args["shapes"][n]] for n in inputs}
        folder = tempfile.mkdtemp(prefix="luodi-onnx2tf-")
        log = _Log(folder)
        cwd = os.getcwd()
        path = os.environ.get("PATH", "")
        try:
            src = os.path.join(folder, "model.onnx")
            safe_in, safe_out = _safe_names(model.tobytes(), inputs, outputs, src)
            shapes = {safe_in[n]: shapes[n] for n in inputs}
            rng = np.random.default_rng(0)
            np.save(os.path.join(folder, SAMPLE), rng.random((20, 128, 128, 3), dtype=np.float32))
            os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
            keep = [n for n, s in shapes.items() if 3 <= len(s) <= 5]  # NCW, NCHW, NCDHW stay as they are
            os.chdir(folder)
            started = time.monotonic()
            try:
                with log():
                    import onnx2tf

                    onnx2tf.convert(
                        input_onnx_file_path=src,
                        output_folder_path=os.path.join(folder, "out"),
                        overwrite_input_shape=[f"{n}:{','.join(map(str, s))}" for n, s in shapes.items()],
                        keep_ncw_or_nchw_or_ncdhw_input_names=keep or None,
                        non_verbose=True,
                    )
            except BaseException as exc:  # noqa: BLE001 - the converter fails in many ways; its log says how
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                raise RuntimeError(f"onnx2tf could not convert the model: {detail}; its log: {log.tail()}") from None
            seconds = time.monotonic() - started
            out = os.path.join(folder, "out", "model_float32.tflite")
            if not os.path.isfile(out):
                raise RuntimeError(f"onnx2tf wrote no model_float32.tflite; its log: {log.tail()}")
            with open(out, "rb") as f:
                data = f.read()
            with log():
                boundary = _boundary(data, src, list(safe_in.values()), list(safe_out.values()), shapes)
            boundary["perms"] = {n: boundary["perms"][safe_out[n]] for n in outputs}
        finally:
            os.chdir(cwd)
            os.environ["PATH"] = path
            shutil.rmtree(folder, ignore_errors=True)
        header = {**boundary, "seconds": round(seconds, 2), **self.info}
        return header, {"tflite": np.frombuffer(data, np.uint8)}


def _safe_names(data: bytes, inputs: list[str], outputs: list[str], path: str) -> tuple[dict, dict]:
    """Write the graph to ``path`` with its inputs and outputs renamed ``luodi_in_K`` and ``luodi_out_K``: onnx2tf
    refuses a TensorFlow name out of ``[A-Za-z0-9_.\\/>-]`` or starting with ``/`` (``/model.22/Sigmoid_output_0``)
    and parses ``NAME:SHAPE`` options. The maps from the graph's names to these."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    safe_in = {n: f"luodi_in_{k}" for k, n in enumerate(inputs)}
    safe_out = {n: f"luodi_out_{k}" for k, n in enumerate(outputs)}
    names = {**safe_in, **safe_out}
    taken = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    if any(v in taken for v in names.values()):
        raise RuntimeError("the graph already has tensors named luodi_in_K or luodi_out_K")
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for v in [*graph.input, *graph.output, *graph.value_info]:
        v.name = names.get(v.name, v.name)
    onnx.save(model, path)
    return safe_in, safe_out


def _boundary(data: bytes, src: str, inputs: list[str], outputs: list[str], shapes: dict[str, list[int]]) -> dict:
    """The signature's key of each ONNX input and output, and the permutation that puts each .tflite output back in
    the graph's layout (None where it is already), from one run of both on the same random input."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data, num_threads=1)
    interp.allocate_tensors()
    runner = interp.get_signature_runner(SIGNATURE)
    in_keys = _keys(inputs, list(runner.get_input_details()), "input")
    out_keys = _keys(outputs, list(runner.get_output_details()), "output")
    rng = np.random.default_rng(1)
    feeds = {n: rng.random(shapes[n], dtype=np.float32) for n in inputs}
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    want = dict(zip(outputs, session.run(outputs, feeds)))
    got = runner(**{k: feeds[n] for n, k in zip(inputs, in_keys)})
    perms: dict[str, list[int] | None] = {}
    for name, key in zip(outputs, out_keys):
        perms[name] = _permutation(np.asarray(got[key]), np.asarray(want[name]), name)
    return {"input_keys": in_keys, "output_keys": out_keys, "perms": perms}


def _keys(names: list[str], keys: list[str], what: str) -> list[str]:
    """The signature key of each ONNX name: the same name, else the same name with the characters TensorFlow does
    not take replaced, else (one each) the only one."""
    if len(keys) != len(names):
        raise RuntimeError(f"the .tflite has {len(keys)} {what}s ({keys}); the graph has {len(names)} ({names})")

    def plain(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9]", "_", s).lower()

    found = []
    for n in names:
        key = n if n in keys else next((k for k in keys if plain(k) == plain(n)), None)
        if key is None and len(names) == 1:
            key = keys[0]
        if key is None:
            raise RuntimeError(f"the .tflite has no {what} for the graph's '{n}' (its {what}s: {keys})")
        found.append(key)
    return found


def _permutation(got: np.ndarray, want: np.ndarray, name: str) -> list[int] | None:
    if got.shape == want.shape and _close(got, want):
        return None
    best, err = None, np.inf
    for perm in itertools.permutations(range(got.ndim)):
        moved = np.transpose(got, perm)
        if moved.shape == want.shape:
            e = float(np.max(np.abs(moved - want))) if want.size else 0.0
            if e < err:
                best, err = list(perm), e
    if best is None or not _close(np.transpose(got, best), want):
        raise RuntimeError(
            f"the .tflite's output '{name}' (shape {list(got.shape)}) does not match the graph's (shape "
            f"{list(want.shape)}) under any order of its axes (max abs difference {err:.3g})"
        )
    return best


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return bool(np.max(np.abs(a - b), initial=0.0) <= 1e-2 * max(scale, 1.0))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def load(args: dict[str, Any], payload: bytes) -> Onnx2tfHandler:
    return Onnx2tfHandler(args)
