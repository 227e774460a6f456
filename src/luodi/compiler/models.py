"""Multi-model packages: compile and verify a pipeline's further models, and check its spec against them.

Each further model gets the same targets as the primary one; it never changes how a single model compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import VerificationError
from ..frontends import SourceModel
from ..tensor import TensorSpec, specs_from_onnx
from .entry import store_model, target_entry


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


def compile_models(
    src: SourceModel,
    wanted: list[tuple[str, str]],
    backends: dict[str, Any],
    members: dict[str, bytes],
    by_sha: dict[str, str],
    *,
    verify: bool,
    strict: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The manifest's ``models`` section: per further model its graph, io specs and verified targets."""
    from ..backends import CompileOptions
    from . import _failure, _reference_outputs, _samples_for, _verify  # the one-model steps, reused

    section: dict[str, Any] = {}
    for name, sub in src.models.items():
        member = store_model(sub.model, model_member(name), members, by_sha)
        inputs, outputs = specs_from_onnx(sub.model)
        targets = []
        feeds = _samples_for(sub, inputs) if verify else []
        reference = _reference_outputs(sub.model, feeds) if verify else []
        for backend_name, precision in wanted:
            say(f"compiling {name} for {backend_name}:{precision}")
            backend = backends[backend_name]
            artifact = backend.compile(sub.model, CompileOptions(precision=precision, source=sub))
            entry = target_entry(backend, precision, artifact, f"models/{name}/", members, by_sha)
            if verify:
                say(f"verifying {name} on {backend_name}:{precision} against reference")
                entry["verification"] = _verify(backend, artifact, feeds, reference, precision)
                if strict and not entry["verification"]["passed"]:
                    raise VerificationError(
                        f"model '{name}' on target {backend_name}:{precision} {_failure(entry['verification'])}; "
                        "nothing was written. Drop --strict to keep it with the failure recorded."
                    )
            targets.append(entry)
        section[name] = {
            "model": member,
            "description": sub.description,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "targets": targets,
        }
    return section
