"""TokenSelect / TokenMerge: the ORT-run function body equals the numpy reference (several shapes, batch 1 and 4,
protected prefix 0, 1, 2), and the reference itself behaves as documented."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.ops import REGISTRY, diversity_select, token_merge, token_select
from tests._token_util import run_single

SHAPES = [(1, 17, 8), (4, 17, 8), (4, 65, 16), (1, 197, 32)]


def _select_cases():
    for shape in SHAPES:
        for protect in (0, 1, 2):
            for kw in ({"k": 5}, {"keep_ratio": 0.7}, {"k": 6, "keep_order": False},
                       {"keep_ratio": 0.5, "fuse_rest": True}, {"keep_ratio": 1.0}):
                yield shape, protect, kw


@pytest.mark.parametrize("shape,protect,kw", list(_select_cases()))
def test_token_select_matches_reference(shape, protect, kw):
    rng = np.random.default_rng(hash((shape, protect, tuple(kw.items()))) % 2**32)
    x = rng.standard_normal(shape).astype(np.float32)
    s = rng.random(shape[:2]).astype(np.float32)
    kw = dict(kw, protect=protect)
    y, idx = run_single(lambda a, b: token_select.make_node(a, b, **kw),
                        {"x": x, "scores": s}, 2)
    ry, ridx = token_select.reference(x, s, **kw)
    assert y.shape == ry.shape
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_allclose(y, ry, atol=1e-5, rtol=1e-5)


def test_token_select_reference_semantics():
    x = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    s = np.array([[9, 1, 4, 3, 5, 0], [9, 8, 1, 2, 7, 0]], dtype=np.float32)
    y, idx = token_select.reference(x, s, k=2, protect=1, keep_order=True)
    np.testing.assert_array_equal(idx, [[0, 2, 4], [0, 1, 4]])  # CLS first, then the top-2 in original order
    np.testing.assert_array_equal(y[:, :, 0], [[0, 2, 4], [6, 7, 10]])
    _, idx = token_select.reference(x, s, k=2, protect=1, keep_order=False)
    np.testing.assert_array_equal(idx, [[0, 4, 2], [0, 1, 4]])  # descending score
    y, _ = token_select.reference(x[:1], s[:1], k=2, protect=1, fuse_rest=True)
    expect = (1 * 1 + 3 * 3 + 0 * 5) / 4  # dropped tokens 1, 3, 5 with scores 1, 3, 0
    assert y.shape == (1, 4, 1) and np.isclose(y[0, -1, 0], expect)
    assert token_select.kept_count(197, 1, keep_ratio=0.7) == 138


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("protect", [0, 1, 2])
@pytest.mark.parametrize("r", [0, 3, 8, 1000])
@pytest.mark.parametrize("has_size", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_token_merge_matches_reference(shape, protect, r, has_size, static):
    rng = np.random.default_rng(hash((shape, protect, r, has_size)) % 2**32)
    b, n, _ = shape
    x = rng.standard_normal(shape).astype(np.float32)
    metric = rng.standard_normal((b, n, 6)).astype(np.float32)
    feeds = {"x": x, "metric": metric}
    size = rng.integers(1, 4, (b, n, 1)).astype(np.float32) if has_size else None
    if has_size:
        feeds["size"] = size
    y, s, idx = run_single(lambda *a: token_merge.make_node(*a, r=r, protect=protect), feeds, 3, static=static)
    ry, rs, ridx = token_merge.reference(x, metric, size, r=r, protect=protect)
    assert y.shape == (b, n - token_merge.merged_count(n, protect, r), shape[2])
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_allclose(s, rs, atol=1e-6)
    np.testing.assert_allclose(y, ry, atol=1e-5, rtol=1e-5)


def test_token_merge_reference_semantics():
    # tokens: CLS, then a0 b0 a1 b1; a0 ≈ b1 and a1 ≈ b0 in the metric; r=1 merges the closer pair
    x = np.array([[[10.0], [1.0], [2.0], [3.0], [4.0]]], dtype=np.float32)
    m = np.array([[[0, 0, 1], [1, 0, 0], [0, 1, 0], [0.1, 1, 0], [1, 0.01, 0]]], dtype=np.float32)
    y, s, idx = token_merge.reference(x, m, r=1, protect=1)
    # a0 (x=1) matches b1 (x=4) with cos≈1.0; a1 (x=3) matches b0 (x=2) with cos≈0.995 → a0 merges into b1
    np.testing.assert_array_equal(idx, [[0, 2, 3, 4]])
    np.testing.assert_allclose(y[0, :, 0], [10.0, 2.0, 3.0, 2.5])
    np.testing.assert_allclose(s[0, :, 0], [1, 1, 1, 2])
    y0, s0, _ = token_merge.reference(x, m, r=0, protect=1)
    np.testing.assert_array_equal(y0, x)  # r = 0 is the identity, order included


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("protect", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5, -1])
@pytest.mark.parametrize("keep_order", [True, False])
def test_diversity_select_matches_reference(shape, protect, k, keep_order):
    rng = np.random.default_rng(hash((shape, protect, k, keep_order)) % 2**32)
    x = rng.standard_normal(shape).astype(np.float32)
    k = shape[1] - protect if k == -1 else k
    y, idx = run_single(lambda a: diversity_select.make_node(a, k=k, protect=protect, keep_order=keep_order),
                        {"x": x}, 2)
    ry, ridx = diversity_select.reference(x, k=k, protect=protect, keep_order=keep_order)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_allclose(y, ry, atol=1e-6)


def test_diversity_select_reference_semantics():
    # two tight clusters and an outlier: 3 picks take one token from each
    x = np.array([[[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1]]], dtype=np.float32)
    _, idx = diversity_select.reference(x, k=3, protect=0)
    assert idx[0, -1] == 4 and len({int(i) // 2 for i in idx[0, :2]}) == 2


def test_flops_rules_registered():
    assert {"TokenSelect", "TokenMerge", "DiversitySelect", "SparseAttention"} <= set(REGISTRY)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n,protect", [(1, 0), (2, 1), (4, 4), (5, 4), (3, 1), (9, 1)])
def test_token_merge_short_sequences_match_the_reference(n, protect, static):
    """Fewer than two tokens after the prefix (a short runtime sequence after earlier merges): the op passes the
    tokens through (r clamps to 0) in the body as in the definition, static or dynamic N."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n, 4)).astype(np.float32)
    m = rng.standard_normal((2, n, 3)).astype(np.float32)
    got = run_single(lambda a, b: token_merge.make_node(a, b, r=3, protect=protect), {"x": x, "metric": m}, 3,
                     static=static)
    want = token_merge.reference(x, m, r=3, protect=protect)
    assert got[0].shape == (2, n - token_merge.merged_count(n, protect, 3), 4)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    if n - protect < 2:
        np.testing.assert_array_equal(got[0], x)
