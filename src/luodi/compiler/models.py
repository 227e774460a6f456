"""Multi-model packages: where a pipeline's further models live in the package, and its spec checked against them.

The compiler compiles and verifies every model in one loop (luodi.compiler.compile); nothing here compiles.
"""

from __future__ import annotations

from ..source import SourceModel
from ..tensor import TensorSpec, specs_from_onnx


def model_member(name: str) -> str:
    """Where further model ``name`` keeps its canonical graph in the package."""
    return f"models/{name}/model.onnx"


def check_pipeline(src: SourceModel, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Build the pipeline against every model's io specs, so a bad spec fails before anything is compiled."""
    if not src.pipeline:
        return
    from ..pipeline import Pipeline

    models = {"main": (inputs, outputs)}
    models.update({name: specs_from_onnx(m.model) for name, m in src.models.items()})
    Pipeline.from_spec(src.pipeline, inputs, models=models)
