"""Every registered ``ai.graphprune`` op × every lowering × fp32/fp16 × shapes, against the numpy reference.

Lowerings: the numpy reference itself (its outputs must have the shapes the op's shape function states), the ONNX
function body in ONNX Runtime (static and dynamic input dims), the torch eager kernel
(``torch.ops.graphprune.*``), and a torch module calling the op exported with ``graphprune.torch.export`` and run
in ONNX Runtime. A new op gets these tests by adding a case to ``CASES``; ``test_every_op_has_a_case`` fails
until it does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphprune.ops import REGISTRY, add_node_function
from graphprune.ops._dims import bind, evaluate

torch = pytest.importorskip("torch")
import graphprune.torch as gtorch  # noqa: E402

F16 = np.float16
_IR = {np.dtype(np.float32): ir.DataType.FLOAT, np.dtype(np.float16): ir.DataType.FLOAT16,
       np.dtype(np.int64): ir.DataType.INT64}


@dataclasses.dataclass
class Case:
    op: str
    make: Callable[[np.random.Generator, int, int], tuple[list[np.ndarray | None], dict]]  # (rng, batch, n)
    ns: tuple[int, int]  # a token count, and one that is not a multiple of the block size
    token_axis: int  # the N axis of the first input
    dynamic_n: bool = True  # the body follows a runtime N (False: the body is built for one N)
    fp16_atol: float = 2e-2
    export_dynamic: bool = True  # the torch export can mark (batch, N) dynamic on every input


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _select(**attrs):
    def make(rng, b, n, dtype=np.float32):
        x = _rand(rng, (b, n, 8), dtype)
        scores = rng.permutation(b * n).reshape(b, n).astype(dtype) / (b * n)  # distinct: no ties to break
        return [x, scores], attrs
    return make


def _merge(with_size: bool, **attrs):
    def make(rng, b, n, dtype=np.float32):
        x = _rand(rng, (b, n, 8), dtype)
        metric = _rand(rng, (b, n, 6), dtype)
        size = rng.integers(1, 4, (b, n, 1)).astype(dtype) if with_size else None
        return [x, metric, size], attrs
    return make


def _diverse(**attrs):
    def make(rng, b, n, dtype=np.float32):
        return [_rand(rng, (b, n, 8), dtype)], attrs
    return make


def _sparse(pattern: str, bias: str | None = None, **params):
    def make(rng, b, n, dtype=np.float32):
        h, d = 2, 8
        q, k, v = (_rand(rng, (b, h, n, d), dtype) for _ in range(3))
        attrs = dict(pattern=pattern, **params)
        if pattern not in ("sliding_window", "block_topk", "vertical_slash"):  # built for one N (a grid, a block layout)
            attrs["seq_len"] = n
        if pattern == "neighborhood_2d":
            g = params.get("num_global", 0)
            attrs["grid"] = {26: [5, 5], 29: [4, 7]}[n]
            assert g + attrs["grid"][0] * attrs["grid"][1] == n
        extra: list = []
        if bias == "key":
            mask = np.zeros((b, 1, 1, n), dtype=dtype)
            mask[:, :, :, n - 3:] = np.finfo(dtype).min  # padding keys
            extra, attrs["bias"] = [mask], "key"
        elif bias == "full":
            extra, attrs["bias"] = [_rand(rng, (b, 1, n, n), dtype)], "full"
        if pattern == "block_layout":
            nb = -(-n // params["block_size"])
            lay = (rng.random((h, nb, nb)) < 0.5).astype(dtype)
            lay[:, np.arange(nb), np.arange(nb)] = 1
            attrs["topk"] = int(lay.sum(-1).max())
            extra = [None, lay]
        return [q, k, v, *extra], attrs
    return make


CASES = {
    "TokenSelect-ratio": Case("TokenSelect", _select(keep_ratio=0.6, protect=1), (13, 17), 1),
    "TokenSelect-k-fuse-unordered": Case("TokenSelect", _select(k=5, protect=2, keep_order=0, fuse_rest=1),
                                          (13, 17), 1),
    "TokenMerge-size": Case("TokenMerge", _merge(True, r=4, protect=1), (13, 18), 1),
    "TokenMerge-nosize": Case("TokenMerge", _merge(False, r=100, protect=0), (13, 18), 1),
    "DiversitySelect": Case("DiversitySelect", _diverse(k=4, protect=1, keep_order=1), (13, 17), 1),
    "SparseAttention-sliding_window": Case(
        "SparseAttention", _sparse("sliding_window", window=5, num_global=1, block_size=8), (24, 29), 2),
    "SparseAttention-sliding_window-causal-keybias": Case(
        "SparseAttention", _sparse("sliding_window", "key", window=6, causal=1, block_size=8), (24, 29), 2,
        export_dynamic=False),  # one dynamic-axes map for every input: the key bias has no token axis 2
    "SparseAttention-sliding_window-causal-global-fullbias": Case(
        "SparseAttention", _sparse("sliding_window", "full", window=4, causal=1, num_global=2, block_size=8),
        (24, 29), 2, export_dynamic=False),
    "SparseAttention-neighborhood_2d": Case(
        "SparseAttention", _sparse("neighborhood_2d", kernel=3, num_global=1), (26, 29), 2, False),
    "SparseAttention-block_topk-keybias": Case(
        "SparseAttention", _sparse("block_topk", "key", block_size=8, topk=2), (24, 29), 2, export_dynamic=False),
    "SparseAttention-block_topk-global": Case(
        "SparseAttention", _sparse("block_topk", block_size=8, topk=2, num_global=1, keep_diagonal=0), (24, 29), 2),
    "SparseAttention-block_topk-fullbias": Case(
        "SparseAttention", _sparse("block_topk", "full", block_size=8, topk=3, keep_first=0), (24, 29), 2,
        export_dynamic=False),
    "SparseAttention-block_layout": Case(
        "SparseAttention", _sparse("block_layout", block_size=8), (24, 29), 2, False),
    "SparseAttention-block_topk-causal": Case(
        "SparseAttention", _sparse("block_topk", block_size=8, topk=2, causal=1), (24, 29), 2),
    "SparseAttention-block_topk-causal-global-nofirst": Case(
        "SparseAttention", _sparse("block_topk", block_size=8, topk=3, causal=1, num_global=2, keep_first=0),
        (24, 29), 2),
    # 24 tokens: 3 blocks; 29: 4, the last one short. The estimate reads 7 queries, i.e. rows in two blocks
    "SparseAttention-vertical_slash": Case(
        "SparseAttention", _sparse("vertical_slash", block_size=8, vertical=5, slash=2, last_q=7, num_global=2),
        (24, 29), 2),
}

# (batch, which n, dynamic dims in the model)
SHAPES = [(1, 0, False), (3, 0, True), (3, 1, False), (1, 1, True)]
DTYPES = [np.float32, F16]


def _inputs(case: Case, batch: int, which: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed + 1000 * batch + which)
    return case.make(rng, batch, case.ns[which], dtype)


def _check(case: Case, got, want, dtype) -> None:
    assert len(got) == len(want)
    for g, w, port in zip(got, want, REGISTRY[case.op].outputs):
        g = np.asarray(g)
        assert g.shape == w.shape, (port.name, g.shape, w.shape)
        if port.dtype == "int64":
            np.testing.assert_array_equal(g, w, err_msg=port.name)
        else:
            assert g.dtype == np.dtype(dtype), (port.name, g.dtype)
            tol = 2e-5 if dtype == np.float32 else case.fp16_atol
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=tol, rtol=tol,
                                       err_msg=port.name)


def _ort_model(spec, arrays, attrs, dynamic: bool, token_axis: int) -> ir.Model:
    values: list[ir.Value | None] = []
    for port, arr in zip(spec.inputs, arrays):
        if arr is None:
            values.append(None)
            continue
        shape = list(arr.shape)
        if dynamic and port.dims is not None:
            shape = [("batch" if ax == 0 else "seq" if ax == token_axis else d) for ax, d in enumerate(shape)]
        elif dynamic and arr.ndim == arrays[0].ndim:  # a bias: its batch axis and its token axes follow
            n = arrays[0].shape[token_axis]
            shape = ["batch" if ax == 0 else "seq" if d == n else d for ax, d in enumerate(shape)]
        values.append(ir.Value(name=port.name, type=ir.TensorType(_IR[arr.dtype]), shape=ir.Shape(shape)))
    inputs = [v for v in values if v is not None]
    node = spec.make_node(*values, **attrs)
    for i, out in enumerate(node.outputs):
        out.name = f"out{i}"
    model = ir.Model(ir.Graph(inputs, list(node.outputs), nodes=[node], opset_imports={"": 18}), ir_version=10)
    add_node_function(model, node)
    return model


def _run_ort(model: ir.Model, arrays) -> list[np.ndarray]:
    feeds = {v.name: a for v, a in zip(model.graph.inputs, [a for a in arrays if a is not None])}
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _torch_call(spec, tensors, attrs):
    return getattr(torch.ops.graphprune, spec.snake)(*tensors, **attrs)


def test_every_op_has_a_case():
    assert set(REGISTRY) == {c.op for c in CASES.values()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,which,dynamic", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_reference_follows_shape_function(name, batch, which, dynamic, dtype):
    case = CASES[name]
    spec = REGISTRY[case.op]
    arrays, attrs = _inputs(case, batch, which, dtype)
    outs = spec.reference(*arrays, **attrs)
    a = spec.normalize(**attrs)
    env = bind([p.dims for p in spec.inputs], [None if x is None else x.shape for x in arrays])
    assert [o.shape for o in outs] == evaluate(spec.symbolic_shapes(a), env)
    for o, port in zip(outs, spec.outputs):
        assert o.dtype == (np.int64 if port.dtype == "int64" else dtype)
        assert np.isfinite(o.astype(np.float64)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,which,dynamic", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_ort_body(name, batch, which, dynamic, dtype):
    case = CASES[name]
    spec = REGISTRY[case.op]
    arrays, attrs = _inputs(case, batch, which, dtype)
    want = spec.reference(*arrays, **attrs)
    model = _ort_model(spec, arrays, attrs, dynamic, case.token_axis)
    _check(case, _run_ort(model, arrays), want, dtype)
    if dynamic:  # the same model at another batch and (where the op allows it) another N
        other = 1 - which if case.dynamic_n else which
        arrays2, _ = _inputs(case, batch + 1, other, dtype, seed=7)
        if len(arrays) > 4 and arrays[4] is not None:
            arrays2[4] = arrays[4]  # a block layout belongs to the attribute set (topk = most ones in a row)
        if case.dynamic_n or other == which:
            _check(case, _run_ort(model, arrays2), spec.reference(*arrays2, **attrs), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,which,dynamic", SHAPES[:3])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_eager(name, batch, which, dynamic, dtype):
    case = CASES[name]
    spec = REGISTRY[case.op]
    arrays, attrs = _inputs(case, batch, which, dtype)
    got = _torch_call(spec, [None if a is None else torch.from_numpy(a) for a in arrays], attrs)
    got = got if isinstance(got, tuple) else (got,)
    _check(case, [g.numpy() for g in got], spec.reference(*arrays, **attrs), dtype)


class _Calls(torch.nn.Module):
    def __init__(self, spec, attrs, present):
        super().__init__()
        self.spec, self.attrs, self.present = spec, attrs, present

    def forward(self, t0, t1=None, t2=None, t3=None):  # explicit parameters: torch.export matches shapes to them
        it = iter(t for t in (t0, t1, t2, t3) if t is not None)
        args = [next(it) if on else None for on in self.present]
        out = _torch_call(self.spec, args, self.attrs)
        return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,which,dynamic", [(3, 1, False), (2, 0, True)])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_torch_export_ort(name, batch, which, dynamic, dtype, tmp_path):
    case = CASES[name]
    spec = REGISTRY[case.op]
    arrays, attrs = _inputs(case, batch, which, dtype)
    present = [a is not None for a in arrays] + [False] * (len(spec.inputs) - len(arrays))
    tensors = [torch.from_numpy(a) for a in arrays if a is not None]
    module = _Calls(spec, attrs, present)
    axes = {0: "batch", case.token_axis: "seq"} if dynamic and case.dynamic_n and case.export_dynamic else None
    if any(a is not None and a.ndim != arrays[0].ndim for a in arrays):
        axes = None  # inputs of different ranks (layout): static export
    path = gtorch.export(module, tuple(tensors), tmp_path / "m.onnx", dynamic_axes=axes,
                         dynamic_batch=dynamic and axes is None and not any(a.ndim != arrays[0].ndim
                                                                            for a in arrays if a is not None))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in sess.get_inputs()], [a for a in arrays if a is not None]))
    got = sess.run(None, feeds)
    _check(case, got, spec.reference(*arrays, **attrs), dtype)
    if axes is not None:  # another batch and N through the same export
        arrays2, _ = _inputs(case, batch + 1, 1 - which, dtype, seed=3)
        feeds = dict(zip([i.name for i in sess.get_inputs()], [a for a in arrays2 if a is not None]))
        _check(case, sess.run(None, feeds), spec.reference(*arrays2, **attrs), dtype)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.dynamic_n])
def test_static_body_refuses_another_length(name):
    """A body built for one N fails loudly at another N instead of attending to the wrong keys."""
    case = CASES[name]
    spec = REGISTRY[case.op]
    arrays, attrs = _inputs(case, 1, 0, np.float32)
    model = _ort_model(spec, arrays, attrs, True, case.token_axis)
    arrays2, _ = _inputs(case, 1, 1, np.float32)
    if case.op == "SparseAttention" and attrs["pattern"] == "block_layout":
        arrays2[4] = arrays[4]  # the layout is the body's: only Q/K/V change length
    with pytest.raises(Exception, match="(?i)shape|mismatch|out of|invalid|dimension"):
        _run_ort(model, arrays2)
