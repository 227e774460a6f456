"""PyTorch: runs the ``torch.export`` program stored in packages that came from PyTorch.

A model that came from ONNX has no such program, and this backend says so (NotApplicableError) at
compile time. The program keeps the dynamic batch of the export; fp32 runs as exported, bf16 runs it
under CPU autocast (AMX on recent Xeons). torch is imported only when this backend is used.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ModelError, NotApplicableError
from ..tensor import specs_from_onnx
from . import _torch_archive
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions


def _load_program(torch: Any, data: bytes) -> Any:
    """The ExportedProgram in ``data``, which luodi.backends._torch_archive has shown to be data, not code.

    ``torch.export.load`` unpickles whatever the archive marks as a pickle; a package is untrusted input, so the
    archive is checked before torch sees a byte of it, at compile and at every load.
    """
    _torch_archive.check(data)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types for a bad archive
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the stored torch.export program cannot be loaded: {first}") from exc


class TorchEngine(Engine):
    def __init__(
        self,
        module: Any,
        inputs: list,
        outputs: list,
        device: str,
        precision: str,
        normalization: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(inputs, outputs)
        import torch

        self._torch = torch
        self._module = module
        self._in = [s.name for s in inputs]
        self._out = [s.name for s in outputs]
        self._device = torch.device(device)
        self._autocast = precision == "bf16"
        # The ONNX graph may have the pipeline's normalisation folded into its first Conv; the exported
        # program has not, so it normalises here and takes the same pixel-valued input as every engine.
        self._norm: tuple[str, Any, Any] | None = None
        if normalization:
            shape = (1, -1) + (1,) * (len(next(s for s in inputs if s.name == normalization["input"]).shape) - 2)
            mean = torch.tensor(normalization["mean"], dtype=torch.float32, device=self._device).reshape(shape)
            inv_std = 1.0 / torch.tensor(normalization["std"], dtype=torch.float32, device=self._device).reshape(shape)
            self._norm = (normalization["input"], mean, inv_std)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self._device) for n in self._in]
        if self._norm is not None:
            name, mean, inv_std = self._norm
            i = self._in.index(name)
            args[i] = (args[i] - mean) * inv_std
        with torch.inference_mode(), torch.autocast(self._device.type, torch.bfloat16, enabled=self._autocast):
            out = self._module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        # .float(): under autocast outputs may be bf16; the package promises the ONNX dtypes.
        return {
            n: t.detach().float().cpu().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()
            for n, t in zip(self._out, out)
        }

    def close(self) -> None:
        super().close()
        self._module = None


class TorchBackend(Backend):
    name = "torch"
    in_memory = True
    int8_unsupported = "the torch backend runs the float torch.export program; its int8 (PT2E) flow is not wired in"
    precisions = ("fp32", "bf16")
    module = "torch"
    extra = "torch"

    def available(self) -> Availability:
        base = super().available()
        if not base.ok:
            return base
        import torch

        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        return Availability(True, devices=devices, precisions=self.precisions, version=torch.__version__)

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        torch = self.require()
        program = getattr(options.source, "torch_program", None)
        if program is None:
            raise NotApplicableError(
                "the torch backend runs models exported from PyTorch (a torch.export program in the package); "
                "this model came from ONNX: choose another target, e.g. onnxruntime or openvino"
            )
        data = program() if callable(program) else program
        _load_program(torch, data)
        inputs, outputs = specs_from_onnx(model)
        opts: dict[str, Any] = {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]}
        if options.input_normalization:  # folded into the graph's first Conv, not into the exported program
            opts["input_normalization"] = dict(options.input_normalization)
        return Artifact(self.name, options.precision, {"model.pt2": data}, opts)

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        torch = self.require()
        from ..tensor import TensorSpec

        device = options.device
        if device.partition(":")[0] not in self.available().devices:
            raise BackendUnavailableError(
                f"torch has no device '{device}' here (it has {list(self.available().devices)})"
            )
        if options.threads:
            torch.set_num_threads(options.threads)  # process-wide in torch; documented as such
        if "model.pt2" not in artifact.files:
            raise ModelError(f"{artifact.target} artifact has no model.pt2")
        module = _load_program(torch, artifact.files["model.pt2"]).module().to(device)
        inputs = [TensorSpec.from_dict(d) for d in artifact.options["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in artifact.options["outputs"]]
        normalization = artifact.options.get("input_normalization")
        return TorchEngine(module, inputs, outputs, device, artifact.precision, normalization)
