"""luodi: take a trained model into a product on any hardware.

One Session API over many inference engines, an offline compiler to a self-contained .luodi package,
and accuracy verified against a float reference. Engines are imported only when used.
"""

from __future__ import annotations

from ._version import __version__
from .telemetry import quiet_onnxruntime  # noqa: E402

quiet_onnxruntime()  # before anything imports onnxruntime: it records usage from its import on

from .backends import Availability, Backend, Engine, backend_names, get_backend  # noqa: E402
from .compiler import compile  # noqa: E402
from .compiler.export import export  # noqa: E402
from .errors import (  # noqa: E402
    BackendError,
    BackendNotFoundError,
    BackendUnavailableError,
    CompileError,
    DTypeError,
    EngineCrashedError,
    ExportError,
    FailedTargetError,
    InputError,
    IntegrityError,
    KeyRequiredError,
    LicenseError,
    LicenseExpiredError,
    LicenseMachineError,
    LicenseModelError,
    LicenseSessionsError,
    LicenseSignatureError,
    LuodiError,
    MissingExtraError,
    MissingInputError,
    ModelError,
    NotApplicableError,
    PackageError,
    PipelineError,
    ShapeError,
    StateError,
    UnknownTensorError,
    UnsupportedOpError,
    VerificationError,
)
from .package import Package  # noqa: E402
from .session import Session  # noqa: E402
from .tensor import TensorSpec  # noqa: E402

__all__ = [
    "Availability",
    "Backend",
    "BackendError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "CompileError",
    "DTypeError",
    "Engine",
    "EngineCrashedError",
    "ExportError",
    "FailedTargetError",
    "InputError",
    "IntegrityError",
    "KeyRequiredError",
    "LicenseError",
    "LicenseExpiredError",
    "LicenseMachineError",
    "LicenseModelError",
    "LicenseSessionsError",
    "LicenseSignatureError",
    "LuodiError",
    "MissingExtraError",
    "MissingInputError",
    "ModelError",
    "NotApplicableError",
    "Package",
    "PackageError",
    "PipelineError",
    "Session",
    "ShapeError",
    "StateError",
    "TensorSpec",
    "UnknownTensorError",
    "UnsupportedOpError",
    "VerificationError",
    "__version__",
    "backend_names",
    "compile",
    "export",
    "get_backend",
]
