"""The digits PNG folder of ``benchmarks/bench_fidelity_digits.py`` loads back (``load_data``) as the arrays it was
written from, within half a grey level. No trained model: a one-node model with the digits input spec stands in."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import digits  # noqa: E402
from benchmarks.bench_fidelity_digits import PNG_TOL, write_pngs  # noqa: E402
from graphprune.data import load_data  # noqa: E402


def _digits_input_model(folder: Path) -> ir.Model:
    """``y = Identity(x)``, x float ``[batch, 1, 32, 32]``: the digits models' input spec."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ident", [x], [y])
    path = folder / "ident.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return ir.load(path)


def _loaded(folder: Path, model: ir.Model) -> np.ndarray:
    data = load_data(folder, model, normalize=False)
    assert data.source == "user" and len(data) > 0
    return np.stack([s["x"] for s in data.samples])


def test_digits_pngs_load_back_within_half_a_grey_level(tmp_path):
    x_tr, y_tr, _, _ = digits.load_split()
    folder = tmp_path / "png"
    idx = write_pngs(x_tr, y_tr, folder, 40, seed=3)
    assert len(idx) == 40 and np.all(np.diff(idx) > 0)
    assert len(list(folder.glob("*.png"))) == 40
    got = _loaded(folder, _digits_input_model(tmp_path))
    assert got.shape == (40, 1, 32, 32) and got.dtype == np.float32
    diff = np.abs(got.astype(np.float64) - x_tr[idx])
    assert diff.max() <= PNG_TOL
    assert diff.max() > 0  # the bilinear upsampling makes off-grid values: quantization really happened
    # The file-name order is the index order: image k is training image idx[k] (not just a close neighbour).
    nearest = np.abs(got.reshape(40, 1, -1) - x_tr[idx].reshape(1, 40, -1)).max(axis=2).argmin(axis=1)
    np.testing.assert_array_equal(nearest, np.arange(40))


def test_rewrite_replaces_stale_pngs_and_keeps_extremes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 32, 32), dtype=np.float32)
    x[0] = 0.0
    x[1] = 1.0
    y = np.arange(12) % 10
    folder = tmp_path / "png"
    write_pngs(x, y, folder, 12)
    idx = write_pngs(x, y, folder, 5, seed=1)  # a second, smaller run leaves only its own files
    assert len(list(folder.glob("*.png"))) == 5
    model = _digits_input_model(tmp_path)
    got = _loaded(folder, model)
    assert np.abs(got.astype(np.float64) - x[idx]).max() <= PNG_TOL
    write_pngs(x, y, folder, 12)
    got = _loaded(folder, model)
    assert got[0].max() == 0.0 and got[1].min() == 1.0
