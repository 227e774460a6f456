"""Pre- and post-processing that travels inside the package as a declarative spec.

A spec is plain JSON data (a list of ops before and after the model); ops are small, one job each.
"""

from .classify import Prediction
from .spec import Pipeline, register_op

__all__ = ["Pipeline", "Prediction", "register_op"]
