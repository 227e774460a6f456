"""Triton's model-configuration and statistics extensions: what GET /v2/models/NAME/config and .../stats answer.

The JSON shapes are Triton's (its model_config.proto as JSON, and docs/protocol/extension_statistics.md), so that
tritonclient's get_model_config and get_inference_statistics, and the tools built on them, read luodi's server.
Every value is the server's own: the batcher's settings, the engine's tensors, the version's measured figures.
No web framework here.
"""

from __future__ import annotations

from typing import Any

from ..tensor import TensorSpec
from .protocol import datatype_of

EXTENSIONS = ["model_configuration", "statistics"]
"""What the server metadata lists for these routes."""


def data_type(spec: TensorSpec) -> str:
    """Triton's config name of a tensor's type: TYPE_FP32, TYPE_INT8, ..."""
    return "TYPE_" + datatype_of(spec.np_dtype)


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) else -1 for d in spec.shape]
    return dims[1:] if batched else dims  # with max_batch_size > 0 Triton's dims leave the batch dim out


def _instance_kind(device: str) -> str:
    device = device.lower()
    if device == "cpu":
        return "KIND_CPU"
    if device.startswith(("cuda", "gpu")):
        return "KIND_GPU"
    return "KIND_MODEL"  # an NPU or another accelerator: the engine places the model itself


def model_config(mv: Any, versions: int) -> dict[str, Any]:
    """The configuration of loaded version ``mv`` (a ModelVersion) as Triton's config JSON; ``versions`` is how many
    of the newest versions the server keeps loaded (0: all)."""
    session, config = mv.session, mv.config
    max_batch = config.max_batch_size if mv.batcher.batchable else 0
    batched = max_batch > 0
    doc: dict[str, Any] = {
        "name": mv.name,
        "platform": mv.platform,
        "backend": "luodi",
        "runtime": session.backend,
        "version_policy": {"latest": {"num_versions": versions}} if versions else {"all": {}},
        "max_batch_size": max_batch,
        "input": [
            {
                "name": s.name,
                "data_type": data_type(s),
                "format": "FORMAT_NONE",
                "dims": _dims(s, batched),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for s in session.inputs
        ],
        "output": [
            {
                "name": s.name,
                "data_type": data_type(s),
                "dims": _dims(s, batched),
                "label_filename": "",
                "is_shape_tensor": False,
            }
            for s in session.outputs
        ],
        "instance_group": [
            {
                "name": f"{mv.name}_0",
                "kind": _instance_kind(session.device),
                "count": config.instances,  # the batcher's worker threads, each running one batch at a time
                "gpus": [],
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            }
        ],
        "default_model_filename": mv.files.name,  # relative to the repository: never the server's directories
        "parameters": {
            "precision": {"string_value": session.precision},
            "device": {"string_value": session.device},
        },
    }
    if batched:
        doc["dynamic_batching"] = {
            "preferred_batch_size": list(config.preferred_batch_sizes),
            "max_queue_delay_microseconds": round(config.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",  # a request past its timeout is answered 504, never run late
                "default_timeout_microseconds": round(config.timeout_s * 1e6),
                "allow_timeout_override": True,  # the request's "timeout" parameter
                "max_queue_size": config.max_queue_size,
            },
            "priority_queue_policy": {},
        }
    return doc
