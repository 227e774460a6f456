"""One session shared by 8 threads gives bit-identical results to a single thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import luodi


@pytest.mark.parametrize("backend", ["onnxruntime", "reference"])
def test_eight_threads_bit_identical(cnn_package, backend):
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    with luodi.Session(cnn_package, backend=backend) as s:
        expected = [s.run({"x": x})["y"].copy() for x in inputs]
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        mismatches: list[int] = []

        def worker(i: int) -> None:
            try:
                barrier.wait()
                for _ in range(25):
                    # the six-verb path: per-thread binding must not see other threads' tensors
                    s.set_tensor("x", inputs[i])
                    s.forward()
                    if not np.array_equal(s.get_tensor("y"), expected[i]):
                        mismatches.append(i)
                    if not np.array_equal(s.run({"x": inputs[i]})["y"], expected[i]):
                        mismatches.append(i)
            except BaseException as exc:  # surfaced below, a thread must not die silently
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert not mismatches
        assert all(not t.is_alive() for t in threads)
