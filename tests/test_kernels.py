"""Triton kernels against the ops' numpy references (``OpDef.reference``), fp32 and fp16, N not a multiple of
the 16-token tile. On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py);
with ``GRAPHPRUNE_KERNELS_CUDA=1`` on a GPU machine the same tests run the compiled kernels."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from graphprune import kernels  # noqa: E402
from graphprune.ops import SparseAttention, TokenSelect  # noqa: E402

pytestmark = pytest.mark.kernels
CUDA = os.environ.get("GRAPHPRUNE_KERNELS_CUDA") == "1"
DEVICE = "cuda" if CUDA else "cpu"
TOL = {np.float32: 2e-5, np.float16: 2e-3}


def test_kernels_run_interpreted_or_on_cuda():
    assert kernels.interpreted() or (CUDA and torch.cuda.is_available())


def _t(a):
    return torch.from_numpy(a).to(DEVICE)


SPARSE = [
    dict(pattern="sliding_window", window=8, num_global=1),
    dict(pattern="sliding_window", window=6, causal=1, num_global=2),
    dict(pattern="sliding_window", window=64),  # window >= N: dense
    dict(pattern="block_topk", block_size=8, topk=2, num_global=1),
    dict(pattern="block_topk", block_size=5, topk=2, keep_first=0),  # routing block not a tile multiple
    dict(pattern="neighborhood_2d", grid=None, kernel=3, num_global=1),
    dict(pattern="neighborhood_2d", grid=None, kernel=3, dilation=2, num_global=1),
    dict(pattern="block_layout", block_size=8, num_global=1),
]


def _grid(n, g):  # a grid for n - g tokens
    m = n - g
    return [4, m // 4] if m % 4 == 0 else [1, m]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [24, 29])
@pytest.mark.parametrize("attrs", SPARSE, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items() if k != "grid"))
@pytest.mark.parametrize("bias", ["none", "key"])
def test_sparse_attention(attrs, n, dtype, bias):
    from graphprune.kernels.sparse_attention import sparse_attention

    rng = np.random.default_rng(n)
    attrs = dict(attrs)
    if attrs["pattern"] == "neighborhood_2d":
        attrs["grid"] = _grid(n, attrs["num_global"])
    q, k, v = (rng.standard_normal((2, 2, n, 16)).astype(dtype) for _ in range(3))
    layout = None
    if attrs["pattern"] == "block_layout":
        nb = -(-n // attrs["block_size"])
        layout = (rng.random((2, nb, nb)) < 0.5).astype(np.int64)
        layout[:, np.arange(nb), np.arange(nb)] = 1
        attrs["topk"] = int(layout.sum(-1).max())
    b = None
    if bias == "key":
        b = np.zeros((2, 1, 1, n), dtype=dtype)
        b[1, ..., n - 5:] = -np.inf  # padding of the second sequence
    ref = SparseAttention.reference(q, k, v, b, layout, **attrs)[0]
    got = sparse_attention(_t(q), _t(k), _t(v), None if b is None else _t(b),
                           None if layout is None else _t(layout), **attrs).cpu().numpy()
    assert got.dtype == dtype and not np.isnan(got).any()
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=TOL[dtype] * 4, rtol=TOL[dtype])


def test_sparse_attention_full_bias():
    from graphprune.kernels.sparse_attention import sparse_attention

    rng = np.random.default_rng(1)
    n = 29
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for _ in range(3))
    b = rng.standard_normal((1, 2, n, n)).astype(np.float32)
    for attrs in (dict(pattern="sliding_window", window=8, num_global=1),
                  dict(pattern="block_topk", block_size=8, topk=2)):
        ref = SparseAttention.reference(q, k, v, b, bias="full", **attrs)[0]
        got = sparse_attention(_t(q), _t(k), _t(v), _t(b), bias="full", **attrs).cpu().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_sparse_attention_reads_only_the_pattern():
    from graphprune.kernels.sparse_attention import visited_fraction

    assert visited_fraction(dict(pattern="sliding_window", window=16), 1024) < 0.05
    assert visited_fraction(dict(pattern="sliding_window", window=4096), 1024) == 1.0


SELECT = [dict(keep_ratio=0.5, protect=1), dict(k=5, keep_order=0), dict(keep_ratio=0.3, protect=2, fuse_rest=1),
          dict(k=7, protect=1, keep_order=0, fuse_rest=1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [24, 29])
@pytest.mark.parametrize("attrs", SELECT, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_token_select(attrs, n, dtype):
    from graphprune.kernels.token_select import token_select

    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n, 40)).astype(dtype)
    s = rng.random((2, n)).astype(dtype)  # attention scores: positive
    s[0, 3] = s[0, 4]  # a tie: the lower index wins
    ry, ri = TokenSelect.reference(x, s, **attrs)
    y, i = token_select(_t(x), _t(s), **attrs)
    np.testing.assert_array_equal(i.cpu().numpy(), ri)
    np.testing.assert_allclose(y.cpu().numpy().astype(np.float64), ry.astype(np.float64), atol=TOL[dtype] * 4,
                               rtol=TOL[dtype])
