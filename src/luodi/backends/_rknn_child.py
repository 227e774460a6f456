"""The rknn toolchain's side: rknn-toolkit2 (or rknn-toolkit-lite2 on a board) driven in a bare worker process.

Runs in the toolchain's own environment (numpy 1.26, onnx 1.18, the toolkit) as the factory of a bare
``luodi.worker.Worker``: it imports only the standard library, numpy and the toolkit, never anything of luodi (the
environment has none of luodi's dependencies). Files come in and go out as uint8 arrays; the toolkit reads and
writes paths only, so they live in a private temporary folder removed on close.

One handler holds one RKNN object: ``build`` converts an ONNX graph (int8: calibrated on the arrays sent, through
``hybrid_quantization_step1`` + ``step2``; or in two calls, ``calibrate`` (step 1, returning each int8 tensor's
calibrated range) then ``build`` with ``calibrated`` and the ``ranges`` the parent chose, written in the config's
``min``/``max`` before step 2, so the quantisation config is a file that a later session can rebuild
the same model from), exports the .rknn for the board, and starts the simulator on what it built (the toolkit's
simulator cannot run a .rknn loaded back from a file, so the session that builds is the one that simulates);
``rebuild`` does the same from what ``build`` returned (the int8 config files, or the ONNX graph for fp16);
``run`` runs the simulator or, on a board, the NPU (``npu``: RKNNLite with the exported .rknn).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from ._child_log import redirected

# What the simulator needs to rebuild an int8 model exactly (hybrid_quantization_step2's three inputs).
INT8_FILES = ("model.model", "model.data", "model.quantization.cfg")


class _Quiet:
    """The toolkit prints progress bars and notes on stdout/stderr (fd 1 and 2): keep them, to give the last lines
    with an error, and show none of it otherwise."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "toolkit.log")

    def __call__(self) -> Any:
        return redirected(self.path)

    def tail(self, n: int = 6) -> str:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        keep = [ln.strip() for ln in lines if ln.strip().startswith(("E ", "\x1b[1;31mE", "ValueError", "Error"))]
        return " | ".join((keep or lines)[-n:])[-1500:]


class RknnHandler:
    def __init__(self, args: dict[str, Any]) -> None:
        self.dir = tempfile.mkdtemp(prefix="luodi-rknn-")
        self.quiet = _Quiet(self.dir)
        self.platform = str(args.get("platform") or "rk3588")
        self.device = str(args.get("device") or "simulator")
        self.rknn: Any = None
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.calibrated = False  # step 1 has run in this session (``calibrate``): its files are in self.dir
        self.info = {"toolkit": _toolkit_version(self.device), "python": sys.version.split()[0]}

    # -- the protocol ---------------------------------------------------------------------------------------------
    def call(self, op: str, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        if op == "platforms":
            return {"platforms": _platforms()}, {}
        if op == "calibrate":
            return self._calibrate(args, arrays)
        if op == "build":
            return self._build(args, arrays)
        if op == "rebuild":
            return self._rebuild(args, arrays)
        if op == "load_npu":
            return self._load_npu(args, arrays)
        if op == "run":
            return {}, self._run(arrays)
        if op == "layerwise":
            return self._layerwise(args, arrays)
        raise ValueError(f"unknown operation {op!r}")

    def close(self) -> None:
        if self.rknn is not None:
            with contextlib.suppress(Exception), self.quiet():
                self.rknn.release()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- building -------------------------------------------------------------------------------------------------
    def _new(self, args: dict[str, Any]) -> Any:
        from rknn.api import RKNN

        if self.rknn is not None:
            with contextlib.suppress(Exception), self.quiet():
                self.rknn.release()
        with self.quiet():
            r = RKNN(verbose=False)
            channels = [int(c) for c in args.get("channels", [])]
            config: dict[str, Any] = {"target_platform": self.platform}
            if channels:  # identity: luodi's pipeline does the pre-processing
                config["mean_values"] = [[0.0] * c for c in channels]
                config["std_values"] = [[1.0] * c for c in channels]
            if args.get("algorithm"):
                config["quantized_algorithm"] = str(args["algorithm"])
            self._check(r.config(**config), "config")
        self.rknn = r
        self.inputs = [str(n) for n in args["inputs"]]
        self.outputs = [str(n) for n in args["outputs"]]
        return r

    def _check(self, status: Any, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"rknn-toolkit2 {what} failed (status {status}): {self.quiet.tail()}")

    def _load_onnx(self, r: Any, args: dict[str, Any], model: np.ndarray) -> str:
        path = os.path.join(self.dir, "model.onnx")
        _writable_onnx(model.tobytes(), path)
        shapes = [[int(d) for d in args["shapes"][n]] for n in self.inputs]
        with self.quiet():
            self._check(
                r.load_onnx(model=path, inputs=self.inputs, input_size_list=shapes, outputs=self.outputs), "load_onnx"
            )
        return path

    def _calibrate(self, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """int8 step 1 alone (the toolkit's calibration); returns each int8 tensor's calibrated ``[min, max]`` (its
        config's, the model's int8 boundaries ``NAME_int8`` left out) for the caller to choose ranges, which a
        ``build`` with ``calibrated`` then writes in before step 2."""
        r = self._new(args)
        self._load_onnx(r, args, arrays["model"])
        dataset = self._dataset(arrays)
        cwd = os.getcwd()
        os.chdir(self.dir)  # step 1 writes its three files into the working directory
        try:
            with self.quiet():
                self._check(r.hybrid_quantization_step1(dataset=dataset), "hybrid_quantization_step1 (calibration)")
        finally:
            os.chdir(cwd)
        self._rename_step1()
        self.calibrated = True
        return {"ranges": _int8_ranges(os.path.join(self.dir, "model.quantization.cfg"))}, {}

    def _build(self, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        out: dict[str, np.ndarray] = {}
        header: dict[str, Any] = {}
        if args["precision"] == "int8":
            if not (args.get("calibrated") and self.calibrated):
                self._calibrate(args, arrays)
            cfg = os.path.join(self.dir, "model.quantization.cfg")
            if args.get("ranges"):
                header["ranges_set"] = _set_ranges(
                    cfg, {str(k): (float(v[0]), float(v[1])) for k, v in args["ranges"].items()}
                )
            if args.get("float_tensors"):
                layers = _operands_of(cfg, [str(t) for t in args["float_tensors"]], self.outputs)
                if layers:
                    _mark_float(cfg, layers)
                header["float_layers"] = layers
            r = self._new(args)
            self._step2(r)
            for name in INT8_FILES:
                out[f"file:{name}"] = _file_array(os.path.join(self.dir, name))
            floats = set(header.get("float_layers", []))  # an output kept in float16 leaves the NPU as float
            header["io"] = {
                n: p for n, p in _io_params(cfg, self.inputs, self.outputs).items() if f"{n}_int8" not in floats
            }
            header["layers"] = _quantised_tensors(cfg)
        else:
            r = self._new(args)
            self._load_onnx(r, args, arrays["model"])
            with self.quiet():
                self._check(r.build(do_quantization=False), "build")
        rknn_path = os.path.join(self.dir, "model.rknn")
        with self.quiet():
            self._check(r.export_rknn(rknn_path), "export_rknn")
            self._check(r.init_runtime(), "init_runtime (simulator)")
        out["file:model.rknn"] = _file_array(rknn_path)
        return header, out

    def _rebuild(self, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        r = self._new(args)
        if args["precision"] == "int8":
            for name in INT8_FILES:
                with open(os.path.join(self.dir, name), "wb") as f:
                    f.write(arrays[f"file:{name}"].tobytes())
            self._step2(r)
        else:
            self._load_onnx(r, args, arrays["model"])
            with self.quiet():
                self._check(r.build(do_quantization=False), "build")
        with self.quiet():
            self._check(r.init_runtime(), "init_runtime (simulator)")
        return {}, {}

    def _step2(self, r: Any) -> None:
        files = [os.path.join(self.dir, n) for n in INT8_FILES]
        with self.quiet():
            self._check(r.hybrid_quantization_step2(*files), "hybrid_quantization_step2")

    def _rename_step1(self) -> None:
        """Step 1 names its files after the ONNX file (model.model, model.data, model.quantization.cfg)."""
        missing = [n for n in INT8_FILES if not os.path.isfile(os.path.join(self.dir, n))]
        if missing:
            raise RuntimeError(f"rknn-toolkit2 calibration wrote no {missing}: {self.quiet.tail()}")

    def _dataset(self, arrays: dict[str, np.ndarray]) -> str:
        """The calibration samples as .npy files, one line per sample listing each input's file (dataset.txt)."""
        folder = os.path.join(self.dir, "calibration")
        os.makedirs(folder, exist_ok=True)
        stacks = [arrays[f"calib:{n}"] for n in self.inputs]
        count = len(stacks[0])
        lines = []
        for i in range(count):
            paths = []
            for k, stack in enumerate(stacks):
                path = os.path.join(folder, f"{i}_{k}.npy")
                np.save(path, np.ascontiguousarray(stack[i]))
                paths.append(path)
            lines.append(" ".join(paths))
        path = os.path.join(self.dir, "dataset.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    # -- running --------------------------------------------------------------------------------------------------
    def _load_npu(self, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        from rknnlite.api import RKNNLite

        path = os.path.join(self.dir, "model.rknn")
        with open(path, "wb") as f:
            f.write(arrays["file:model.rknn"].tobytes())
        self.inputs = [str(n) for n in args["inputs"]]
        self.outputs = [str(n) for n in args["outputs"]]
        r = RKNNLite()
        self.rknn = r
        self._check(r.load_rknn(path), "load_rknn")
        mask = {
            "auto": RKNNLite.NPU_CORE_AUTO,
            "0": RKNNLite.NPU_CORE_0,
            "1": RKNNLite.NPU_CORE_1,
            "2": RKNNLite.NPU_CORE_2,
            "0_1": RKNNLite.NPU_CORE_0_1,
            "0_1_2": RKNNLite.NPU_CORE_0_1_2,
        }[str(args.get("core_mask") or "auto")]
        self._check(r.init_runtime(core_mask=mask), "init_runtime (npu)")
        self.pass_through = bool(args.get("pass_through"))
        return {}, {}

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.rknn is None:
            raise RuntimeError("no model is built or loaded in this rknn session")
        feeds = [np.ascontiguousarray(arrays[n]) for n in self.inputs]
        formats = ["nchw" if a.ndim == 4 else None for a in feeds]
        kwargs: dict[str, Any] = {"inputs": feeds, "data_format": formats}
        if self.device == "npu" and getattr(self, "pass_through", False):
            # pass-through hands the buffer to the NPU in its native layout: NHWC for a 4-D int8 input on RK3588
            passed = [a.dtype == np.int8 for a in feeds]
            kwargs["inputs"] = [
                np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if p and a.ndim == 4 else a for a, p in zip(feeds, passed)
            ]
            kwargs["data_format"] = ["nhwc" if p and a.ndim == 4 else f for a, p, f in zip(feeds, passed, formats)]
            kwargs["inputs_pass_through"] = [1 if p else 0 for p in passed]
        with self.quiet():
            outs = self.rknn.inference(**kwargs)
        if outs is None or len(outs) != len(self.outputs):
            raise RuntimeError(
                f"rknn inference returned {0 if outs is None else len(outs)} outputs: {self.quiet.tail()}"
            )
        return {n: np.asarray(o) for n, o in zip(self.outputs, outs)}

    def _layerwise(self, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """The toolkit's accuracy_analysis on one sample: per-layer cosine of the quantised simulation against its
        own float run (the simulator's error table)."""
        if self.rknn is None:
            raise RuntimeError("no model is built in this rknn session")
        paths = []
        for k, n in enumerate(self.inputs):
            path = os.path.join(self.dir, f"analysis_{k}.npy")
            np.save(path, np.ascontiguousarray(arrays[n]))
            paths.append(path)
        out_dir = os.path.join(self.dir, "snapshot")
        shutil.rmtree(out_dir, ignore_errors=True)
        with self.quiet():
            self._check(self.rknn.accuracy_analysis(inputs=paths, output_dir=out_dir), "accuracy_analysis")
        report = os.path.join(out_dir, "error_analysis.txt")
        with open(report, encoding="utf-8", errors="replace") as f:
            return {"report": f.read()[:400_000]}, {}


def _toolkit_version(device: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("rknn-toolkit-lite2", "rknn-toolkit2") if device == "npu" else ("rknn-toolkit2",):
        with contextlib.suppress(PackageNotFoundError):
            return version(dist)
    return ""


def _platforms() -> list[str]:
    """The platforms rknn-toolkit2's config() takes, as its documentation lists them."""
    from rknn.api import RKNN

    doc = " ".join((RKNN.config.__doc__ or "").split())
    start = doc.find(":param target_platform:")
    text = doc[start : doc.find(":param", start + 1)] if start >= 0 else ""
    text = text.split("currently support", 1)[-1].split(". default")[0]
    return [n.strip(" :/.") for n in text.split("/") if n.strip(" :/.")]


def _file_array(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)


def _writable_onnx(data: bytes, path: str) -> None:
    """Write the graph with every small initializer's values in typed fields instead of ``raw_data``.

    onnx 1.18 gives read-only arrays for raw_data initializers, and the toolkit writes into them when it merges a
    Pad into a Conv ("assignment destination is read-only" on EfficientNet-Lite0); values it reads from typed fields
    come back as fresh, writable arrays.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(data)
    for i, t in enumerate(model.graph.initializer):
        if t.raw_data and len(t.raw_data) <= 4096:
            array = np.array(numpy_helper.to_array(t))
            fresh = onnx.helper.make_tensor(t.name, t.data_type, array.shape, array.flatten().tolist())
            model.graph.initializer[i].CopyFrom(fresh)
    onnx.save(model, path)


def _yaml(path: str) -> Any:
    from ruamel.yaml import YAML

    with open(path, encoding="utf-8") as f:
        return YAML(typ="safe").load(f)


def _io_params(cfg: str, inputs: list[str], outputs: list[str]) -> dict[str, list]:
    """The int8 scale and zero point of each input and output as the board sees them: the config's ``NAME_int8``
    entries (the toolkit makes the model's float inputs and outputs int8 "for performance")."""
    params = (_yaml(cfg) or {}).get("quantize_parameters", {})
    found: dict[str, list] = {}
    for name in [*inputs, *outputs]:
        p = params.get(f"{name}_int8")
        if p and p.get("dtype") == "int8" and len(p.get("scale") or []) == 1 and len(p.get("zero_point") or []) == 1:
            found[name] = [float(p["scale"][0]), int(p["zero_point"][0]), "int8"]
    return found


def _quantised_tensors(cfg: str) -> list[str]:
    params = (_yaml(cfg) or {}).get("quantize_parameters", {})
    return [n for n, p in params.items() if isinstance(p, dict) and p.get("dtype") == "int8"]


def _operands_of(cfg: str, tensors: list[str], outputs: list[str]) -> list[str]:
    """The toolkit's tensors (its config's ``quantize_parameters`` keys, what ``custom_quantize_layers`` names) that
    stand for ``tensors`` (ONNX tensor names): the same name, or one derived from it (``y`` -> ``y_mm``, a Gemm the
    toolkit made a Conv; ``t`` -> ``t-rs``, a reshape it added); for a graph output also its int8 boundary
    (``y_int8``), so that the output itself leaves the NPU in float16."""
    params = (_yaml(cfg) or {}).get("quantize_parameters", {})
    wanted = set(tensors)
    boundary = {f"{t}_int8" for t in wanted if t in outputs}
    return [
        k
        for k, p in params.items()
        if isinstance(p, dict)
        and p.get("dtype") == "int8"
        and (
            k in boundary
            or (not k.endswith("_int8") and any(k == t or k.startswith((t + "_", t + "-")) for t in wanted))
        )
    ]


def _int8_ranges(cfg: str) -> dict[str, list[float]]:
    """The calibrated ``[min, max]`` of each per-tensor int8 tensor of the config, but the ``NAME_int8`` boundaries."""
    params = (_yaml(cfg) or {}).get("quantize_parameters", {})
    return {
        str(k): [float(p["min"][0]), float(p["max"][0])]
        for k, p in params.items()
        if isinstance(p, dict)
        and p.get("dtype") == "int8"
        and not str(k).endswith("_int8")
        and len(p.get("min") or []) == 1
        and len(p.get("max") or []) == 1
    }


def _set_ranges(cfg: str, ranges: dict[str, tuple[float, float]]) -> int:
    """Write ``ranges`` (tensor -> (min, max)) over the calibrated ``min`` and ``max`` of those tensors; how many.

    Edited as text, like ``_mark_float``: step 2 refuses a changed ``scale`` or ``zero_point`` (it derives them from
    ``min`` and ``max`` again), and a YAML round trip reformats the values it checks."""
    from ruamel.yaml import YAML

    with open(cfg, encoding="utf-8") as f:
        lines = f.read().split("\n")
    tensor, field, done = None, None, set()
    for i, ln in enumerate(lines):
        if ln.startswith("    ") and not ln.startswith("     ") and ln.rstrip().endswith(":"):
            key = YAML(typ="safe").load(ln.strip() + " 0")
            tensor = str(next(iter(key))) if isinstance(key, dict) and key else None
            field = None
        elif ln.startswith("        ") and not ln.startswith("         ") and ln.rstrip().endswith(":"):
            field = ln.strip()[:-1]
        elif tensor in ranges and field in ("min", "max") and ln.startswith("        -   "):
            lo, hi = ranges[tensor]
            lines[i] = "        -   " + repr(lo if field == "min" else hi)
            done.add(tensor)
            field = None  # one value per tensor (per-tensor activations)
        elif not ln.startswith("    "):
            tensor = field = None
    with open(cfg, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return len(done)


def _mark_float(cfg: str, layers: list[str]) -> None:
    """Keep ``layers`` (tensor names of the toolkit's graph) in float16: hybrid quantisation's custom layers.

    Edited as text: step 2 refuses a config whose calibrated values changed, and a YAML round trip reformats them.
    """
    with open(cfg, encoding="utf-8") as f:
        lines = f.read().split("\n")
    at = next((i for i, ln in enumerate(lines) if ln.startswith("custom_quantize_layers:")), None)
    if at is None:
        raise RuntimeError("the toolkit's quantization config has no custom_quantize_layers section")
    block = ["custom_quantize_layers:"] + ["    '" + n.replace("'", "''") + "': float16" for n in layers]
    if lines[at].strip().endswith("{}"):
        lines[at : at + 1] = block
    else:
        lines[at + 1 : at + 1] = block[1:]
    with open(cfg, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def load(args: dict[str, Any], payload: bytes) -> RknnHandler:
    return RknnHandler(args)
