"""Tests for the shared digits benchmark helpers (benchmarks/digits.py); no full training here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import digits  # noqa: E402

N_TRAIN, N_TEST = 1437, 360


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


# ------------------------------------------------------------------------------------ load_split
def test_load_split_shapes_dtypes_ranges(split):
    x_tr, y_tr, x_te, y_te = split
    assert x_tr.shape == (N_TRAIN, 1, 32, 32) and x_te.shape == (N_TEST, 1, 32, 32)
    assert x_tr.dtype == np.float32 and x_te.dtype == np.float32
    assert y_tr.dtype == np.int64 and y_te.shape == (N_TEST,)
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0 and x_te.min() >= 0.0 and x_te.max() <= 1.0
    assert x_tr.max() == 1.0  # grey level 16 exists and maps to 1
    assert set(np.unique(y_tr)) == set(range(10)) == set(np.unique(y_te))


def test_load_split_is_stratified_and_deterministic(split):
    from sklearn.datasets import load_digits

    x_tr, y_tr, x_te, y_te = split
    again = digits.load_split()
    for a, b in zip(split, again):
        np.testing.assert_array_equal(a, b)
    other = digits.load_split(seed=1)
    assert not np.array_equal(other[3], y_te)
    all_counts = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_allclose(np.bincount(y_te, minlength=10), all_counts * 0.2, atol=1.0)


def test_load_split_8x8_is_the_raw_data_over_16():
    from sklearn.datasets import load_digits

    d = load_digits()
    x_tr, y_tr, x_te, y_te = digits.load_split(img_size=8)
    x = np.concatenate([x_tr, x_te])[:, 0].reshape(len(d.images), -1)
    y = np.concatenate([y_tr, y_te])
    ref = d.images.reshape(len(d.images), -1) / 16.0
    # Same multiset of (image, label) rows: sort both by their bytes.
    key = lambda a, b: sorted(zip(map(bytes, (a * 16).round().astype(np.uint8)), b.tolist()))  # noqa: E731
    assert key(x, y) == key(ref, d.target)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] interpolation weights: half-pixel centres, edge clamped (align_corners=False)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        m[i, i0] += 1 - (src - i0)
        m[i, i1] += src - i0
    return m


def test_upscaling_is_bilinear_of_the_8x8_image(split):
    x8 = digits.load_split(img_size=8)[0][:, 0].astype(np.float64)
    a = _bilinear_matrix(8, 32)
    ref = np.einsum("ij,njk,lk->nil", a, x8, a)
    np.testing.assert_allclose(split[0][:, 0], ref, atol=1e-5)


def test_calibration_feeds(split):
    feed = digits.calibration(n=20, seed=3)
    assert list(feed) == ["x"]
    x = feed["x"]
    assert x.shape == (20, 1, 32, 32) and x.dtype == np.float32
    train_rows = {bytes(r) for r in split[0].reshape(N_TRAIN, -1)}
    assert all(bytes(r) in train_rows for r in x.reshape(20, -1))
    np.testing.assert_array_equal(x, digits.calibration(n=20, seed=3)["x"])
    feeds = digits.calibration_feeds(n=20, batch=8, seed=3)
    assert [f["x"].shape[0] for f in feeds] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    with pytest.raises(ValueError):
        digits.calibration(n=0)


# ------------------------------------------------------------------------------------- evaluate
def _centroid_classifier(x_tr, y_tr):
    """A linear classifier (nearest class mean, as a dot product) with ~90 % accuracy, not 100 %."""
    f = x_tr.reshape(len(x_tr), -1).astype(np.float64)
    means = np.stack([f[y_tr == c].mean(0) for c in range(10)])
    w = means.T.astype(np.float32)  # [1024, 10]
    b = (-0.5 * (means**2).sum(1)).astype(np.float32)
    return w, b


def _linear_model(w: np.ndarray, b: np.ndarray, batch: int | str = "N") -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([batch, 1, 32, 32]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    bv = ir.Value(name="b", const_value=ir.tensor(b, name="b"))
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([-1, w.shape[0]], np.int64), name="shape"))
    flat = ir.node("Reshape", [x, shape])
    mm = ir.node("MatMul", [flat.outputs[0], wv])
    add = ir.node("Add", [mm.outputs[0], bv])
    add.outputs[0].name = "logits"
    graph = ir.Graph(
        [x],
        [add.outputs[0]],
        nodes=[flat, mm, add],
        initializers=[wv, bv, shape],
        opset_imports={"": 18},
        name="linear",
    )
    return ir.Model(graph, ir_version=10)


@pytest.fixture(scope="module")
def linear(split):
    x_tr, y_tr, x_te, y_te = split
    w, b = _centroid_classifier(x_tr, y_tr)
    logits = x_te.reshape(N_TEST, -1).astype(np.float64) @ w.astype(np.float64) + b
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # no near-ties: float32 ORT and float64 numpy agree
    expected = float(np.mean(logits.argmax(1) == y_te))
    assert 0.5 < expected < 1.0
    return w, b, expected


def test_evaluate_matches_numpy_for_ir_proto_and_path(split, linear, tmp_path):
    _, _, x_te, y_te = split
    w, b, expected = linear
    model = _linear_model(w, b)
    assert digits.evaluate(model, x_te, y_te) == expected
    assert digits.evaluate(model, x_te, y_te, batch=7) == expected  # 360 = 51*7 + 3: ragged last batch
    proto = ir.to_proto(model)
    assert digits.evaluate(proto, x_te, y_te) == expected
    path = tmp_path / "linear.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="linear.onnx.data", size_threshold=1024)
    assert digits.evaluate(path, x_te, y_te) == expected
    assert digits.evaluate(str(path), x_te[:100], y_te[:100]) == pytest.approx(
        float(np.mean((x_te[:100].reshape(100, -1) @ w + b).argmax(1) == y_te[:100]))
    )


def test_evaluate_loaded_external_ir_model_is_left_intact(split, linear, tmp_path):
    _, _, x_te, y_te = split
    w, b, expected = linear
    path = tmp_path / "ext.onnx"
    onnx.save(
        ir.to_proto(_linear_model(w, b)),
        path,
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=1024,
    )
    model = ir.load(path)
    assert digits.evaluate(model, x_te, y_te) == expected
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)  # still readable


def test_evaluate_static_batch_model_runs_in_chunks(split, linear):
    _, _, x_te, y_te = split
    w, b, expected = linear
    assert digits.evaluate(_linear_model(w, b, batch=8), x_te, y_te) == expected


def test_evaluate_rejects_mismatched_lengths(split, linear):
    _, _, x_te, y_te = split
    w, b, _ = linear
    with pytest.raises(ValueError):
        digits.evaluate(_linear_model(w, b), x_te, y_te[:-1])


# ----------------------------------------------------------------------------- cache (tiny model)
TINY = {
    "version": 1,
    "arch": {"img_size": 32, "patch": 8, "in_chans": 1, "dim": 16, "depth": 1, "heads": 2, "num_classes": 10},
    "epochs": 1,
    "batch": 128,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    "max_shift": 1,
    "seed": 0,
    "split_seed": 0,
}


def _tiny_vit(sdpa: bool):
    m = digits._examples().ViT(**TINY["arch"])
    for blk in m.blocks:
        blk.attn.sdpa = sdpa
    return m


def test_cache_trains_once_and_reexports_same_weights(split, tmp_path):
    logs: list[str] = []
    p18 = digits._get("tiny", TINY, _tiny_vit, tmp_path, 18, logs.append)
    assert p18 == tmp_path / "tiny.onnx" and p18.exists() and (tmp_path / "tiny.onnx.data").exists()
    assert not list(tmp_path.glob(".export_*"))  # temp export folder cleaned up
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["config"] == TINY and record["opset"] == 18
    _, _, x_te, y_te = split
    assert record["ort_top1"] == digits.evaluate(p18, x_te, y_te)
    assert abs(record["ort_top1"] - record["torch_top1"]) <= 1 / N_TEST
    assert sum("training" in line for line in logs) == 1
    mtime = p18.stat().st_mtime_ns

    p23 = digits._get("tiny", TINY, _tiny_vit, tmp_path, 23, logs.append)
    assert sum("training" in line for line in logs) == 1  # reused the trained weights
    assert p18.stat().st_mtime_ns == mtime
    assert any(n.op_type == "Attention" for n in ir.load(p23).graph)
    np.testing.assert_allclose(digits.predict(p23, x_te[:32]), digits.predict(p18, x_te[:32]), atol=1e-4)


def _fake_training(monkeypatch, linear_weights, calls: list[str]):
    """Replace training (slow) and export (dynamo, slow) by stand-ins: counts trainings, writes a linear model."""
    import threading
    import time

    import torch

    w, b, _ = linear_weights

    def train(model, cfg, log):
        calls.append(threading.current_thread().name)
        with torch.no_grad():  # each "training" yields different weights
            next(model.parameters()).add_(len(calls))
        time.sleep(0.5)  # long enough for a concurrent caller to reach the lock
        return 0.5, 0.5

    def export(model, onnx_path, opset):
        ir.save(_linear_model(w, b), onnx_path)

    monkeypatch.setattr(digits, "_train", train)
    monkeypatch.setattr(digits, "_export", export)


def test_config_change_retrains(split, linear, tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_training(monkeypatch, linear, calls)
    digits._get("tiny", TINY, _tiny_vit, tmp_path, 23, None)  # trains the base first, then re-exports
    assert len(calls) == 1 and (tmp_path / "tiny.json").exists() and (tmp_path / "tiny_op23.json").exists()
    digits._get("tiny", TINY, _tiny_vit, tmp_path, 23, None)
    assert len(calls) == 1
    digits._get("tiny", TINY | {"version": 2}, _tiny_vit, tmp_path, 18, None)
    assert len(calls) == 2
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["config"]["version"] == 2 and record["ort_top1"] == linear[2]
    digits._get("tiny", TINY, _tiny_vit, tmp_path, 23, None)  # older recipe (version 1): newer cache wins
    assert len(calls) == 2
    assert json.loads((tmp_path / "tiny.json").read_text())["config"]["version"] == 2
    assert json.loads((tmp_path / "tiny_op23.json").read_text())["config"]["version"] == 2  # re-exported v2 weights


def test_concurrent_callers_train_once(split, linear, tmp_path, monkeypatch):
    import threading

    calls: list[str] = []
    _fake_training(monkeypatch, linear, calls)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(digits._get("tiny", TINY, _tiny_vit, tmp_path, 18, None)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # flock is per open file: threads block each other like processes do
    assert results == [tmp_path / "tiny.onnx"] * 3


def test_sincos_position_init_matches_formula():
    model = digits._examples().ViT(img_size=32, patch=8, in_chans=1, dim=16, depth=1, heads=2, num_classes=10)
    digits._init_sincos_pos(model)
    pos = model.pos_embed.detach().numpy()[0]
    assert pos.shape == (17, 16) and not pos[0].any()  # CLS row zero; 4x4 grid of patches
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    for token, (row, col) in [(1, (0, 0)), (7, (1, 2)), (16, (3, 3))]:
        ref = np.concatenate([np.sin(row * omega), np.cos(row * omega), np.sin(col * omega), np.cos(col * omega)])
        np.testing.assert_allclose(pos[token], ref, atol=1e-6)
    assert len({bytes(r) for r in pos[1:]}) == 16  # every patch position distinct
