"""Scale-out on Ray: ``luodi serve``'s own FastAPI app as a Ray Serve deployment, and batch prediction on Ray Data.

cluster: joining or starting Ray (the one ray.init); deployment: the app as Ray Serve replicas and their
scaling; data: `luodi batch` over a folder. Ray is imported lazily (`import luodi` must not), and a Ray cluster
this process did not start is never stopped.
"""

from __future__ import annotations

from .data import IMAGE_SUFFIXES, batch_predict, input_files
from .deployment import RayServer, Scaling, deploy, serve_on_ray

__all__ = ["IMAGE_SUFFIXES", "RayServer", "Scaling", "batch_predict", "deploy", "input_files", "serve_on_ray"]
