"""Joining Ray, or starting a loopback cluster of one node: the one place luodi calls ray.init."""

from __future__ import annotations

import os
from typing import Any

from ...errors import MissingExtraError


def ray_module() -> Any:
    """The ``ray`` module, Serve and Data importable; MissingExtraError naming the extra when they are not."""
    # Ray 2.5x refuses to start without an explicit auth mode; a loopback cluster of one user needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise MissingExtraError("scale-out on Ray needs Ray Serve and Ray Data: pip install 'luodi[ray]'") from None
    return ray


def runtime_env() -> dict[str, Any]:
    """Ray's workers import luodi from where this process did (e.g. a source checkout on PYTHONPATH)."""
    path = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": path}} if path else {}


def connect(address: str = "local", node_ip: str | None = None) -> bool:
    """Join the cluster at ``address`` (HOST:PORT), or with "local" start one on this machine, unless this
    process is connected already. True when this call connected (the caller then disconnects with
    ray.shutdown(), which also stops a "local" cluster it started)."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        **({"include_dashboard": False} if address == "local" else {}),
        _node_ip_address=node_ip,
        log_to_driver=False,
        runtime_env=runtime_env(),
    )
    return True
