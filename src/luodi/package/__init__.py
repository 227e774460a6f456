"""The .luodi package: a zip of manifest.json, model.onnx and targets/<backend>-<precision>/ files.

Reading checks every member against the sha256 the manifest pins; writing is atomic.
"""

from .archive import FORMAT, SCHEMA_VERSION, Package, write_package

__all__ = ["FORMAT", "SCHEMA_VERSION", "Package", "write_package"]
