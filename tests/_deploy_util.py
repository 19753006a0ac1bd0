"""Models and helpers shared by the deploy and serve tests (models built in code; IR version 10 for ORT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_CACHE: dict = {}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def multi_io_model(path: Path) -> Path:
    """Inputs X float [batch, 4] and ids int64 [batch, seq]; outputs Y = X + mean_seq(E[ids]) and Z = 2·X.

    ``E`` has 10 rows, so an id ≥ 10 makes ONNX Runtime fail (a request Triton itself cannot reject).
    """
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),
         helper.make_node("ReduceMean", ["emb", "axes"], ["pooled"], keepdims=0),
         helper.make_node("Add", ["X", "pooled"], ["Y"]),
         helper.make_node("Mul", ["X", "two"], ["Z"])],
        "multi",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([1], np.int64), "axes"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    return _save(graph, path)


def fixed_batch_model(path: Path) -> Path:
    """Y = relu(X) with X float [1, 8]: axis 0 is fixed, so it is not a batch axis."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"])], "fixed",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8])])
    return _save(graph, path)


def static_reshape_model(path: Path) -> Path:
    """X float [batch, 2, 4] → Reshape to the constant [1, 8]: declares a batch axis but runs only at batch 1."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "shape"], ["Y"])], "static_reshape",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 2, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(np.array([1, 8], np.int64), "shape")])
    return _save(graph, path)


def token_drop_model(export, folder: Path) -> tuple[Path, Path]:
    """vit_tiny (the shared export) with token_drop keep 0.7 → (optimized model, its optimize report JSON)."""
    if "vit" in _CACHE:
        return _CACHE["vit"]
    from graphprune.cli import main

    src = export("vit_tiny")
    out, report = folder / "vit_tiny_tokens.onnx", folder / "vit_tiny_tokens.report.json"
    try:
        main(["optimize", str(src), "-o", str(out), "--token-keep", "0.7", "--report", str(report), "--force"])
    except SystemExit as e:
        assert e.code in (0, None), f"optimize failed with exit code {e.code}"
    _CACHE["vit"] = (out, report)
    return out, report


def ort_outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
