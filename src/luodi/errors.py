"""Every failure a user can cause, as a LuodiError subclass whose message says what to do.

Only exception classes live here; raising sites build the message, because they know the context.
"""

from __future__ import annotations

import struct
import zipfile
import zlib

# What zipfile (and numpy's .npz reader over it) raises on a damaged or hostile archive: a bad header or CRC, a
# truncated stream, an unknown compression method, an "extract version" past what zipfile reads or a flipped
# "encrypted" flag (NotImplementedError, RuntimeError), a corrupt deflate stream (zlib.error), a short record
# (struct.error), a name that is not UTF-8 (a ValueError). Catch this tuple wherever untrusted zip bytes are opened.
ZIP_ERRORS = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, NotImplementedError, RuntimeError, struct.error
)  # fmt: skip


class LuodiError(Exception):
    """Base class of every error luodi raises on purpose."""


class InputError(LuodiError, ValueError):
    """A tensor given to a session does not fit the model."""


class UnknownTensorError(InputError, KeyError):
    """A tensor name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(InputError):
    """A tensor whose shape does not match the model's input."""


class DTypeError(InputError, TypeError):
    """A tensor whose element type does not match the model's input."""


class MissingInputError(InputError):
    """forward() was called before every input was set."""


class StateError(LuodiError, RuntimeError):
    """A call made in the wrong order, e.g. get_tensor on an output before forward()."""


class ModelError(LuodiError):
    """The model file or graph given to luodi is not a valid model."""


class ExportError(ModelError):
    """A PyTorch model could not be exported (an unsupported operator or construct); names module and op."""


class PackageError(LuodiError):
    """A .luodi package is corrupt, truncated, or not a luodi package at all."""


class IntegrityError(PackageError):
    """A package member does not match the checksum its manifest pins."""


class FailedTargetError(PackageError):
    """A target failed at compile time (kept in the package with its reason); load it only with allow_failed=True."""


class BackendError(LuodiError):
    """Something about an inference engine: not known, not installed, or it failed."""


class OptionError(BackendError, ValueError):
    """An engine option (``Session(options=...)``, compile options) the backend does not take, or of the wrong type."""


class BackendNotFoundError(BackendError):
    """No backend of that name is registered."""


class BackendUnavailableError(BackendError):
    """The backend is known but cannot run here (engine not installed, no device)."""


class EngineCrashedError(BackendError):
    """An engine's worker process died (a signal, an exit): the call failed, and the worker is being restarted."""


class NotApplicableError(BackendError):
    """The backend cannot compile this kind of model at all (e.g. torch for a model that came from ONNX)."""


class UnsupportedOpError(BackendError):
    """The engine cannot run one of the model's operators."""


class CompileError(LuodiError):
    """Compiling a target failed."""


class VerificationError(CompileError):
    """A compiled target's outputs are further from the reference than its tolerance."""


class PipelineError(LuodiError):
    """A pre/post-processing step could not handle its input or its spec."""


class MissingExtraError(LuodiError, ImportError):
    """A feature needs a Python package that is not installed; the message names the luodi extra."""


class ServeError(LuodiError):
    """Something the model server was asked that it cannot do (base of the serving errors)."""


class ProtocolError(ServeError, InputError):
    """An inference request does not follow the KServe v2 protocol (bad JSON, datatype, shape, binary sizes)."""


class ModelNotFoundError(ServeError, KeyError):
    """The server's repository has no model (or version) of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelUnavailableError(ServeError):
    """The model exists but is not ready: loading, failed to load, unloaded, or the server is shutting down."""


class OverloadedError(ServeError):
    """The model's request queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ServeError, TimeoutError):
    """A request was not answered within its timeout."""


class LicenseError(LuodiError):
    """A licence does not allow this use; ``reason`` says which check failed (see the subclasses)."""

    reason = "invalid"


class LicenseSignatureError(LicenseError):
    """The licence is not signed by the vendor key the package names, or it was altered after signing."""

    reason = "signature"


class LicenseExpiredError(LicenseError):
    """The licence's expiry date has passed."""

    reason = "expired"


class LicenseModelError(LicenseError):
    """The licence does not cover the package's model."""

    reason = "model"


class LicenseMachineError(LicenseError):
    """The licence is bound to another machine."""

    reason = "machine"


class LicenseSessionsError(LicenseError):
    """This process already has the licence's maximum number of sessions open."""

    reason = "sessions"


class KeyRequiredError(PackageError):
    """An encrypted package was opened without the licence or passphrase that unlocks it, or with a wrong one."""
