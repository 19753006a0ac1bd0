"""Heads through a decode step's KV cache: ``k = Concat(past_k, new_k)`` on the sequence axis, the past a graph
input and the concatenation a ``present`` graph output (built with ``onnx.helper``, no torch export).

Asserted: the channel analysis groups each head with its q/k/v columns and its output-projection rows as without
a cache; pruning heads slices the projections, rewrites the past inputs' and present outputs' declared head axis,
and ORT's output on a past cache with those heads removed equals a numpy forward with those heads' outputs zeroed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphprune.analysis.channels import analyze_channels
from graphprune.passes._channel_plan import build_plan
from graphprune.passes._channel_surgery import apply_plan

B, N, P, H, D = 2, 1, 5, 4, 8
C = H * D


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32) for k in ("wq", "wk", "wv", "wo")}


def build(w) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array([0, 0, H, D], np.int64), "heads_shape"),
              numpy_helper.from_array(np.array([0, 0, C], np.int64), "merged_shape"),
              numpy_helper.from_array(np.array(1 / np.sqrt(D), np.float32), "scale")]
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_p"]),
                  helper.make_node("Reshape", [f"{name}_p", "heads_shape"], [f"{name}_r"]),
                  helper.make_node("Transpose", [f"{name}_r"], [f"{name}_new"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Concat", ["past_k", "k_new"], ["present_k"], axis=2),
              helper.make_node("Concat", ["past_v", "v_new"], ["present_v"], axis=2),
              helper.make_node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_new", "kt"], ["s0"]),
              helper.make_node("Mul", ["s0", "scale"], ["s"]),
              helper.make_node("Softmax", ["s"], ["a"], axis=-1),
              helper.make_node("MatMul", ["a", "present_v"], ["o"]),
              helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o_t", "merged_shape"], ["m"]),
              helper.make_node("MatMul", ["m", "wo"], ["attn"]),
              helper.make_node("Add", ["x", "attn"], ["y"])]
    cache = ["batch", H, "past", D]
    graph = helper.make_graph(
        nodes, "decode_step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C]),
         helper.make_tensor_value_info("past_k", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_v", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N, C]),
         helper.make_tensor_value_info("present_k", TensorProto.FLOAT, ["batch", H, "total", D]),
         helper.make_tensor_value_info("present_v", TensorProto.FLOAT, ["batch", H, "total", D])],
        inits)
    for i, n in enumerate(graph.node):
        n.name = f"n{i}"  # a prune plan addresses nodes by name
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def reference(x, past_k, past_v, w, drop):
    """numpy: one attention step over the cache, the heads in ``drop`` contributing nothing."""
    def heads(t):
        return t.reshape(B, N, H, D).transpose(0, 2, 1, 3)
    q, k, v = heads(x @ w["wq"]), heads(x @ w["wk"]), heads(x @ w["wv"])
    k, v = np.concatenate([past_k, k], 2), np.concatenate([past_v, v], 2)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    a = np.exp(s - s.max(-1, keepdims=True))
    o = (a / a.sum(-1, keepdims=True)) @ v
    o[:, drop] = 0
    return x + o.transpose(0, 2, 1, 3).reshape(B, N, C) @ w["wo"], k, v


def test_heads_follow_the_cache_concat_and_the_cache_shrinks(tmp_path):
    w = _weights()
    model = ir.from_proto(onnx.shape_inference.infer_shapes(build(w)))
    analysis = analyze_channels(model, ignore_stem=False)  # q/k/v read the graph input: the stem
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == H
    kept = np.ones(len(analysis.root), dtype=bool)
    drop = [1, 3]
    g = heads[0]
    kept[np.asarray(g.classes)[drop]] = False
    apply_plan(model, build_plan(analysis, kept))
    assert [list(v.shape) for v in model.graph.inputs[1:]] == [["batch", 2, "past", D]] * 2
    assert [v.shape[1] for v in model.graph.outputs[1:]] == [2, 2]
    path = tmp_path / "pruned.onnx"
    ir.save(model, path)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, N, C)).astype(np.float32)
    past_k, past_v = (rng.standard_normal((B, H, P, D)).astype(np.float32) for _ in range(2))
    keep = [h for h in range(H) if h not in drop]
    y, pk, pv = ort.InferenceSession(str(path)).run(None, {"x": x, "past_k": past_k[:, keep], "past_v": past_v[:, keep]})
    ref_y, ref_k, ref_v = reference(x, past_k, past_v, w, drop)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pk, ref_k[:, keep], atol=1e-5)
    np.testing.assert_allclose(pv, ref_v[:, keep], atol=1e-5)


def test_a_concat_with_a_computed_tensor_is_not_a_cache():
    """Concat(new, computed) is no cache: the heads stay whole, with the reason."""
    proto = build(_weights())
    for n in proto.graph.node:
        if n.op_type == "Concat" and n.output[0] == "present_k":
            n.input[0] = "k_new_twice"
    proto.graph.node.insert(0, helper.make_node("Identity", ["past_k"], ["k_new_twice"]))
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    groups = analyze_channels(model, ignore_stem=False).groups
    assert not [g for g in groups if g.kind == "heads"]
    reasons = {g.reason for g in groups if not g.prunable}
    assert any("tracked projections" in (r or "") for r in reasons), reasons
