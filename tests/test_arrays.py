"""luodi.arrays, the one reader of the .npy/.npz files users give luodi: an array file of the wrong kind, a member
that is not an array or a pickled one is an InputError naming the file and where it was given, in every place
that reads them (`luodi verify --data`, calibration, `compile --sample`), never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest

import luodi
from luodi.arrays import load, load_npy, load_npz, save
from luodi.quant import load_feeds


def test_verify_data_npz_holding_one_array_is_a_one_line_error(tmp_path, cnn_package):
    with open(tmp_path / "single.npz", "wb") as fh:  # an .npy's bytes under an .npz name
        np.save(fh, np.zeros((2, 1, 3, 16, 16), np.float32))
    r = subprocess.run(
        [sys.executable, "-m", "luodi", "verify", str(cnn_package), "--data", str(tmp_path / "single.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "verification data" in r.stderr and "holds a single array" in r.stderr


def test_calibration_npy_holding_several_arrays_is_an_input_error(tmp_path):
    with open(tmp_path / "two.npy", "wb") as fh:  # an .npz's bytes under an .npy name
        np.savez(fh, x=np.zeros((1, 3, 16, 16), np.float32))
    inputs = [luodi.TensorSpec("x", "float32", ("batch", 3, 16, 16))]
    with pytest.raises(luodi.InputError, match="calibration: .*two.npy holds several arrays"):
        load_feeds(str(tmp_path / "two.npy"), inputs, None, None, "calibration")


def test_npz_members_are_arrays_read_without_pickle(tmp_path):
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as zf:
        zf.writestr("x.npy", b"not an array")  # numpy would hand these bytes back as they are
    with pytest.raises(luodi.InputError, match="--sample: .*'x' is not an array"):
        load_npz(tmp_path / "raw.npz", "--sample")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(luodi.InputError, match="never unpickles"):
        load(tmp_path / "obj.npz", "--input")
    with pytest.raises(luodi.InputError, match="no file"):
        load_npy(tmp_path / "nope.npy", "--input x")


def test_save_writes_whole_files_inside_the_folder(tmp_path):
    written = save({"../evil": np.arange(3), "A": np.ones(2), "a": np.zeros(2)}, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A.npy", "_evil.npy", "a-2.npy"]
    np.testing.assert_array_equal(load_npy(written["../evil"], "out"), np.arange(3))
