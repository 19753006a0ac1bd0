"""What is generated from an op definition: attribute checking, FLOPs at any batch, plugin descriptors, dtypes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphprune.analysis import count_flops
from graphprune.errors import ConfigError
from graphprune.ops import (
    PLUGIN_NAMESPACE,
    REGISTRY,
    DiversitySelect,
    SparseAttention,
    TokenMerge,
    TokenSelect,
    add_node_function,
)
from graphprune.ops._dims import Dim, DimOps, cdiv, dmax, dmin


def _value(name, shape, dtype=ir.DataType.FLOAT):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _model_with_every_op(dtype=ir.DataType.FLOAT) -> ir.Model:
    """One node of each op on symbolic-batch inputs (the token count static)."""
    x = _value("x", ["batch", 17, 8], dtype)
    s = _value("s", ["batch", 17], dtype)
    q = _value("q", ["batch", 2, 24, 8], dtype)
    sel = TokenSelect.make_node(x, s, keep_ratio=0.5, protect=1, fuse_rest=1, name="sel")
    mrg = TokenMerge.make_node(x, x, r=3, protect=1, name="mrg")
    div = DiversitySelect.make_node(x, k=4, protect=1, name="div")
    att = SparseAttention.make_node(q, q, q, pattern="block_topk", block_size=8, topk=2, name="att")
    nodes = [sel, mrg, div, att]
    outs = [n.outputs[0] for n in nodes]
    for i, o in enumerate(outs):
        o.name = f"y{i}"
    model = ir.Model(ir.Graph([x, s, q], outs, nodes=nodes, opset_imports={"": 18}, name="g"), ir_version=10)
    for n in nodes:
        add_node_function(model, n)
    return model


def test_count_flops_scales_graphprune_nodes_with_the_batch():
    model = _model_with_every_op()
    one = count_flops(model, batch=1).per_node
    eight = count_flops(model, batch=8).per_node
    for name in ("sel", "mrg", "div", "att"):
        assert one[name] > 0, name
        assert eight[name] == 8 * one[name], name
    # and the rule is the definition's formula at the concrete shape
    assert one["sel"] == 2 * 1 * 17 * 8  # fuse_rest: one weighted sum over the tokens


def test_output_shapes_are_annotated_from_the_shape_function():
    model = _model_with_every_op()
    sel, mrg, div, att = list(model.graph)
    assert list(sel.outputs[0].shape) == [ir.SymbolicDim("batch"), 1 + 8 + 1, 8]  # ceil(0.5 * 16) = 8, + fused
    assert list(sel.outputs[1].shape)[1] == 9 and sel.outputs[1].dtype == ir.DataType.INT64
    assert list(mrg.outputs[0].shape)[1] == 17 - 3
    assert list(div.outputs[0].shape)[1] == 5
    assert list(att.outputs[0].shape)[1:] == [2, 24, 8]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_bfloat16_bodies_are_built_in_bfloat16():
    model = _model_with_every_op(ir.DataType.BFLOAT16)
    for fn in model.functions.values():
        consts = [n for n in fn if n.op_type == "Constant"]
        floats = [n for n in consts if n.attributes["value"].as_tensor().dtype.is_floating_point()]
        other = [n for n in floats if n.attributes["value"].as_tensor().dtype != ir.DataType.BFLOAT16]
        assert len(other) < len(floats), fn.name
        # OneHot's values have no bfloat16 in opset 18 either: float32 values, cast after
        assert all({u.op_type for u, _ in n.outputs[0].uses()} == {"OneHot"} for n in other), fn.name
        # float32 appears only where opset-18 TopK lacks bfloat16 (ranking, exact); the data stays bfloat16
        to_f32 = [n for n in fn if n.op_type == "Cast" and n.attributes["to"].value == ir.DataType.FLOAT]
        assert all({u.op_type for u, _ in n.outputs[0].uses()} == {"TopK"} for n in to_f32), fn.name
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_attributes_are_checked_and_named():
    with pytest.raises(ConfigError, match="^keep_ratio: must be <= 1"):
        TokenSelect.normalize(keep_ratio=1.5)
    with pytest.raises(ConfigError, match="^k: expected int"):
        TokenSelect.normalize(k="three")
    with pytest.raises(ConfigError, match="unknown attribute.*ratio"):
        TokenSelect.normalize(ratio=0.5)
    with pytest.raises(ConfigError, match="^pattern"):
        SparseAttention.normalize(pattern="diagonal")
    a = TokenSelect.normalize(keep_order=False)
    assert a == {"k": 0, "keep_ratio": 1.0, "protect": 0, "keep_order": 0, "fuse_rest": 0}


def test_too_few_tokens_is_an_error_where_shapes_are_known():
    x = np.zeros((1, 3, 4), np.float32)
    with pytest.raises(ValueError, match="needs k tokens"):
        DiversitySelect.reference(x, k=4)
    with pytest.raises(ValueError, match="needs k tokens"):
        DiversitySelect.make_node(_value("x", [1, 3, 4]), k=4)


def test_dim_expressions_fold_and_evaluate():
    n = Dim.of("N")
    e = dmax(1, dmin(n - 1, cdiv((n - 1) * 7, 10)))  # TokenSelect's kept count at keep_ratio 0.7, protect 1
    assert e.eval({"N": 197}) == 138 and e.symbols() == {"N"}
    assert str(n + 2 - 2) == "N" and dmin(3, 5).static == 3 and (n * 0).static == 0

    class Strings(DimOps):  # any representation, e.g. TensorRT shape expressions; here strings
        def combine(self, op, a, b):
            return f"{op}({a},{b})"

    assert e.eval({"N": "n"}, Strings()) == "max(1,min(-(n,1),//(+(*(-(n,1),7),9),10)))"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_plugin_descriptor(name):
    spec = REGISTRY[name]
    d = spec.plugin_descriptor()
    assert d.name == name and d.namespace == PLUGIN_NAMESPACE == "graphprune" and d.version == "1"
    assert "." not in d.namespace
    assert {t for _, t, _ in d.fields} <= {"int", "float", "string", "int32[]", "float32[]"}
    assert [f for f, _, _ in d.fields] == [a.name for a in spec.attributes]
    assert d.onnx_attributes() == {"plugin_namespace": "graphprune", "plugin_version": "1"}


@pytest.mark.parametrize("name,inputs,attrs", [
    ("TokenSelect", [(2, 197, 8), (2, 197)], {"keep_ratio": 0.7, "protect": 1, "fuse_rest": 1}),
    ("TokenMerge", [(2, 50, 8), (2, 50, 4)], {"r": 16, "protect": 1}),
    ("DiversitySelect", [(3, 20, 8)], {"k": 6}),
    ("SparseAttention", [(1, 2, 40, 8)] * 3, {"pattern": "sliding_window", "window": 8}),
])
def test_plugin_shapes_match_the_reference(name, inputs, attrs):
    """The descriptor's integer shape expressions give the shapes the reference produces."""
    spec = REGISTRY[name]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in inputs]
    want = [o.shape for o in spec.reference(*arrays, **attrs)]
    got = spec.plugin_descriptor().shape(inputs, attrs, DimOps())
    assert got == want


def test_torch_op_takes_onnx_attribute_names():
    torch = pytest.importorskip("torch")
    import graphprune.torch  # noqa: F401 - registers torch.ops.graphprune.*

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 4)).astype(np.float32)
    s = rng.random((2, 9)).astype(np.float32)
    y, idx = torch.ops.graphprune.token_select(torch.from_numpy(x), torch.from_numpy(s), k=3, protect=1,
                                               keep_order=1, fuse_rest=0)
    ry, ridx = TokenSelect.reference(x, s, k=3, protect=1, keep_order=1, fuse_rest=0)
    np.testing.assert_array_equal(idx.numpy(), ridx)
    np.testing.assert_allclose(y.numpy(), ry, rtol=1e-6)
    for op in ("token_select", "token_merge", "diversity_select", "sparse_attention"):
        assert hasattr(torch.ops.graphprune, op)


def test_the_two_flops_counters_have_two_names():
    """``analysis.count_flops`` (static, runs nothing) and ``measure_flops`` (completes shapes in ORT) are different
    functions with different names; the old top-level ``graphprune.count_flops`` warns and is ``measure_flops``."""
    import warnings

    import graphprune
    from graphprune.analysis import count_flops as static
    from graphprune.backends.onnxruntime import measure_flops

    assert static is not measure_flops and "count_flops" not in graphprune.__all__
    assert graphprune.measure_flops is measure_flops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert graphprune.count_flops is measure_flops
    assert [w.category for w in caught] == [DeprecationWarning] and "measure_flops" in str(caught[0].message)
    model = _model_with_every_op()
    assert measure_flops(model, batch=2).flops == static(model, batch=2).flops > 0
