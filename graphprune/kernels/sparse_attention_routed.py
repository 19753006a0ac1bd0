"""Table-free Triton kernel for ``SparseAttention``'s routed patterns (``block_topk``, ``block_layout``) in
TensorRT's AOT argument order: ``Q, K, V, Bias, Layout`` (the plugin's inputs), the int32 dims ``H, N, D, DV``,
then ``Out``; contiguous tensors, a bias ``[B|1, H|1, 1|N, N]``, a layout ``[H|1, nb, nb]`` (int64).

One program per (routing query block, batch·head): the query tile is the whole routing block (``BS`` tokens, the
tile ``BLOCK`` = the next power of two >= 16, masked). Nothing is built on the host and there is one launch:

  * ``block_topk``: the program routes itself, **in the kernel** (no pooling kernel, no workspace). It takes the
    mean of its own query block, then walks every key block once, taking each block's mean and its score
    ``scale · mean(Q block) · mean(K block)`` + the largest floored bias of the (query block, key block) tile,
    all in float64 as the op definition does (``routed_blocks``); the first / diagonal block scores +inf when
    ``keep_first`` / ``keep_diagonal``. The top ``k = min(topk, nb)`` blocks are kept in ``KK`` register slots
    with no sort: a new block (always the highest index so far) replaces the worst slot (lowest score, on equal
    scores the highest index) only when its score is strictly greater, which is exactly the op's order (score
    descending, ties to the lower block). Cost: every program reads all of K once for the routing
    (O(N·D), as a dense pass over K without the V reads, the exponentials or the matrix products; with a full
    bias also its block's bias rows), then only its ``k`` key blocks for the attention: the routing reads
    N / (2·topk·block) times what the attention reads;
  * ``block_layout``: the program reads its row ``layout[h|0, q block, :]`` and attends to the key blocks > 0.

Then the flash-style online softmax (running max, sum, fp32 accumulator) over only those key blocks; a query block
holding global rows (``< num_global``) walks every key block, and its global rows see every key. The bias is added
floored at -1e30 (masked rows average V over their allowed keys). A causal ``block_topk`` (``CAUSAL``) routes over
the key blocks up to its own only and masks the keys after each query: a decoder's prefill without reading an
N × N mask. The routing block size is ``min(block_size, N)`` at run time, so a dynamic N
works (``BS`` is ``block_size``, or the resolved block at a static N). Semantics: :meth:`SparseAttention.compute`;
tests compare against ``SparseAttention.reference``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from graphprune.kernels import pow2
from graphprune.ops import SparseAttention
from graphprune.ops.sparse_attention import DYNAMIC_PATTERNS, at_length

#: Patterns of this kernel.
ROUTED_PATTERNS = ("block_topk", "block_layout")
#: Largest routing block the kernel takes (the whole block is one tile).
MAX_BLOCK = 128


@triton.jit
def _block_mean(base, lo, cnt, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CH: tl.constexpr):
    """float64 [BLOCK_D]: the mean of rows ``lo .. lo + cnt`` of a contiguous [.., D] matrix at ``base``."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float64)
    for c in tl.static_range(0, BLOCK, CH):
        r = c + tl.arange(0, CH)
        x = tl.load(base + (lo + r)[:, None] * D + offs_d[None, :], mask=(r < cnt)[:, None] & (offs_d < D)[None, :],
                    other=0.0)
        acc += tl.sum(x.to(tl.float64), 0)
    return acc / cnt.to(tl.float64)


def _sparse_attention_routed(Q, K, V, Bias, Layout, H, N, D, DV, Out,
                             SCALE: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr, G: tl.constexpr,
                             ROUTE: tl.constexpr, KEEP_FIRST: tl.constexpr, KEEP_DIAG: tl.constexpr,
                             CAUSAL: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BIAS_B: tl.constexpr, BIAS_H: tl.constexpr,
                             BIAS_FULL: tl.constexpr, LAYOUT_H: tl.constexpr, KK: tl.constexpr,
                             BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bs = tl.minimum(N, BS)  # the routing block at this N (the op's min(block_size, N))
    nb = tl.cdiv(N, bs)
    qk_base = bh.to(tl.int64) * N * D
    qp = Q + qk_base
    kp = K + qk_base
    vp = V + bh.to(tl.int64) * N * DV
    op = Out + bh.to(tl.int64) * N * DV
    sbq = N if BIAS_FULL else 0
    per_head = N * N if BIAS_FULL else N
    bp = Bias + (b.to(tl.int64) * (H * per_head if BIAS_H else per_head) if BIAS_B else 0) + \
        (h.to(tl.int64) * per_head if BIAS_H else 0)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_lo = qb * bs
    rows = q_lo + offs
    row_ok = (offs < bs) & (rows < N)
    q = tl.load(qp + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    slot = tl.arange(0, KK)
    kk = tl.minimum(N * 0 + TOPK, nb)
    enabled = slot < kk
    idxs = -(slot + 1)  # empty slots: distinct negative indices, score -inf
    if ROUTE == 0:  # block_topk: this query block's own routing
        mq = _block_mean(qp, q_lo, tl.minimum(bs, N - q_lo), D, BLOCK, BLOCK_D, 16)  # 16-row float64 chunks
        vals = tl.full([KK], float("-inf"), tl.float64)
        for r in range(0, nb):
            k_lo = r * bs
            mk = _block_mean(kp, k_lo, tl.minimum(bs, N - k_lo), D, BLOCK, BLOCK_D, 16)
            score = tl.sum(mq * mk, 0) * SCALE
            if HAS_BIAS:  # the tile's largest bias (floored below: max and floor commute)
                cols = k_lo + offs
                col_ok = (offs < bs) & (cols < N)
                if BIAS_FULL:
                    t = tl.load(bp + rows[:, None] * sbq + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                                other=float("-inf"))
                    tmax = tl.max(tl.max(t.to(tl.float32), 1), 0)
                else:
                    t = tl.load(bp + cols, mask=col_ok, other=float("-inf"))
                    tmax = tl.max(t.to(tl.float32), 0)
                score = score + tl.maximum(tmax.to(tl.float64), tl.full([], -1e30, tl.float64))  # exact in fp64
            if CAUSAL:  # a key block after the query block never enters a slot (-inf is not > any slot's score)
                score = tl.where(r > qb, float("-inf"), score)
            if KEEP_FIRST:
                score = tl.where(r == 0, float("inf"), score)
            if KEEP_DIAG:
                score = tl.where(r == qb, float("inf"), score)
            worst = tl.min(tl.where(enabled, vals, float("inf")), 0)
            wi = tl.max(tl.where(enabled & (vals == worst), idxs, -KK - 1), 0)
            hit = tl.where(score > worst, enabled & (vals == worst) & (idxs == wi), False)
            vals = tl.where(hit, score, vals)
            idxs = tl.where(hit, r, idxs)
    has_global = q_lo < G
    if ROUTE == 0:
        n_iter = tl.where(has_global, nb, kk)
    else:
        n_iter = nb
    lay_row = Layout + ((h * nb) if LAYOUT_H else 0) * nb + qb * nb
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    glob_rows = (rows < G)[:, None]
    for t in range(0, n_iter):
        if ROUTE == 0:
            kb = tl.where(has_global, t, tl.sum(tl.where(slot == t, idxs, 0), 0))
            chosen = tl.sum(tl.where(enabled & (idxs == kb), 1, 0), 0) > 0
        else:
            kb = t
            chosen = tl.load(lay_row + kb) > 0
        if chosen | has_global:
            cols = kb * bs + offs
            col_ok = (offs < bs) & (cols < N)
            k = tl.load(kp + cols[None, :] * D + offs_d[:, None], mask=col_ok[None, :] & (offs_d < D)[:, None],
                        other=0.0)
            s = tl.dot(q, k, input_precision="ieee") * SCALE
            if HAS_BIAS:
                bias = tl.load(bp + rows[:, None] * sbq + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                               other=0.0)
                s = s + tl.maximum(bias.to(tl.float32), -1e30)
            allowed = (glob_rows | chosen) & col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= rows[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(vp + cols[:, None] * DV + offs_dv[None, :], mask=col_ok[:, None] & (offs_dv < DV)[None, :],
                        other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(op + rows[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < DV)[None, :])


sparse_attention_routed = triton.jit(_sparse_attention_routed)
#: The plain functions, for ahead-of-time compilation (``graphprune.kernels.aot``).
SOURCES = {"sparse_attention_routed": _sparse_attention_routed}


def routed_constexprs(attrs: dict, n: int | None, d: int, dv: int, bias_shape: tuple | None,
                      layout_heads: int = 1) -> dict:
    """Compile-time constants of :data:`sparse_attention_routed` for one attribute set, head sizes, bias shape
    (``None``: no bias) and layout head count (``block_layout``: 1 = one layout for every head); ``n`` is a static
    N (``None``: dynamic, ``block_topk`` only). Raises ``ValueError`` for what the kernel does not take."""
    a = SparseAttention.normalize(**attrs)
    if a["pattern"] not in ROUTED_PATTERNS:
        raise ValueError(f"the routed SparseAttention kernel takes {' and '.join(ROUTED_PATTERNS)}, "
                         f"not {a['pattern']}")
    if n is not None:
        a = at_length(a, n, d)
        bs = max(1, min(a["block_size"] or 64, n))
    elif a["pattern"] not in DYNAMIC_PATTERNS:
        raise ValueError(f"SparseAttention {a['pattern']} needs a static sequence length")
    else:
        bs = a["block_size"] or 64
    if bs > MAX_BLOCK:
        raise ValueError(f"SparseAttention {a['pattern']}: block_size {bs} > {MAX_BLOCK} (the table-free kernel "
                         f"holds a whole routing block in one tile)")
    topk = a["topk"] if a["pattern"] == "block_topk" else 1
    return dict(SCALE=float(a["scale"] or 1.0 / math.sqrt(d)), BS=bs, TOPK=topk, G=a["num_global"] or 0,
                ROUTE=ROUTED_PATTERNS.index(a["pattern"]), KEEP_FIRST=bool(a.get("keep_first")),
                KEEP_DIAG=bool(a.get("keep_diagonal")), CAUSAL=bool(a.get("causal")), HAS_BIAS=bias_shape is not None,
                BIAS_B=bias_shape is not None and bias_shape[0] != 1,
                BIAS_H=bias_shape is not None and bias_shape[1] != 1,
                BIAS_FULL=bias_shape is not None and bias_shape[2] != 1, LAYOUT_H=layout_heads != 1,
                KK=pow2(topk, 1), BLOCK=pow2(bs), BLOCK_D=pow2(d), BLOCK_DV=pow2(dv))


def num_warps(const: dict) -> int:
    return 8 if const["BLOCK"] >= 128 else 4


def sparse_attention_routed_table_free(q, k, v, attn_bias=None, layout=None, dynamic: bool = False, **attrs):
    """``block_topk`` / ``block_layout`` with :data:`sparse_attention_routed` (no host routing, no table: what
    TensorRT's AOT path runs); ``dynamic`` compiles as for a dynamic N (the block resolved in the kernel)."""
    import torch

    bsz, heads, n, d = q.shape
    dv = v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bias = attn_bias.contiguous() if attn_bias is not None else q
    lay = layout.to(torch.int64).contiguous() if layout is not None else torch.zeros(1, dtype=torch.int64,
                                                                                        device=q.device)
    out = torch.empty((bsz, heads, n, dv), dtype=q.dtype, device=q.device)
    const = routed_constexprs(attrs, None if dynamic else n, d, dv,
                              None if attn_bias is None else tuple(attn_bias.shape),
                              layout.shape[0] if layout is not None else 1)
    grid = (-(-n // const["BS"]), bsz * heads)
    sparse_attention_routed[grid](q, k, v, bias, lay, heads, n, d, dv, out, num_warps=num_warps(const), **const)
    return out
