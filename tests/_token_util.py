"""Helpers shared by the token-drop tests: run one ``ai.graphprune`` node in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphprune.ops import add_node_function

_NP2IR = {np.dtype(np.float32): ir.DataType.FLOAT, np.dtype(np.int64): ir.DataType.INT64}


def run_single(make_node, feeds: dict[str, np.ndarray], n_out: int, static: bool = False) -> list[np.ndarray]:
    """Wrap ``make_node(*inputs)`` in a model (dynamic batch/token axes unless ``static``), add the node's body
    (``add_node_function``), run it in ORT."""
    inputs = []
    for name, arr in feeds.items():
        dims = (list(arr.shape[:2]) if static else ["B", "N"]) + list(arr.shape[2:])
        inputs.append(ir.Value(name=name, type=ir.TensorType(_NP2IR[arr.dtype]), shape=ir.Shape(dims[: arr.ndim])))
    node = make_node(*inputs)
    for i, out in enumerate(node.outputs):
        out.name = f"out{i}"
    graph = ir.Graph(inputs, list(node.outputs[:n_out]), nodes=[node], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    add_node_function(model, node)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
