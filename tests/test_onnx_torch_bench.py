"""``benchmarks/onnx_torch.py``, the interpreter ``bench_distill`` trains ONNX weights with: it computes what ONNX
Runtime computes on exported models of several kinds, gradients reach the layer weights, and ``write_back`` puts
trained weights where ONNX Runtime reads them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.onnx_torch import OnnxModule, unsupported  # noqa: E402
from graphprune.io import load_model, save_model  # noqa: E402
from tests import _zoo  # noqa: E402

_BY_NAME = {m.name: m for m in _zoo.ZOO}


def _outputs(mod: OnnxModule, feed: dict) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.detach().numpy() for t in mod.run_feed(feed)]


@pytest.mark.parametrize("name", ["bert", "vit", "timm_vit", "llama", "plain_cnn", "grouped_cnn"])
def test_equals_onnxruntime_on_exported_models(tmp_path, name):
    path = _zoo.export(_BY_NAME[name], tmp_path)
    feeds = _zoo._feeds(path)
    refs = _zoo._run(path, feeds)
    mod = OnnxModule(load_model(path))
    for feed, ref in zip(feeds, refs):
        got = _outputs(mod, feed)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max())))


def test_gradients_reach_layer_weights_and_write_back_is_what_onnxruntime_runs(tmp_path):
    path = _zoo.export(_BY_NAME["bert"], tmp_path)
    model = load_model(path)
    mod = OnnxModule(model)
    feed = _zoo._feeds(path)[0]
    out = mod.run_feed(feed)[0]
    out.pow(2).mean().backward()
    grads = {k: p.grad for k, p in mod.params.items()}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    matmul_weights = {v.name for v in model.graph.initializers.values()
                      if any(u.op_type == "MatMul" for u, _ in v.uses()) and v.const_value is not None
                      and v.const_value.numpy().ndim == 2}
    assert matmul_weights <= {mod._names[k].name for k in mod.params}  # every layer weight is trained
    # the word embedding (read by Gather only) is not a parameter
    gathered = [v.name for v in model.graph.initializers.values() if v.uses() and
                all(u.op_type == "Gather" for u, _ in v.uses()) and v.const_value.numpy().ndim == 2]
    assert gathered and not set(gathered) & {mod._names[k].name for k in mod.params}
    with torch.no_grad():
        for p in mod.params.values():
            p.add_(0.01 * torch.randn_like(p))
    changed = _outputs(mod, feed)[0]
    mod.write_back()
    out_path = tmp_path / "trained.onnx"
    save_model(model, out_path)
    ref = _zoo._run(out_path, [feed])[0][0]
    original = _zoo._run(path, [feed])[0][0]
    np.testing.assert_allclose(changed, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref - original).max() > 1e-3  # the file holds the new weights, not the old


def test_an_unsupported_op_is_named_before_anything_runs():
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Hardmax", [x], num_outputs=1)
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    assert unsupported(model) == ["ai.onnx.Hardmax"]
    with pytest.raises(ValueError, match="Hardmax"):
        OnnxModule(model)


def _one_node(op: str, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray], n_out: int = 1, **attrs):
    from onnx import helper, numpy_helper

    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(f"y{i}", 0, None) for i in range(n_out)]
    node = helper.make_node(op, [*inputs, *consts], [o.name for o in outs], **attrs)
    graph = helper.make_graph([node], "g", ins, outs, [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


_I = np.int64
_CASES = [
    ("Slice", {"starts": np.array([-1, 1], _I), "ends": np.array([-100, 2**62], _I), "axes": np.array([1, 0], _I),
               "steps": np.array([-2, 1], _I)}, 1, {}),
    ("Slice", {"starts": np.array([7], _I), "ends": np.array([0], _I), "axes": np.array([-1], _I),
               "steps": np.array([-3], _I)}, 1, {}),
    ("Expand", {"shape": np.array([2, 1, 1, 5], _I)}, 1, {}),
    ("Gather", {"idx": np.array([[-1, 0], [2, -3]], _I)}, 1, {"axis": 1}),
    ("GatherElements", {"idx": np.array([[0, -1, 2, 1, 0], [3, 0, 1, 2, -2], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], _I)},
     1, {"axis": 0}),
    ("Split", {}, 2, {"axis": 1, "num_outputs": 2}),
    ("Split", {"split": np.array([1, 3], _I)}, 2, {"axis": 0}),
    ("ReduceMean", {"axes": np.array([-1, 0], _I)}, 1, {"keepdims": 0}),
    ("ReduceL2", {"axes": np.array([1], _I)}, 1, {}),
    ("Trilu", {"k": np.array(1, _I)}, 1, {"upper": 0}),
    ("Unsqueeze", {"axes": np.array([-1, 0], _I)}, 1, {}),
    ("CumSum", {"axis": np.array(-1, _I)}, 1, {}),
    ("Softmax", {}, 1, {"axis": 0}),
    ("Transpose", {}, 1, {}),
    ("Flatten", {}, 1, {"axis": 0}),
]


@pytest.mark.parametrize("op,consts,n_out,attrs", _CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(_CASES)])
def test_ops_equal_the_onnx_reference_evaluator(op, consts, n_out, attrs):
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    if op == "Expand":
        x = x[:, :1]
    proto = _one_node(op, {"x": x}, consts, n_out, **attrs)
    ref = ReferenceEvaluator(proto).run(None, {"x": x})
    got = _outputs(OnnxModule(ir.from_proto(proto)), {"x": x})
    assert len(got) == len(ref) == n_out
    for g, r in zip(got, ref):
        assert g.shape == r.shape, (g.shape, r.shape)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
