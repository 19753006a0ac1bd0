"""The spelling matrix: q/k/v of a fused ``[B, N, 3·H·D]`` projection picked apart every way an exporter writes it.

Each case is a two-block attention model built with ``onnx.helper`` (no torch export): q/k/v split by Split (sizes or
``num_outputs``, as ``chunk`` exports), by Slice on the last axis, by Slice+Squeeze (dynamo's ``unbind``), by Split+
Squeeze (TorchScript's ``unbind``), by Gather (tuple indexing), with the head permute before or after the split;
reshape targets static (``0`` for the batch), ``-1`` or computed from ``Shape``; constants one per use or
deduplicated as the exporter writes them (one initializer for every equal constant, shared by both blocks).

Asserted for every case: the same head groups (each head class holds exactly that head's q, k and v columns of the
fused projection and its rows of the output projection), and, after pruning chosen heads, ORT's output equals a
numpy forward of the original weights with those heads' outputs zeroed.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.analysis.channels import analyze_channels
from graphprune.passes._channel_plan import build_plan
from graphprune.passes._channel_surgery import apply_plan

B, N, H, D = 2, 6, 4, 8
C = H * D
SPELLINGS = ["split_last", "split_last_num", "slice_last", "unbind_slice", "gather_first", "unbind_split",
             "chunk_5d", "gather_5d"]
TARGETS = ["static", "minus1", "computed"]
CONSTS = ["per_use", "dedup"]
DROP = {0: [1, 2], 1: [3]}  # heads pruned per block


class _Builder:
    def __init__(self, dedup: bool) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dedup = dedup
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, hint: str = "c") -> str:
        arr = np.asarray(value)
        if self.dedup:  # the exporter's deduplication: one initializer per distinct constant
            for t in self.inits:
                old = numpy_helper.to_array(t)
                if old.dtype == arr.dtype and old.shape == arr.shape and np.array_equal(old, arr):
                    return t.name
        name = hint if "." in hint else self.name(hint)  # parameters keep their names
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"n_{op}"), **attrs))
        return outs

    def target(self, src: str, dims: list[int], mode: str) -> str:
        """A reshape target whose first entry is the batch."""
        if mode == "static":
            return self.const(np.asarray([0, *dims], np.int64), "shape")
        if mode == "minus1":
            return self.const(np.asarray([-1, *dims], np.int64), "shape")
        shape = self.op("Shape", [src])[0]
        batch = self.op("Gather", [shape, self.const(np.asarray([0], np.int64))], axis=0)[0]
        return self.op("Concat", [batch, self.const(np.asarray(dims, np.int64), "dims")], axis=0)[0]


def _qkv_views(g: _Builder, qkv: str, spelling: str, target: str) -> list[str]:
    """q, k, v as [B, H, N, D] from ``qkv`` [B, N, 3C]."""
    i64 = lambda *v: np.asarray(v, np.int64)  # noqa: E731

    def heads(x: str) -> str:  # [B, N, C] -> [B, H, N, D]
        r = g.op("Reshape", [x, g.target(x, [N, H, D], target)])[0]
        return g.op("Transpose", [r], perm=[0, 2, 1, 3])[0]

    if spelling == "split_last":
        return [heads(x) for x in g.op("Split", [qkv, g.const(i64(C, C, C))], 3, axis=2)]
    if spelling == "split_last_num":
        return [heads(x) for x in g.op("Split", [qkv], 3, axis=-1, num_outputs=3)]
    if spelling == "slice_last":
        return [heads(g.op("Slice", [qkv, g.const(i64(i * C)), g.const(i64((i + 1) * C)), g.const(i64(2))])[0])
                for i in range(3)]
    five = g.op("Reshape", [qkv, g.target(qkv, [N, 3, H, D], target)])[0]
    if spelling in ("chunk_5d", "gather_5d"):  # split on the "3" axis first, then permute each
        if spelling == "chunk_5d":
            parts = [g.op("Squeeze", [p, g.const(i64(2))])[0]
                     for p in g.op("Split", [five, g.const(i64(1, 1, 1))], 3, axis=2)]
        else:
            parts = [g.op("Gather", [five, g.const(np.asarray(i, np.int64))], axis=2)[0] for i in range(3)]
        return [g.op("Transpose", [p], perm=[0, 2, 1, 3])[0] for p in parts]
    perm = g.op("Transpose", [five], perm=[2, 0, 3, 1, 4])[0]  # [3, B, H, N, D]
    if spelling == "unbind_slice":
        return [g.op("Squeeze", [g.op("Slice", [perm, g.const(i64(i)), g.const(i64(i + 1)), g.const(i64(0))])[0],
                                 g.const(i64(0))])[0] for i in range(3)]
    if spelling == "gather_first":
        return [g.op("Gather", [perm, g.const(np.asarray(i, np.int64))], axis=0)[0] for i in range(3)]
    assert spelling == "unbind_split"
    return [g.op("Squeeze", [p, g.const(i64(0))])[0] for p in g.op("Split", [perm], 3, axis=0, num_outputs=3)]


def _weights(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"wqkv": rng.standard_normal((C, 3 * C)).astype(np.float32) * 0.3,
             "bqkv": rng.standard_normal(3 * C).astype(np.float32) * 0.1,
             "wo": rng.standard_normal((C, C)).astype(np.float32) * 0.3,
             "bo": rng.standard_normal(C).astype(np.float32) * 0.1,
             "embed": rng.standard_normal((C, C)).astype(np.float32) * 0.3} for _ in range(2)]


def build(spelling: str, target: str, consts: str, weights) -> onnx.ModelProto:
    g = _Builder(consts == "dedup")
    x = g.op("MatMul", ["x", g.const(weights[0]["embed"], "embed.weight")])[0]  # the input stem
    scale = np.asarray(D ** -0.5, np.float32)
    for blk, w in enumerate(weights):
        qkv = g.op("MatMul", [x, g.const(w["wqkv"], f"blocks.{blk}.qkv.weight")])[0]
        qkv = g.op("Add", [qkv, g.const(w["bqkv"], f"blocks.{blk}.qkv.bias")])[0]
        q, k, v = _qkv_views(g, qkv, spelling, target)
        q = g.op("Mul", [q, g.const(scale, "scale")])[0]
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])[0]
        p = g.op("Softmax", [g.op("MatMul", [q, kt])[0]], axis=-1)[0]
        o = g.op("Transpose", [g.op("MatMul", [p, v])[0]], perm=[0, 2, 1, 3])[0]
        o = g.op("Reshape", [o, g.target(o, [N, C], target)])[0]
        o = g.op("Add", [g.op("MatMul", [o, g.const(w["wo"], f"blocks.{blk}.proj.weight")])[0],
                         g.const(w["bo"], f"blocks.{blk}.proj.bias")])[0]
        x = g.op("Add", [x, o])[0]
    g.nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(g.nodes, "spelling", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N, C])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)


def reference(x: np.ndarray, weights, drop: dict[int, list[int]]) -> np.ndarray:
    """numpy forward; the heads in ``drop`` contribute nothing (their outputs are zeroed before the projection)."""
    x = x @ weights[0]["embed"]
    for blk, w in enumerate(weights):
        qkv = x @ w["wqkv"] + w["bqkv"]
        q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, N, H, D).transpose(0, 2, 1, 3) for i in range(3))
        s = (q * D ** -0.5) @ k.transpose(0, 1, 3, 2)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = (p / p.sum(-1, keepdims=True)) @ v
        o[:, drop.get(blk, [])] = 0.0
        x = x + o.transpose(0, 2, 1, 3).reshape(B, N, C) @ w["wo"] + w["bo"]
    return x


def _head_classes(analysis, blk: int) -> list[int]:
    """Per head of block ``blk``: the one class holding its q, k, v columns and its output-projection rows."""
    by_name = {(m.value.name, m.role): m for m in analysis.members}
    qkv, proj = by_name[(f"blocks.{blk}.qkv.weight", "out")], by_name[(f"blocks.{blk}.proj.weight", "in")]
    assert (qkv.axis, proj.axis) == (1, 0)
    cols = analysis.root[qkv.atoms].reshape(3, H, D)
    rows = analysis.root[proj.atoms].reshape(H, D)
    out = []
    for h in range(H):
        cls = {int(a) for a in np.concatenate([cols[:, h].ravel(), rows[h]])}
        assert len(cls) == 1, f"head {h} of block {blk} spans classes {cls}"
        out.append(cls.pop())
    assert len(set(out)) == H
    return out


CASES = list(itertools.product(SPELLINGS, TARGETS, CONSTS))


@pytest.mark.parametrize(("spelling", "target", "consts"), CASES, ids=["-".join(c) for c in CASES])
def test_every_spelling_gives_the_same_head_groups(spelling, target, consts, tmp_path):
    weights = _weights()
    proto = build(spelling, target, consts, weights)
    x = np.random.default_rng(1).standard_normal((B, N, C)).astype(np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], reference(x, weights, {}), rtol=1e-4, atol=1e-4)

    model = ir.serde.deserialize_model(proto)
    analysis = analyze_channels(model)
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.prunable and g.size == H for g in heads), [g.describe() for g in analysis.groups]
    classes = [_head_classes(analysis, blk) for blk in range(2)]
    assert {analysis.group_of_root[classes[0][0]], analysis.group_of_root[classes[1][0]]} == {g.id for g in heads}

    kept = np.ones(len(analysis.root), dtype=bool)
    for blk, hs in DROP.items():
        kept[[classes[blk][h] for h in hs]] = False
    apply_plan(model, build_plan(analysis, kept))
    wq = model.graph.initializers["blocks.0.qkv.weight"].const_value.numpy()
    assert wq.shape == (C, 3 * (H - len(DROP[0])) * D)
    pruned = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(pruned.run(None, {"x": x})[0], reference(x, weights, DROP), rtol=1e-4, atol=1e-4)
