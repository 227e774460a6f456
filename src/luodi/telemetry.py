"""Engine telemetry, off unless the user turns it on: onnxruntime's usage events and OpenVINO's statistics.

onnxruntime (1.2x+, Linux too) writes ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}``
when imported and may upload usage events; it honours ``ORT_DISABLE_TELEMETRY=1`` if that is set before the import.
``import openvino`` imports its converter (``openvino.tools.ovc``), which through the ``openvino_telemetry``
package writes ``~/intel/stats`` and ``~/intel/openvino_ga_cid`` and sends an "import" event; OpenVINO falls back to
its own no-op stub when that package cannot be imported, which is what :func:`import_engine` makes it do.
``LUODI_ENGINE_TELEMETRY=1`` leaves both engines as they ship. Nothing here imports an engine by itself.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType

_ALLOWED = os.environ.get("LUODI_ENGINE_TELEMETRY", "").lower() in ("1", "true", "on", "yes")
_lock = threading.Lock()


def quiet_onnxruntime() -> None:
    """Ask onnxruntime, before it is imported, to record and send nothing (a user's own setting wins)."""
    if not _ALLOWED:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def import_engine(module: str) -> ModuleType:
    """``importlib.import_module(module)``, with OpenVINO's telemetry package hidden during its first import.

    OpenVINO binds its converter's telemetry module once, when ``openvino`` is first imported: hidden then, the
    converter keeps its no-op stub for the life of the process. A process that imported openvino before luodi
    keeps whatever it chose.
    """
    quiet_onnxruntime()
    top = module.split(".")[0]
    if top == "onnxruntime" and not _ALLOWED:
        mod = importlib.import_module(module)
        # Imported before luodi set the variable: its files are written, but its events can still be stopped.
        getattr(mod, "disable_telemetry_events", lambda: None)()
        return mod
    if _ALLOWED or top != "openvino" or "openvino" in sys.modules or "openvino_telemetry" in sys.modules:
        return importlib.import_module(module)
    with _lock:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # `import` raises ImportError
        try:
            return importlib.import_module(module)
        finally:
            if sys.modules.get("openvino_telemetry", 0) is None:
                del sys.modules["openvino_telemetry"]
