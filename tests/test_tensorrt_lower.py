"""``graphprune lower --backend tensorrt``: plugin attributes, static checks, ORT equality, CLI errors; and
``graphprune build`` without TensorRT (one line, exit 2)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx_ir as ir
import pytest

from graphprune.analysis.inputs import example_inputs
from graphprune.backends import tensorrt as trtb
from graphprune.backends.onnxruntime import run
from graphprune.cli import main
from graphprune.io import load_model, save_model
from graphprune.ops import DOMAIN, REGISTRY, SparseAttention, TokenMerge, TokenSelect, add_node_function
from graphprune.passes import get_pass

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _cli(argv) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _optimized(export, tmp_path, kind: str):
    path = export("vit_tiny", 18)
    model = load_model(path)
    if kind == "token_drop":
        get_pass("token_drop")({"keep_ratio": 0.5, "layers": [1, 2]})(model)
    elif kind == "tome":
        get_pass("token_drop")({"method": "tome", "r": 8, "layers": [1]})(model)
    elif kind == "diversity":
        get_pass("token_drop")({"method": "diversity", "keep_ratio": 0.5, "layers": [1]})(model)
    else:  # 17 tokens: these patterns execute more FLOPs than the dense core; the lowering is what is tested
        get_pass("sparse_attention")({"allow_more_flops": True} | dict(kind))(model)
    out = tmp_path / "opt.onnx"
    save_model(model, out)
    return out


CASES = ["token_drop", "tome", "diversity",
         (("pattern", "sliding_window"), ("window", 16)),
         (("pattern", "block_topk"), ("block_size", 16), ("topk", 2))]


@pytest.mark.parametrize("kind", CASES, ids=lambda c: c if isinstance(c, str) else dict(c)["pattern"])
def test_lower_marks_plugins_and_ort_still_matches(export, tmp_path, kind, capsys):
    src = _optimized(export, tmp_path, kind)
    before = src.read_bytes()
    dst = tmp_path / "trt.onnx"
    assert _cli(["lower", str(src), "--backend", "tensorrt", "-o", str(dst)]) == 0, capsys.readouterr().err
    assert src.read_bytes() == before  # the input is never written
    lowered, orig = load_model(dst), load_model(src)
    nodes = [n for n in lowered.graph.all_nodes() if n.domain == DOMAIN]
    assert nodes
    for n in nodes:
        assert n.attributes["plugin_namespace"].value == "graphprune"
        assert "." not in n.attributes["plugin_namespace"].value
        assert n.attributes["plugin_version"].value == "1"
        assert len(n.inputs) == len(REGISTRY[n.op_type].inputs) and all(i is not None for i in n.inputs)
        for attr in n.attributes.values():
            assert attr.type in (ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING,
                                 ir.AttributeType.INTS, ir.AttributeType.FLOATS)
    feeds = example_inputs(orig, batch=2)
    for a, b in zip(run(lowered, feeds), run(orig, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_token_select_ratio_becomes_explicit_k():
    model, node = _token_select_model(65)
    report = trtb.lower(model)
    expected = TokenSelect.kept(65, TokenSelect.normalize(keep_ratio=0.5, protect=1)).static
    assert TokenSelect.attrs_of(node)["k"] == expected == 32 and len(report.explicit_k) == 1
    # the output dims are integer expressions; at a static N they are the node's static output dims
    exprs = trtb.output_expressions(node)
    assert list(exprs[0][1:]) == [1 + expected, 8] == list(node.outputs[0].shape)[1:]
    assert exprs[0][0].eval({"in0.0": 3}) == 3
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 65, 8)).astype(np.float32),
             "s": np.random.default_rng(1).standard_normal((2, 65)).astype(np.float32)}
    ref = TokenSelect.reference(feeds["x"], feeds["s"], keep_ratio=0.5, protect=1)
    for a, b in zip(run(model, feeds), ref):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(model.functions) == 1  # the body of the old attribute set is gone


def _token_select_model(n, keep_ratio=0.5, k=0):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", n, 8]))
    s = ir.Value(name="s", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", n]))
    node = TokenSelect.make_node(x, s, keep_ratio=keep_ratio, k=k, protect=1, name="select")
    model = ir.Model(ir.Graph([x, s], list(node.outputs), nodes=[node], opset_imports={"": 18}), ir_version=10)
    add_node_function(model, node)
    return model, node


def test_dynamic_n_keeps_integer_ratio_expression():
    model, node = _token_select_model("N")
    report = trtb.lower(model)
    assert not report.explicit_k
    y_tokens = report.shapes["select"][0][1]
    assert "N" not in y_tokens or "in0.1" in y_tokens  # over the input's dim symbol
    # evaluated at N = 197 the expression gives the op's count
    expr = trtb.output_expressions(node)[0][1]
    assert expr.eval({"in0.1": 197}) == 1 + TokenSelect.kept(197, TokenSelect.normalize(keep_ratio=0.5, protect=1)).static
    assert any("runtime K" in note for note in report.notes)


def test_topk_limit_where_bodies_inline():
    model, _ = _token_select_model(5000, k=4000)
    with pytest.raises(trtb.LoweringError, match="K = 4000 > 3840"):
        trtb.lower(model)
    model, _ = _token_select_model(5000, k=4000)
    report = trtb.lower(model, strip_bodies=True)  # no body, no inlined TopK
    assert report.stripped_bodies == 1 and not [f for f in model.functions.values() if f.domain == DOMAIN]


def test_op_name_collision_is_refused():
    with pytest.raises(trtb.LoweringError, match="collides with the standard ONNX op TopK"):
        trtb.check_op_names(["TopK"])
    trtb.check_op_names(sorted(REGISTRY))


def test_illegal_attribute_type_is_refused():
    model, node = _token_select_model(20)
    node.attributes["extra"] = ir.AttrTensor("extra", ir.tensor(np.zeros(2, np.float32)))
    with pytest.raises(trtb.LoweringError, match="attribute extra has type TENSOR"):
        trtb.lower(model)


def test_lower_cli_errors(tmp_path, capsys):
    model, _ = _token_select_model(5000, k=4000)
    src = tmp_path / "m.onnx"
    save_model(model, src)
    for argv, text in ([["lower", str(src), "-o", str(tmp_path / "o.onnx")], "3840"],
                       [["lower", str(src), "--backend", "onnxruntime", "-o", str(tmp_path / "o.onnx")], "--backend"],
                       [["lower", str(src), "-o", str(src)], ""]):
        assert _cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_parse_shapes():
    assert trtb.parse_shapes(["x:1x3/2x3/8x3"]) == {"x": ((1, 3), (2, 3), (8, 3))}
    assert trtb.parse_shapes(["x:4x3"]) == {"x": ((4, 3),) * 3}
    with pytest.raises(trtb.ConfigError, match="min <= opt <= max"):
        trtb.parse_shapes(["x:8x3/2x3/4x3"])


def test_check_plugin_layers_names_the_fallback():
    trtb.check_plugin_layers({"TokenSelect": 2}, {"TokenSelect": 2})
    with pytest.raises(trtb.GraphpruneError, match=r"TokenSelect \(1 of 2\)"):
        trtb.check_plugin_layers({"TokenSelect": 2}, {"TokenSelect": 1})


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_build_without_tensorrt_is_one_line_exit_2(tmp_path, capsys):
    model, _ = _token_select_model(20)
    src = tmp_path / "m.onnx"
    save_model(model, src)
    assert _cli(["build", str(src), "--backend", "tensorrt", "-o", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs TensorRT" in err and "tensorrt" in err
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it cannot be on these machines)")
def test_build_and_verify_with_tensorrt(export, tmp_path):  # pragma: no cover - never ran here
    src = _optimized(export, tmp_path, (("pattern", "sliding_window"), ("window", 16)))
    res = trtb.build(src, tmp_path / "m.plan", shapes=None)
    assert res.plugin_layers.get("SparseAttention")
    feeds = example_inputs(load_model(src), batch=1)
    assert trtb.verify_and_bench(src, res.plan, feeds, runs=3)["max_abs_err"] < 1e-3


def test_fp16_conversion_points_nodes_at_float16_bodies():
    model, _ = _token_select_model("N")
    half = trtb.to_fp16(model)
    trtb.lower(half)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 20, 8)).astype(np.float16)
    s = rng.random((2, 20)).astype(np.float16)
    y, idx = run(half, {"x": x, "s": s})
    ry, ri = TokenSelect.reference(x, s, keep_ratio=0.5, protect=1)
    assert y.dtype == np.float16 and len(half.functions) == 1
    np.testing.assert_array_equal(idx, ri)
    np.testing.assert_allclose(y.astype(np.float32), ry.astype(np.float32), atol=1e-3)


def _merge_model(n=17, sized=False):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", n, 8]))
    m = ir.Value(name="m", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", n, 4]))
    ins = [x, m]
    if sized:
        ins.append(ir.Value(name="s", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", n, 1])))
    node = TokenMerge.make_node(*ins, r=4, protect=1, name="merge")
    model = ir.Model(ir.Graph(ins, list(node.outputs), nodes=[node], opset_imports={"": 18}), ir_version=10)
    add_node_function(model, node)
    return model, node


def test_absent_size_becomes_ones_for_the_plugin():
    model, node = _merge_model()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 17, 8)).astype(np.float32),
             "m": rng.standard_normal((2, 17, 4)).astype(np.float32)}
    before = run(model, feeds)
    report = trtb.lower(model)
    assert len(node.inputs) == 3 and node.inputs[2].producer().op_type == "CastLike"
    assert report.filled == ["merge: size absent -> ones"]
    assert len(model.functions) == 1  # the body for (x, metric, size); the old one is gone
    after = run(model, feeds)
    ref = TokenMerge.reference(feeds["x"], feeds["m"], r=4, protect=1)
    for a, b, r in zip(after, before, ref):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, r, atol=1e-6)
    model, node = _merge_model(sized=True)
    assert not trtb.lower(model).filled and node.inputs[2].name == "s"


def test_absent_bias_and_layout_become_placeholders():
    q, k, v = (ir.Value(name=c, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 32, 16])) for c in "qkv")
    node = SparseAttention.make_node(q, k, v, pattern="sliding_window", window=8, num_global=1, name="attn")
    model = ir.Model(ir.Graph([q, k, v], list(node.outputs), nodes=[node], opset_imports={"": 18}), ir_version=10)
    add_node_function(model, node)
    rng = np.random.default_rng(1)
    feeds = {c: rng.standard_normal((1, 2, 32, 16)).astype(np.float32) for c in "qkv"}
    before = run(model, feeds)[0]
    report = trtb.lower(model)
    assert [i.shape.dims for i in node.inputs[3:]] == [(1, 1, 1, 1), (1, 1, 1)]
    assert node.inputs[3].dtype == ir.DataType.FLOAT and node.inputs[4].dtype == ir.DataType.INT64
    assert len(report.filled) == 2
    np.testing.assert_array_equal(run(model, feeds)[0], before)
    np.testing.assert_allclose(before, SparseAttention.reference(feeds["q"], feeds["k"], feeds["v"], pattern="sliding_window",
                                                                 window=8, num_global=1)[0], atol=1e-5)


def test_optional_input_without_a_rule_is_refused(monkeypatch):
    from graphprune.backends import plugins

    monkeypatch.setattr(plugins, "OPTIONAL_INPUTS", {})
    model, _ = _merge_model()
    with pytest.raises(trtb.LoweringError, match="merge: optional input size of TokenMerge is absent"):
        trtb.lower(model)


def test_aot_check_before_tensorrt():
    """--aot's static check on the lowered model: a TokenMerge at a dynamic N is refused with the node named; at a
    static N it passes (as does a TokenSelect at any N)."""
    model, _ = _merge_model()
    trtb.lower(model)
    trtb.check_aot(model)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "N", 8]))
    m = ir.Value(name="m", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "N", 4]))
    node = TokenMerge.make_node(x, m, r=4, name="merge_dyn")
    dyn = ir.Model(ir.Graph([x, m], list(node.outputs), nodes=[node], opset_imports={"": 18}), ir_version=10)
    add_node_function(dyn, node)
    trtb.lower(dyn)
    with pytest.raises(trtb.GraphpruneError, match="^merge_dyn: --aot: TokenMerge needs a static token count"):
        trtb.check_aot(dyn)
    sel, _ = _token_select_model("N")
    trtb.lower(sel)
    trtb.check_aot(sel)


def test_aot_check_takes_the_routed_patterns(export, tmp_path):
    """--aot's static check on a lowered sparse_attention block_topk model: no refusal, and every node is planned
    on the routed table-free kernel at its static dims (one program per 16-token routing block)."""
    from graphprune.backends import plugins

    kind = (("pattern", "block_topk"), ("block_size", 16), ("topk", 2))
    model = load_model(_optimized(export, tmp_path, kind))
    trtb.lower(model)
    nodes = [n for n in model.graph.all_nodes() if n.op_type == "SparseAttention"]
    assert nodes and plugins.aot_refusal([(n.op_type, SparseAttention.attrs_of(n)) for n in nodes]) is None
    trtb.check_aot(model)
    for n in nodes:
        dims = [list(v.shape) for v in n.inputs]
        plan = plugins.aot_plan("SparseAttention", dims, SparseAttention.attrs_of(n), True)
        assert plan["kernel"] == "sparse_attention_routed" and plan["constexprs"]["ROUTE"] == 0
        assert plan["constexprs"]["BS"] == min(16, dims[0][2]) and plan["scalars"] == [(0, 1), (0, 2), (0, 3), (2, 3)]
