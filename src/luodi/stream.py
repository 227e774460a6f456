"""Stream: one sequence of calls to a stateful model (e.g. a recurrent VAD), carrying its state tensors.

It feeds the named state inputs and keeps the matching outputs between calls; it never runs an engine itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import PipelineError


class Stream:
    """Named recurrent state for one stream of input through ``session``.

    ``state`` maps each state input to the output that holds its next value, e.g.
    ``{"state": "stateN"}``. State starts as zeros of the input's shape (symbolic dims set to
    ``batch``); :meth:`reset` starts it again. Streams of one session are independent, so one
    session can serve many audio streams at once.
    """

    def __init__(self, session: Any, state: dict[str, str], batch: int = 1) -> None:
        if not state:
            raise PipelineError(
                "a stream needs the model's state tensors, e.g. state={'state': 'stateN'} (input -> output); "
                "this package's pipeline declares none"
            )
        inputs = {s.name: s for s in session.inputs}
        outputs = {s.name for s in session.outputs}
        for i, o in state.items():
            if i not in inputs:
                raise PipelineError(f"state input '{i}' is not an input of the model; inputs: {sorted(inputs)}")
            if o not in outputs:
                raise PipelineError(f"state output '{o}' is not an output of the model; outputs: {sorted(outputs)}")
        self._session, self._map, self._batch = session, dict(state), batch
        self._specs = {i: inputs[i] for i in state}
        self.reset()

    def reset(self) -> None:
        """Zero the state, as at the start of a new stream."""
        self._state = {i: np.zeros(s.concrete(self._batch), s.np_dtype) for i, s in self._specs.items()}

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current state tensors by input name (copies)."""
        return {k: v.copy() for k, v in self._state.items()}

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on ``feeds`` plus this stream's state; keep the new state; return every output."""
        clash = sorted(set(feeds) & set(self._map))
        if clash:
            raise PipelineError(f"{clash} are this stream's state; give only the other inputs (or call reset())")
        outputs = self._session.run({**feeds, **self._state})
        for i, o in self._map.items():
            self._state[i] = outputs[o]
        return outputs
