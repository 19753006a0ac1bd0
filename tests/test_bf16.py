"""bfloat16 models end to end: loading, the three pass families, calibration and verification.

ONNX Runtime's CPU provider has no bfloat16 kernels, so verification runs the models' float32 twins with every op's
output rounded to bfloat16 (``graphprune._dtype.upcast_bfloat16(round_outputs=True)``) and says so, and calibration
reads the plain float32 twin; the written model stays bfloat16. References: the torch module in float32 on the same
bfloat16-rounded weights, a numpy op-by-op bfloat16 reference, and the unoptimized model's own twin.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

import graphprune as gp
from graphprune import _dtype
from graphprune.backends import onnxruntime as backend

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def vit_bf16(tmp_path_factory):
    """A small ViT exported in bfloat16, and the float32 module on the same (bfloat16-rounded) weights."""
    import graphprune.torch as gtorch
    from examples import models

    folder = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    vit = models.ViT(img_size=32, patch=8, dim=64, depth=3, heads=4, num_classes=10).eval().bfloat16()
    path = gtorch.export(vit, (torch.randn(2, 3, 32, 32).bfloat16(),), folder / "vit_bf16.onnx")
    return path, vit.float()


def _x(seed: int = 0, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(ml_dtypes.bfloat16)


def _twin_output(path, x, round_outputs: bool = True) -> np.ndarray:
    m = gp.load_model(path)
    assert _dtype.upcast_bfloat16(m, round_outputs=round_outputs)
    return backend.run(m, {"x": x})[0]


def test_the_export_is_bfloat16_and_ort_cpu_refuses_it(vit_bf16):
    path, _ = vit_bf16
    m = gp.load_model(path)
    assert _dtype.has_bfloat16(m)
    dtypes = {v.const_value.dtype for v in m.graph.initializers.values() if v.const_value.dtype.is_floating_point()}
    assert dtypes == {ir.DataType.BFLOAT16}
    with pytest.raises(Exception, match="bfloat16"):
        backend.make_session(path)


def test_the_float32_twin_computes_the_module_on_the_same_weights(vit_bf16):
    path, module = vit_bf16
    m = gp.load_model(path)
    assert _dtype.upcast_bfloat16(m) and not _dtype.has_bfloat16(m)
    assert all(v.const_value.dtype != ir.DataType.BFLOAT16 for v in m.graph.initializers.values())
    x = _x()
    got = backend.run(m, {"x": x})[0]  # a bfloat16 feed: upcast for the float32 input
    with torch.no_grad():
        want = module(torch.from_numpy(x.astype(np.float32))).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the source file and a fresh load are untouched: only the in-memory copy was rewritten
    assert _dtype.has_bfloat16(gp.load_model(path))


@pytest.mark.parametrize("family", ["cleanup", "token_drop", "channel_prune", "sparse_attention"])
def test_bfloat16_model_through_each_family(vit_bf16, family, tmp_path):
    """The written model stays bfloat16; verification reports the float32 twins and matches its own figures."""
    path, _ = vit_bf16
    cfg = {"token_drop": {"keep_ratio": 0.7}, "channel_prune": {"ratio": 0.3},
           "sparse_attention": {"pattern": "sliding_window", "window": 4, "allow_more_flops": True},
           "cleanup": {}}[family]
    pipe = gp.Pipeline().add(family, **cfg) if family == "cleanup" else gp.Pipeline().add(family, **cfg).add("cleanup")
    report = gp.optimize(path, tmp_path / "o.onnx", pipe, force=True)
    rec = report["passes"][0]
    if family != "cleanup":
        assert rec["changed"], rec["skipped"]
    if family in ("token_drop", "channel_prune"):
        assert report["flops"]["ratio"] < 0.98
    assert report["verify"]["compute_dtype"] == _dtype.BF16_EMULATED
    assert any(w == f"verification {_dtype.BF16_NOTE}" for w in report["warnings"]), report["warnings"]
    out = gp.load_model(tmp_path / "o.onnx")
    floats = {v.const_value.dtype for v in out.graph.initializers.values() if v.const_value.dtype.is_floating_point()}
    assert ir.DataType.BFLOAT16 in floats and ir.DataType.FLOAT not in floats
    assert out.graph.outputs[0].dtype == ir.DataType.BFLOAT16
    if family == "sparse_attention":  # 17 tokens: the window costs FLOPs (allow_more_flops), the op is there
        assert sum(n.op_type == "SparseAttention" and n.domain == "ai.graphprune" for n in out.graph) == 3
    x = _x(seed=5)
    a, b = _twin_output(path, x).astype(np.float64), _twin_output(tmp_path / "o.onnx", x).astype(np.float64)
    assert a.shape == b.shape
    if family == "cleanup":
        np.testing.assert_allclose(b, a, atol=1e-5)
        assert report["verify"]["passed"] and report["verify"]["cosine_min"] > 0.9999
    cos = float(np.min((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))
    assert report["verify"]["cosine_min"] == pytest.approx(cos, abs=0.25)  # same figure, other samples


def test_calibration_reads_bfloat16_activations_through_the_twin(vit_bf16):
    """Activation probes (the calibration runs behind activation-aware scores) work on a bfloat16 model: they read
    the float32 twin's values, and leave the model as it was."""
    path, _ = vit_bf16

    def matmuls(model):
        return [n.outputs[0] for n in model.graph if n.op_type == "MatMul"][:2]

    m = gp.load_model(path)
    arrays = next(backend.probe(m, matmuls(m), [{"x": _x()}]))
    twin = gp.load_model(path)
    _dtype.upcast_bfloat16(twin)
    want = next(backend.probe(twin, matmuls(twin), [{"x": _x()}]))
    assert [a.dtype for a in arrays] == [np.float32, np.float32]
    for a, w in zip(arrays, want, strict=True):
        np.testing.assert_array_equal(a, w)
    assert _dtype.has_bfloat16(m)  # the probe ran a rewritten clone


def _cli(args, capsys) -> tuple[int, str]:
    from graphprune.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_bench_on_a_bfloat16_model_is_refused_in_one_line(vit_bf16, tmp_path, capsys):
    path, _ = vit_bf16
    code, err = _cli(["optimize", path, "-o", tmp_path / "o.onnx", "--bench"], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "bfloat16" in err and "Traceback" not in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_the_report_json_says_how_verification_ran(vit_bf16, tmp_path, capsys):
    path, _ = vit_bf16
    code, err = _cli(["optimize", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verify"]["compute_dtype"] == _dtype.BF16_EMULATED and rep["verify"]["passed"]
    assert "bfloat16" in err  # the warning is printed


def _bf16(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_emulation_rounds_every_op_output_like_a_bfloat16_kernel(tmp_path):
    """``round_outputs``: each op computes in float32 and its output is rounded to bfloat16 (what a bfloat16
    kernel accumulating in float32 returns). Checked op by op against numpy on the twin's own inputs to that op;
    outputs (here also intermediate values) keep their names."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 32)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal(32).astype(ml_dtypes.bfloat16)
    inits = [onnx.numpy_helper.from_array(w.astype(np.float32), "w"), onnx.numpy_helper.from_array(b.astype(np.float32), "b")]
    for t, a in zip(inits, (w, b), strict=True):  # stored as bfloat16
        t.data_type, t.raw_data = TensorProto.BFLOAT16, a.tobytes()
        t.ClearField("float_data")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Softmax", ["a"], ["y"], axis=-1)]
    outs = [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [None, 32]) for n in ("h", "a", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [None, 16])],
                              outs, inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = rng.standard_normal((64, 16)).astype(ml_dtypes.bfloat16)
    m = gp.load_model(path)
    _dtype.upcast_bfloat16(m, round_outputs=True)
    assert [v.name for v in m.graph.outputs] == ["h", "a", "y"]
    h, a, y = backend.run(m, {"x": x})
    for got in (h, a, y):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, _bf16(got))  # every value is a bfloat16 number

    def within_one_step(got, want):  # float32 summation order may move a value across a rounding boundary
        ulp = 2.0 ** -7 * np.maximum(np.abs(want), 2.0 ** -126)
        assert (np.abs(got - want) <= ulp).all() and (got == want).mean() > 0.97

    within_one_step(h, _bf16(np.asarray(x, np.float32) @ np.asarray(w, np.float32)))
    np.testing.assert_array_equal(a, _bf16(h + np.asarray(b, np.float32)))
    e = np.exp(a - a.max(-1, keepdims=True))
    within_one_step(y, _bf16(e / e.sum(-1, keepdims=True)))
    plain = gp.load_model(path)
    _dtype.upcast_bfloat16(plain)
    assert not np.array_equal(backend.run(plain, {"x": x})[0], _bf16(backend.run(plain, {"x": x})[0]))
