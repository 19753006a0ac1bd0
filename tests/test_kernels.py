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
from graphprune.ops import DiversitySelect, SparseAttention, TokenMerge, TokenSelect  # noqa: E402

pytestmark = pytest.mark.kernels
CUDA = os.environ.get("GRAPHPRUNE_KERNELS_CUDA") == "1"
DEVICE = "cuda" if CUDA else "cpu"
TOL = {np.float32: 2e-5, np.float16: 2e-3}
#: fp16 runs each kernel case again in the interpreter; the contributor loop (``-m "not slow"``) keeps fp32 only
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.float16, id="fp16", marks=pytest.mark.slow)]


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
    dict(pattern="block_topk", block_size=8, topk=2, causal=1, num_global=1),
    dict(pattern="neighborhood_2d", grid=None, kernel=3, num_global=1),
    dict(pattern="neighborhood_2d", grid=None, kernel=3, dilation=2, num_global=1),
    dict(pattern="block_layout", block_size=8, num_global=1),
]


def _grid(n, g):  # a grid for n - g tokens
    m = n - g
    return [4, m // 4] if m % 4 == 0 else [1, m]


@pytest.mark.parametrize("dtype", DTYPES)
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


@pytest.mark.parametrize("dtype,bias", [(np.float32, "none"), (np.float32, "full"), (np.float16, "key")],
                         ids=["fp32-none", "fp32-full", "fp16-key"])
@pytest.mark.parametrize("n", [24, 29])
@pytest.mark.parametrize("attrs", [a for a in SPARSE if a["pattern"] in ("sliding_window", "neighborhood_2d")],
                         ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items() if k != "grid"))
def test_sparse_attention_table_free(attrs, n, dtype, bias):
    """The static patterns without a host table (each query tile's KV span computed in the kernel: the AOT path)."""
    from graphprune.kernels.sparse_attention import sparse_attention_table_free

    rng = np.random.default_rng(n + 1)
    attrs = dict(attrs)
    if attrs["pattern"] == "neighborhood_2d":
        attrs["grid"] = _grid(n, attrs["num_global"])
    q, k, v = (rng.standard_normal((2, 2, n, 16)).astype(dtype) for _ in range(3))
    b = None
    if bias == "key":
        b = np.zeros((2, 1, 1, n), dtype=dtype)
        b[1, ..., n - 5:] = -np.inf
    elif bias == "full":
        b = rng.standard_normal((1, 2, n, n)).astype(dtype)
    if b is not None:
        attrs["bias"] = bias
    ref = SparseAttention.reference(q, k, v, b, **attrs)[0]
    got = sparse_attention_table_free(_t(q), _t(k), _t(v), None if b is None else _t(b), **attrs).cpu().numpy()
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


@pytest.mark.parametrize("dtype", DTYPES)
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


MERGE = [dict(r=5), dict(r=8, protect=1), dict(r=40, protect=2), dict(r=0, protect=1), dict(r=3, protect=3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [24, 37])
@pytest.mark.parametrize("sized", [False, True], ids=["nosize", "size"])
@pytest.mark.parametrize("attrs", MERGE, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_token_merge(attrs, n, sized, dtype):
    """Indices exactly, values and sizes to a tolerance, against the reference run on the same (upcast) inputs.
    N = 37 with protect 2 gives an odd candidate count (|A| = |B| + 1); r = 40 is clamped to |A|."""
    from graphprune.kernels.token_merge import token_merge

    rng = np.random.default_rng(n + 7 * attrs["r"])
    x = rng.standard_normal((2, n, 40)).astype(dtype)
    metric = rng.standard_normal((2, n, 24)).astype(dtype)
    metric[1, 6] = metric[1, 4]  # a B token equal to an A token: cosine 1, the highest, merges first
    size = (rng.integers(1, 5, (2, n, 1))).astype(dtype) if sized else None
    ry, rs, ri = TokenMerge.reference(x, metric, size, **attrs)
    y, s, i = token_merge(_t(x), _t(metric), None if size is None else _t(size), **attrs)
    assert y.dtype == s.dtype == _t(x).dtype and i.dtype == torch.int64
    np.testing.assert_array_equal(i.cpu().numpy(), ri)
    np.testing.assert_allclose(y.cpu().numpy().astype(np.float64), ry.astype(np.float64), atol=TOL[dtype] * 4,
                               rtol=TOL[dtype])
    np.testing.assert_allclose(s.cpu().numpy().astype(np.float64), rs.astype(np.float64), rtol=TOL[dtype])
    if attrs["r"]:
        assert not np.array_equal(ri[0], np.arange(n)[: ri.shape[1]])  # tokens really merged


def test_token_merge_ties_go_to_the_first():
    """Two A tokens with the same best similarity (to the same B token): the lower index merges when r = 1;
    an A token equally similar to two B tokens merges into the first."""
    from graphprune.kernels.token_merge import token_merge

    rng = np.random.default_rng(3)
    n = 12
    x = rng.standard_normal((1, n, 16)).astype(np.float32)
    metric = rng.standard_normal((1, n, 16)).astype(np.float32)
    metric[0, 2] = metric[0, 6] = metric[0, 5]  # A 1 and A 3 both match B 2 with cosine 1
    metric[0, 9] = metric[0, 5]  # and B 4 is equal too: the first B (2) wins
    for r in (1, 2):
        ry, rs, ri = TokenMerge.reference(x, metric, r=r)
        y, s, i = token_merge(_t(x), _t(metric), r=r)
        np.testing.assert_array_equal(i.cpu().numpy(), ri)
        np.testing.assert_allclose(y.cpu().numpy(), ry, atol=1e-6)
        np.testing.assert_allclose(s.cpu().numpy(), rs, atol=0)
    assert 2 not in ri[0] or 6 not in ri[0]  # r = 2: both tied A tokens merged


DIVERSE = [dict(k=5), dict(k=8, protect=1, keep_order=0), dict(k=12, protect=2), dict(k=1, protect=1),
           dict(k=20, keep_order=0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [24, 45])
@pytest.mark.parametrize("attrs", DIVERSE, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_diversity_select(attrs, n, dtype):
    """N = 45 gives two 32-token tiles for the first pick's tiled max-min; indices exactly, rows exactly (copies)."""
    from graphprune.kernels.diversity_select import diversity_select

    rng = np.random.default_rng(n + attrs["k"])
    x = rng.standard_normal((2, n, 40)).astype(dtype)
    ry, ri = DiversitySelect.reference(x, **attrs)
    y, i = diversity_select(_t(x), **attrs)
    np.testing.assert_array_equal(i.cpu().numpy(), ri)
    np.testing.assert_array_equal(y.cpu().numpy(), ry)


def test_diversity_select_ties_go_to_the_lower_index():
    """Scaled one-hot rows have exact cosines (0 or 1) in any precision, so the max-min distances tie exactly:
    duplicates are at distance 0, the rest at 1; the first pick and every greedy pick take the lower index."""
    from graphprune.kernels.diversity_select import diversity_select

    axes = [i // 2 for i in range(32)] + list(range(40, 48))  # pairs of duplicates, then 8 unique rows (tile 2)
    axes[5] = 60  # rows 4 and 5 unique too: the tie for the first pick spans both 32-row tiles
    x = np.zeros((1, len(axes), 64), np.float32)
    x[0, np.arange(len(axes)), axes] = 2.0
    for k in (1, 4, 12):
        ry, ri = DiversitySelect.reference(x, k=k, keep_order=0)
        y, i = diversity_select(_t(x), k=k, keep_order=0)
        np.testing.assert_array_equal(i.cpu().numpy(), ri)
        np.testing.assert_array_equal(y.cpu().numpy(), ry)
    assert ri[0, :3].tolist() == [4, 0, 2]  # first: the lowest row without a duplicate; then the lowest rows


def test_merge_and_diversity_limits_are_refused():
    from graphprune.kernels.diversity_select import MAX_M, diversity_select
    from graphprune.kernels.token_merge import MAX_SIDE, supported

    assert supported(2 * MAX_SIDE, dict(r=4)) and not supported(2 * MAX_SIDE + 1, dict(r=4))
    with pytest.raises(ValueError, match="k <= N - protect"):
        diversity_select(torch.zeros((1, MAX_M + 2, 4), device=DEVICE), k=2, protect=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attrs", [dict(k=9, protect=1), dict(k=9, keep_order=0, fuse_rest=1),
                                   dict(keep_ratio=0.6, protect=2, fuse_rest=1), dict(k=70)],
                         ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_token_select_threshold_ties_signs_and_zeros(attrs, dtype):
    """The radix-select threshold: negative scores, +0 and -0 (equal), many ties exactly at the threshold (the
    lower indices are kept), a huge and a tiny magnitude, N = 70 (five 16-token tiles); k = 70 keeps everything."""
    from graphprune.kernels.token_select import token_select

    rng = np.random.default_rng(11)
    n = 70
    x = rng.standard_normal((2, n, 24)).astype(dtype)
    s = rng.choice(np.array([-3.0, -0.5, 0.0, 0.25, 1.5], dtype), size=(2, n))  # few distinct values: ties
    s[0, 10:14] = -0.0
    s[1, :5] = rng.standard_normal(5).astype(dtype) * 1000
    s[1, 5] = np.finfo(dtype).tiny
    if attrs.get("fuse_rest"):  # the fused token is a weighted mean: signed weights summing near 0 blow it up
        s = np.abs(s)
        s[0, 10:14] = -0.0
    ry, ri = TokenSelect.reference(x, s, **attrs)
    assert np.isfinite(ry).all()
    y, i = token_select(_t(x), _t(s), **attrs)
    np.testing.assert_array_equal(i.cpu().numpy(), ri)
    np.testing.assert_allclose(y.cpu().numpy().astype(np.float64), ry.astype(np.float64), atol=TOL[dtype] * 4,
                               rtol=TOL[dtype])


ROUTED = [
    dict(pattern="block_topk", block_size=8, topk=2, num_global=1),
    dict(pattern="block_topk", block_size=5, topk=3, keep_first=0),  # block not a power of two; diagonal kept
    dict(pattern="block_topk", block_size=8, topk=2, keep_first=0, keep_diagonal=0, num_global=10),  # 2 global blocks
    dict(pattern="block_topk", block_size=8, topk=2, causal=1, num_global=1),  # causal: no N x N mask read
    dict(pattern="block_layout", block_size=8, num_global=1),  # one layout per head
    dict(pattern="block_layout", block_size=6, layout_heads=1),  # one layout for every head
]


def _layout(rng, n, attrs):
    """A random 0/1 layout [H|1, nb, nb] (diagonal on, one empty-but-diagonal row pattern) and the op's topk."""
    attrs = dict(attrs)
    heads = attrs.pop("layout_heads", 2)
    nb = -(-n // attrs["block_size"])
    layout = (rng.random((heads, nb, nb)) < 0.4).astype(np.int64)
    layout[:, np.arange(nb), np.arange(nb)] = 1
    layout[0, 1] = 0
    layout[0, 1, nb - 1] = 3  # > 0 counts as on, like the op
    attrs["topk"] = int(layout.sum(-1).max())
    return layout, attrs


@pytest.mark.parametrize("dtype,bias", [(np.float32, "none"), (np.float32, "full"), (np.float16, "key"),
                                        (np.float16, "full")], ids=["fp32-none", "fp32-full", "fp16-key", "fp16-full"])
@pytest.mark.parametrize("n", [24, 29])
@pytest.mark.parametrize("attrs", ROUTED, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
@pytest.mark.slow
def test_sparse_attention_routed_table_free(attrs, n, dtype, bias):
    """The routed patterns without host routing or a table (block_topk routes itself in the kernel, block_layout
    reads its layout row: the AOT path), batch 2, against the op's reference."""
    from graphprune.kernels.sparse_attention import sparse_attention_table_free

    rng = np.random.default_rng(n + 3)
    layout = None
    if attrs["pattern"] == "block_layout":
        layout, attrs = _layout(rng, n, attrs)
    q, k, v = (rng.standard_normal((2, 2, n, 16)).astype(dtype) for _ in range(3))
    b = None
    if bias == "key":
        b = np.zeros((2, 1, 1, n), dtype=dtype)
        b[1, ..., n - 9:] = -np.inf  # padding: the last key block(s) of the second sequence fully masked
    elif bias == "full":
        b = rng.standard_normal((1, 2, n, n)).astype(dtype) * 2
    attrs = dict(attrs, bias=bias)
    ref = SparseAttention.reference(q, k, v, b, layout, **attrs)[0]
    got = sparse_attention_table_free(_t(q), _t(k), _t(v), None if b is None else _t(b),
                                      None if layout is None else _t(layout), **attrs).cpu().numpy()
    assert got.dtype == dtype and not np.isnan(got).any()
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=TOL[dtype] * 4, rtol=TOL[dtype])


def _tied_keys(dtype, n=32, b=8):
    """K blocks 1 and 3 identical and far ahead of the others along axis 0 (Q's means point there too): their
    routing scores tie exactly; V differs everywhere, so picking block 3 instead of 1 changes the output."""
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((2, 2, n, 16)) * 0.1).astype(dtype)
    q[..., 0] += 1.0
    k = (rng.standard_normal((2, 2, n, 16)) * 0.1).astype(dtype)
    k[:, :, 3 * b:4 * b] = k[:, :, b:2 * b]
    k[:, :, b:2 * b, 0] += 3.0
    k[:, :, 3 * b:4 * b, 0] += 3.0
    v = rng.standard_normal((2, 2, n, 16)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attrs,picked", [
    (dict(topk=1, keep_first=0, keep_diagonal=0), [{1}] * 4),  # the tie: block 1, not 3
    (dict(topk=2, keep_first=0, keep_diagonal=1), [{0, 1}, {1, 3}, {1, 2}, {1, 3}]),  # the diagonal counts towards k
    (dict(topk=2, keep_first=1, keep_diagonal=0, num_global=3), [{0, 1}] * 4),
], ids=["tie", "diagonal-then-tie", "first-then-tie-globals"])
@pytest.mark.slow
def test_sparse_attention_routed_exact_ties(attrs, picked, dtype):
    """Exact routing ties go to the lower block in the kernel's own routing, as in the op (stable order)."""
    from array_api_compat import numpy as npx

    from graphprune.kernels.sparse_attention_routed import sparse_attention_routed_table_free
    from graphprune.ops.sparse_attention import at_length, routed_blocks

    q, k, v = _tied_keys(dtype)
    attrs = dict(pattern="block_topk", block_size=8, **attrs)
    chosen, _ = routed_blocks(npx, at_length(SparseAttention.normalize(**attrs), 32, 16), q, k, None, None)
    for per_head in chosen.reshape(-1, 4, 4):  # the tie was there, and the op broke it towards the lower block
        assert [set(np.flatnonzero(row).tolist()) for row in per_head] == picked
    ref = SparseAttention.reference(q, k, v, **attrs)[0]
    for dynamic in (False, True):
        got = sparse_attention_routed_table_free(_t(q), _t(k), _t(v), dynamic=dynamic, **attrs).cpu().numpy()
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=TOL[dtype] * 4,
                                   rtol=TOL[dtype])


def test_sparse_attention_routed_fully_masked_blocks_tie_last():
    """A sequence whose keys are all masked: every block scores the bias floor, so all tie and the lowest k blocks
    are read; each row then averages V over them (no NaN). The other sequence masks blocks 0 and 2 only: they rank
    after every unmasked block."""
    from graphprune.kernels.sparse_attention_routed import sparse_attention_routed_table_free

    rng = np.random.default_rng(8)
    n = 40
    q, k, v = (rng.standard_normal((2, 1, n, 16)).astype(np.float32) for _ in range(3))
    b = np.zeros((2, 1, 1, n), np.float32)
    b[0, ..., :8] = b[0, ..., 16:24] = -np.inf
    b[1] = -np.inf
    attrs = dict(pattern="block_topk", block_size=8, topk=3, keep_first=0, keep_diagonal=0, bias="key")
    ref = SparseAttention.reference(q, k, v, b, **attrs)[0]
    got = sparse_attention_routed_table_free(_t(q), _t(k), _t(v), _t(b), **attrs).cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got[1, 0], np.broadcast_to(v[1, 0, :24].mean(0), (n, 16)), atol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [20, 45])
def test_sparse_attention_routed_dynamic_block(n):
    """Compiled for a dynamic N (block_size 32 as the constant): the kernel takes min(block_size, N) at run time,
    N = 20 is one block shorter than block_size, N = 45 leaves a 13-token last block."""
    from graphprune.kernels.sparse_attention_routed import sparse_attention_routed_table_free

    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for _ in range(3))
    attrs = dict(pattern="block_topk", block_size=32, topk=1, keep_first=0, keep_diagonal=0)
    ref = SparseAttention.reference(q, k, v, **attrs)[0]
    got = sparse_attention_routed_table_free(_t(q), _t(k), _t(v), dynamic=True, **attrs).cpu().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [70, 100])
def test_sparse_attention_vertical_slash(n, dtype):
    """The vertical_slash kernel (selection on the device, one launch) against the op definition; a planted column
    far outside the kept diagonals is read, and the output is not the causal dense one."""
    from graphprune.kernels.sparse_attention import sparse_attention

    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((2, 2, n, 16)).astype(dtype) for _ in range(3))
    q += dtype(0.5)
    k[:, :, 5] = 2.5  # every query attends to key 5
    attrs = dict(pattern="vertical_slash", block_size=16, vertical=6, slash=2, last_q=16, num_global=1)
    ref = SparseAttention.reference(q, k, v, **attrs)[0]
    got = sparse_attention(_t(q), _t(k), _t(v), **attrs).cpu().numpy()
    assert got.dtype == dtype and not np.isnan(got).any()
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    causal = SparseAttention.reference(q, k, v, pattern="vertical_slash", block_size=16, slash=8, vertical=1)[0]
    assert np.abs(ref.astype(np.float64) - causal).max() > 1e-2
