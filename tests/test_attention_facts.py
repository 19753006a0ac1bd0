"""Attention facts read through the exporter's spellings, on small models built with ``onnx.helper``: the causal
mask combined with the padding mask before it is added, K/V expanded to the query heads (``repeat_kv``), and a
prefix token only on the blocks whose stream carries it. Each model also runs in ORT against a numpy reference, so
the facts are asserted on graphs that compute what they claim."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.analysis.attention import find_attention_blocks

H, HK, D = 4, 2, 8


def _i64(*v):
    return np.asarray(v, np.int64)


def _decoder(mask_kind: str) -> onnx.ModelProto:
    """q [B, H, N, D], k/v [B, HK, N, D] expanded to H heads; logits + mask (``causal``: j ≤ i and the padding;
    ``padding``: the padding only; ``future``: j ≥ i and the padding)."""
    inits = {"r0": _i64(0), "r1": _i64(1), "ax0": _i64(0), "ax1": _i64(1), "ax12": _i64(1, 2), "ax2": _i64(2),
             "zero": np.asarray(0.0, np.float32), "neg": np.asarray(np.finfo(np.float32).min, np.float32),
             "kvshape": _i64(0, H, -1, D), "one": _i64(1), "two": _i64(2)}
    n = [
        helper.make_node("Shape", ["q"], ["qs"]),
        helper.make_node("Gather", ["qs", "two"], ["nq"], axis=0),
        helper.make_node("Squeeze", ["nq"], ["n"]),
        helper.make_node("Range", ["r0_s", "n", "r1_s"], ["pos"]),
        helper.make_node("Squeeze", ["r0"], ["r0_s"]), helper.make_node("Squeeze", ["r1"], ["r1_s"]),
        helper.make_node("Unsqueeze", ["pos", "ax0"], ["cols"]),  # [1, N]: j
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["rows"]),  # [N, 1]: i
        helper.make_node("LessOrEqual" if mask_kind == "causal" else "GreaterOrEqual", ["cols", "rows"], ["tri"]),
        helper.make_node("Cast", ["attention_mask"], ["pad"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["pad", "ax12"], ["pad4"]),  # [B, 1, 1, N]
        helper.make_node("And", ["tri", "pad4"] if mask_kind != "padding" else ["pad4", "pad4"], ["allowed"]),
        helper.make_node("Where", ["allowed", "zero", "neg"], ["mask"]),
    ]
    for x in ("k", "v"):  # repeat_kv: [B, HK, N, D] -> [B, HK, 1, N, D] -> [B, HK, H/HK, N, D] -> [B, H, N, D]
        n += [helper.make_node("Unsqueeze", [x, "ax2"], [f"{x}5"]),
              helper.make_node("Shape", [f"{x}5"], [f"{x}s"]),
              helper.make_node("Concat", [f"{x}s_a", "rep", f"{x}s_b"], [f"{x}tgt"], axis=0),
              helper.make_node("Slice", [f"{x}s", "r0", "two"], [f"{x}s_a"]),
              helper.make_node("Slice", [f"{x}s", "three", "five"], [f"{x}s_b"]),
              helper.make_node("Expand", [f"{x}5", f"{x}tgt"], [f"{x}e"]),
              helper.make_node("Reshape", [f"{x}e", "kvshape"], [f"{x}r"])]
    inits |= {"rep": _i64(H // HK), "three": _i64(3), "five": _i64(5), "scale": np.asarray(D ** -0.5, np.float32)}
    n += [helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
          helper.make_node("MatMul", ["q", "kt"], ["s"]),
          helper.make_node("Mul", ["s", "scale"], ["ss"]),
          helper.make_node("Add", ["ss", "mask"], ["logits"]),
          helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
          helper.make_node("MatMul", ["p", "vr"], ["y"])]
    ready, done = set(inits) | {"q", "k", "v", "attention_mask"}, []
    while n:  # written in reading order above; put in topological order
        node = next(x for x in n if set(x.input) <= ready)
        n.remove(node)
        done.append(node)
        ready |= set(node.output)
    n = done
    f = TensorProto.FLOAT
    g = helper.make_graph(n, "dec", [helper.make_tensor_value_info("q", f, ["b", H, "seq", D]),
                                     helper.make_tensor_value_info("k", f, ["b", HK, "seq", D]),
                                     helper.make_tensor_value_info("v", f, ["b", HK, "seq", D]),
                                     helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "seq"])],
                          [helper.make_tensor_value_info("y", f, ["b", H, "seq", D])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(m)
    return onnx.shape_inference.infer_shapes(m)


def _reference(q, k, v, am, mask_kind):
    k, v = np.repeat(k, H // HK, axis=1), np.repeat(v, H // HK, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * D ** -0.5
    i, j = np.indices(s.shape[-2:])
    allowed = am[:, None, None, :].astype(bool)
    if mask_kind == "causal":
        allowed = allowed & (j <= i)
    elif mask_kind == "future":
        allowed = allowed & (j >= i)
    s = np.where(allowed, s, np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize(("mask_kind", "causal"), [("causal", True), ("padding", False), ("future", False)])
def test_causal_and_kv_heads_through_the_padding_mask_and_repeat_kv(mask_kind, causal):
    proto = _decoder(mask_kind)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, h, 6, D)).astype(np.float32) for h in (H, HK, HK))
    am = np.ones((2, 6), np.int64)
    am[1, 4:] = 0
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"q": q, "k": k, "v": v, "attention_mask": am})[0]
    np.testing.assert_allclose(got, _reference(q, k, v, am, mask_kind), rtol=1e-4, atol=1e-5)
    (blk,) = find_attention_blocks(ir.serde.deserialize_model(proto))
    assert (blk.heads, blk.kv_heads, blk.core_kv_heads, blk.causal, blk.prefix_tokens) == (H, HK, H, causal, 0)
