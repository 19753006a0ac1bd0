"""SparseAttention op: ORT (the standard-op function body) against dense attention and the numpy reference."""

from __future__ import annotations

import array_api_compat.numpy as xnp
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphprune.errors import ConfigError
from graphprune.ops import SparseAttention, add_function
from graphprune.ops import _vertical_slash as vs
from graphprune.ops import sparse_attention as sa

H, D = 2, 16


def _model(attrs: dict, shape: list, bias_shape: list | None = None, layout: np.ndarray | None = None) -> ir.Model:
    vals = [ir.Value(name=nm, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT)) for nm in "qkv"]
    inputs = list(vals)
    bias = lay = None
    if bias_shape is not None:
        bias = ir.Value(name="bias", shape=ir.Shape(bias_shape), type=ir.TensorType(ir.DataType.FLOAT))
        inputs.append(bias)
    inits = []
    if layout is not None:
        lay = ir.Value(name="layout", const_value=ir.tensor(layout.astype(np.float32)))
        inits.append(lay)
    node, fn = sa.make_node(*vals, attrs, bias=bias, layout=lay)
    node.outputs[0].name = "y"
    graph = ir.Graph(inputs, [node.outputs[0]], nodes=[node], initializers=inits, opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    add_function(model, fn)
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _inputs(b: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, H, n, D)).astype(np.float32) for _ in range(3)]


def _run(pattern: str, q, k, v, bias=None, layout=None, **params) -> tuple[np.ndarray, dict]:
    b, _, n, _ = q.shape
    kind = "none" if bias is None else ("key" if bias.shape[2] == 1 else "full")
    attrs = sa.normalize(pattern, n, 1 / np.sqrt(D), kind, **params)
    model = _model(attrs, [b, H, n, D], None if bias is None else list(bias.shape), layout)
    feeds = {"q": q, "k": k, "v": v} | ({} if bias is None else {"bias": bias})
    return _session(model).run(None, feeds)[0], attrs


def _dense(q, k, v, bias=None) -> np.ndarray:
    s = (q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)) / np.sqrt(D)
    if bias is not None:
        s = s + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)


def _exact(pattern: str, n: int):
    """Settings of each pattern that must equal dense attention."""
    if pattern == "sliding_window":
        return {"window": n, "num_global": 1}, None
    if pattern == "neighborhood_2d":
        grid = {197: (14, 14), 1000: (40, 25), 1024: (32, 32)}[n]
        return {"grid": list(grid), "kernel": max(grid), "num_global": n - grid[0] * grid[1]}, None
    if pattern == "block_topk":
        return {"block_size": 64, "topk": -(-n // 64)}, None
    if pattern == "vertical_slash":  # every block offset kept: causal dense
        return {"block_size": 64, "slash": -(-n // 64), "vertical": 1}, None
    nb = -(-n // 64)
    return {"block_size": 64, "topk": nb}, np.ones((1, nb, nb), dtype=np.float32)


@pytest.mark.parametrize("pattern", sa.PATTERNS)
@pytest.mark.parametrize("n", [197, 1000, 1024])
@pytest.mark.parametrize("batch", [1, 2])
def test_exact_settings_match_dense(pattern, n, batch):
    q, k, v = _inputs(batch, n, seed=n + batch)
    params, layout = _exact(pattern, n)
    y, _ = _run(pattern, q, k, v, layout=layout, **params)
    causal = np.where(np.tril(np.ones((n, n), dtype=bool)), 0.0, -np.inf) if pattern == "vertical_slash" else None
    np.testing.assert_allclose(y, _dense(q, k, v, causal), atol=1e-5, rtol=0)


AGREEMENT = [
    ("sliding_window", 197, {"window": 32}),
    ("sliding_window", 197, {"window": 33, "num_global": 2, "block_size": 24}),
    ("sliding_window", 300, {"window": 40, "causal": True, "num_global": 1}),
    ("sliding_window", 130, {"window": 16, "causal": True}),
    ("neighborhood_2d", 197, {"grid": [14, 14], "kernel": 5, "num_global": 1}),
    ("neighborhood_2d", 197, {"grid": [14, 14], "kernel": 3, "dilation": 2, "num_global": 1}),
    ("neighborhood_2d", 150, {"grid": [10, 15], "kernel": 4, "dilation": 3, "block_size": 3}),
    ("block_topk", 197, {"block_size": 16, "topk": 3}),
    ("block_topk", 200, {"block_size": 32, "topk": 2, "keep_diagonal": False, "keep_first": False}),
    ("block_topk", 256, {"block_size": 64, "topk": 1, "keep_first": False}),
    ("block_topk", 197, {"block_size": 16, "topk": 2, "num_global": 1}),
]


@pytest.mark.parametrize("n", [150, 300])
def test_vertical_slash_agrees_with_reference_and_is_sparse(n):
    """The body at a static N against the op definition; a planted key column is found at run time (every query
    after it sees it) although it lies outside every kept block diagonal of most query blocks."""
    q, k, v = _inputs(2, n, seed=n)
    q += 0.5
    k[:, :, 70] = 2.5  # a column that every query attends to (score about 5 against about ±1)
    params = {"block_size": 16, "vertical": 12, "slash": 3, "last_q": 32, "num_global": 1}
    y, attrs = _run("vertical_slash", q, k, v, **params)
    ref = sa.reference(q, k, v, **{a: b for a, b in attrs.items() if a not in ("seq_len", "bias")})
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=0)
    allowed = vs.allowed(xnp, attrs, q, k)
    assert allowed[:, :, 71:, 70].all() and allowed[:, :, :, 0].any(-1).all()  # planted column, sink
    causal = np.tril(np.ones((n, n), dtype=bool))
    assert not (allowed & ~causal).any() and allowed.sum() < 0.6 * causal.sum() * 2 * H
    dense = _dense(q, k, v, np.where(causal, 0.0, -np.inf))
    assert np.abs(y - dense).max() > 1e-3


@pytest.mark.parametrize("n", [197, 256])
@pytest.mark.parametrize("bias_kind", ["none", "key"])
def test_causal_block_topk(n, bias_kind):
    """``causal``: later key blocks are never routed to, no key after its query is seen (global rows: every earlier
    key), all blocks kept is causal dense; the static body agrees with the definition."""
    q, k, v = _inputs(2, n, seed=n)
    bias = None
    if bias_kind == "key":
        bias = np.zeros((2, 1, 1, n), dtype=np.float32)
        bias[1, ..., n - n // 4:] = -np.inf
    causal = np.tril(np.ones((n, n), dtype=bool))
    cbias = np.where(causal, 0.0, -np.inf)
    for params in ({"block_size": 16, "topk": 3, "causal": True},
                   {"block_size": 32, "topk": 2, "causal": True, "num_global": 2, "keep_first": False}):
        y, attrs = _run("block_topk", q, k, v, bias=bias, **params)
        ref = sa.reference(q, k, v, bias=bias, **{a: b for a, b in attrs.items() if a not in ("seq_len", "bias")})
        np.testing.assert_allclose(y, ref, atol=2e-5, rtol=0)
        allowed = sa.allowed_mask(q, k, bias, **{a: b for a, b in attrs.items() if a != "seq_len"})
        assert not (allowed & ~causal).any() and allowed[:, :, np.arange(n), np.arange(n)].all()
        assert np.abs(y - _dense(q, k, v, cbias + (0 if bias is None else bias))).max() > 1e-3
    nb = -(-n // 16)
    y, _ = _run("block_topk", q, k, v, block_size=16, topk=nb, causal=True)
    np.testing.assert_allclose(y, _dense(q, k, v, cbias), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="keeps the diagonal block"):
        sa.normalize("block_topk", n, 0.25, causal=True, keep_diagonal=False)


@pytest.mark.parametrize(("pattern", "n", "params"), AGREEMENT)
@pytest.mark.parametrize("bias_kind", ["none", "key", "full"])
def test_agrees_with_reference(pattern, n, params, bias_kind):
    q, k, v = _inputs(2, n, seed=len(str(params)))
    rng = np.random.default_rng(1)
    bias = None
    if bias_kind == "key":
        bias = np.zeros((2, 1, 1, n), dtype=np.float32)
        bias[1, ..., n - n // 4:] = -np.inf  # padded tail of the second sequence
    elif bias_kind == "full":
        bias = rng.standard_normal((2, H, n, n)).astype(np.float32)
    y, attrs = _run(pattern, q, k, v, bias=bias, **params)
    ref = sa.reference(q, k, v, bias=bias, **{a: b for a, b in attrs.items() if a not in ("seq_len", "bias")})
    assert not np.isnan(y).any()
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=0)
    # The pattern really restricts attention: the output differs from dense.
    assert np.abs(y - _dense(q, k, v, bias)).max() > 1e-3


@pytest.mark.parametrize("bias_kind", ["none", "key", "full"])
def test_block_layout_agrees_with_reference(bias_kind):
    n, b = 200, 16
    nb = -(-n // b)
    rng = np.random.default_rng(3)
    layout = (rng.random((H, nb, nb)) < 0.25).astype(np.float32)
    layout[:, np.arange(nb), np.arange(nb)] = 1
    q, k, v = _inputs(2, n, seed=5)
    bias = None if bias_kind == "none" else (
        np.where(rng.random((2, 1, 1, n)) < 0.3, -np.inf, 0).astype(np.float32) if bias_kind == "key"
        else rng.standard_normal((1, 1, n, n)).astype(np.float32))
    y, _ = _run("block_layout", q, k, v, bias=bias, layout=layout, block_size=b, topk=int(layout.sum(-1).max()),
                num_global=2)
    ref = sa.reference(q, k, v, bias=bias, layout=layout, pattern="block_layout", block_size=b, topk=1, num_global=2)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=0)


def test_reference_is_dense_restricted():
    """The reference itself, on a case small enough to spell out: window 3 around each token."""
    q, k, v = _inputs(1, 6)
    ref = sa.reference(q, k, v, pattern="sliding_window", window=3)
    allowed = np.zeros((6, 6), dtype=bool)
    for i, (lo, hi) in enumerate([(0, 3), (0, 3), (1, 4), (2, 5), (3, 6), (3, 6)]):
        allowed[i, lo:hi] = True
    bias = np.where(allowed, 0, -np.inf)[None, None]
    np.testing.assert_allclose(ref, _dense(q, k, v, bias), atol=1e-6)


@pytest.mark.parametrize("pattern", ["sliding_window", "block_topk"])
def test_fully_masked_rows_are_finite(pattern):
    """Queries whose allowed keys are all -inf get the mean of V over them (never NaN), like the reference."""
    n = 160
    q, k, v = _inputs(1, n, seed=9)
    bias = np.zeros((1, 1, 1, n), dtype=np.float32)
    bias[..., 64:] = -np.inf
    params = {"window": 16} if pattern == "sliding_window" else {"block_size": 32, "topk": 1, "keep_first": False}
    y, attrs = _run(pattern, q, k, v, bias=bias, **params)
    ref = sa.reference(q, k, v, bias=bias, **{a: b for a, b in attrs.items() if a not in ("seq_len", "bias")})
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=0)
    if pattern == "sliding_window":  # a query in the masked tail sees only masked keys: mean of its window's V
        np.testing.assert_allclose(y[0, :, 150], v[0, :, 142:158].mean(axis=1), atol=1e-5)  # window starts at 150 - 16 // 2


def test_body_cost_follows_pattern():
    """No N x N score tensor: the FLOPs rule (what the body executes) shrinks with the pattern."""
    n = 4096
    cases = {"sliding_window": {"window": 256}, "block_topk": {"block_size": 64, "topk": 8},
             "neighborhood_2d": {"grid": [64, 64], "kernel": 7}}
    for pattern, params in cases.items():
        attrs = sa.normalize(pattern, n, 0.125, **params)
        executed, dense = sa.attention_flops(attrs, 1, 8, 64, 64)
        assert dense / executed > 5, (pattern, dense / executed)
        fn = sa.make_function(attrs)
        ops = [nd.op_type for nd in fn]
        assert "Gather" in ops and 1 <= ops.count("Softmax") <= 6  # one per run of blocks sharing a bias
        if pattern == "block_topk":
            assert "TopK" in ops
        q = ir.Value(name="q", shape=ir.Shape([1, 8, n, 64]))
        node, _ = sa.make_node(q, q, q, attrs)
        assert SparseAttention.node_flops(node, lambda v: tuple(v.shape)) == executed


def test_wrong_length_fails_loudly():
    attrs = sa.normalize("sliding_window", 64, 0.25, window=8)
    sess = _session(_model(attrs, ["b", H, "n", D]))
    q, k, v = _inputs(1, 80)
    with pytest.raises(Exception, match="(?i)shape|mismatch|out of|invalid"):
        sess.run(None, {"q": q, "k": k, "v": v})


def test_dynamic_batch():
    attrs = sa.normalize("block_topk", 100, 0.25, block_size=16, topk=2)
    sess = _session(_model(attrs, ["b", H, 100, D]))
    for batch in (1, 3):
        q, k, v = _inputs(batch, 100, seed=batch)
        ref = sa.reference(q, k, v, pattern="block_topk", block_size=16, topk=2)
        np.testing.assert_allclose(sess.run(None, {"q": q, "k": k, "v": v})[0], ref, atol=2e-5)


@pytest.mark.parametrize(("pattern", "params", "key"), [
    ("sliding_window", {"window": 0}, "window"),
    ("neighborhood_2d", {"grid": [5, 5], "kernel": 3}, "grid"),
    ("neighborhood_2d", {"kernel": 3}, "grid"),
    ("block_topk", {"topk": 1}, "topk"),
    ("diagonal", {}, "pattern"),
])
def test_bad_attributes_name_the_key(pattern, params, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        sa.normalize(pattern, 64, 0.25, **params)
