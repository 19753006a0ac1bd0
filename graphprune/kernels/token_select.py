"""Triton kernels for ``TokenSelect``: rank, order, gather, and the fused rest token.

Selection without a sort: a token's **rank** among the ``M = N - protect`` candidates is the number of tokens
with a higher score, plus those with an equal score and a lower index (ONNX ``TopK`` / stable ``argsort``
order). A token is kept when ``rank < k``; its output row is ``protect + rank`` (score order) or ``protect +``
the number of kept tokens before it (``keep_order``). Kernels:

  1. ``rank``: one program per (candidate tile, batch) loops over all candidates: ``O(M²)`` compares, no sort;
  2. ``kept_before``: the same loop counting kept tokens with a lower index (``keep_order``);
  3. ``gather``: every input row that survives is copied to its output row, its index written;
  4. ``fuse_rest``: the score-weighted mean of the dropped rows (fp32 accumulation), EViT's fused token.

``k`` comes from the op definition's shape rule (``TokenSelect.kept``); semantics are ``TokenSelect.compute``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphprune.ops import TokenSelect


def _rank(S, R, sb, sn, M, P, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs_j = pid * BLOCK + tl.arange(0, BLOCK)
    ok_j = offs_j < M
    s_j = tl.load(S + b * sb + (P + offs_j) * sn, mask=ok_j, other=0.0).to(tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    for start in range(0, M, BLOCK):
        offs_i = start + tl.arange(0, BLOCK)
        ok_i = offs_i < M
        s_i = tl.load(S + b * sb + (P + offs_i) * sn, mask=ok_i, other=0.0).to(tl.float32)
        before = (s_i[:, None] > s_j[None, :]) | ((s_i[:, None] == s_j[None, :]) & (offs_i[:, None] < offs_j[None, :]))
        cnt += tl.sum((before & ok_i[:, None]).to(tl.int32), 0)
    tl.store(R + b * M + offs_j, cnt, mask=ok_j)


def _kept_before(R, C, M, KEEP, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs_j = pid * BLOCK + tl.arange(0, BLOCK)
    ok_j = offs_j < M
    cnt = tl.zeros([BLOCK], tl.int32)
    for start in range(0, M, BLOCK):
        offs_i = start + tl.arange(0, BLOCK)
        r_i = tl.load(R + b * M + offs_i, mask=offs_i < M, other=KEEP)
        kept = (r_i < KEEP)[:, None] & (offs_i[:, None] < offs_j[None, :])
        cnt += tl.sum(kept.to(tl.int32), 0)
    tl.store(C + b * M + offs_j, cnt, mask=ok_j)


def _gather(X, R, C, Y, Idx, sxb, sxn, sxc, syb, syn, syc, sib, N, M, P, CH, KEEP,
            KEEP_ORDER: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    t = pid * BLOCK + tl.arange(0, BLOCK)
    ok = t < N
    cand = tl.maximum(t - P, 0)
    r = tl.load(R + b * M + cand, mask=ok & (t >= P), other=0)
    if KEEP_ORDER:
        pos = tl.load(C + b * M + cand, mask=ok & (t >= P), other=0)
    else:
        pos = r
    dest = tl.where(t < P, t, P + pos)
    keep = ok & ((t < P) | (r < KEEP))
    tl.store(Idx + b * sib + dest, t.to(tl.int64), mask=keep)
    for c0 in range(0, CH, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m2 = keep[:, None] & (offs_c < CH)[None, :]
        x = tl.load(X + b * sxb + t[:, None] * sxn + offs_c[None, :] * sxc, mask=m2, other=0.0)
        tl.store(Y + b * syb + dest[:, None] * syn + offs_c[None, :] * syc, x, mask=m2)


def _fuse_rest(X, S, R, Y, sxb, sxn, sxc, sb, sn, syb, syn, syc, M, P, CH, KEEP, OUT_ROW,
               BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    pc = tl.program_id(1)
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = offs_c < CH
    num = tl.zeros([BLOCK_C], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    for start in range(0, M, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < M
        r = tl.load(R + b * M + j, mask=ok, other=0)
        s = tl.load(S + b * sb + (P + j) * sn, mask=ok, other=0.0).to(tl.float32)
        w = tl.where(ok & (r >= KEEP), s, 0.0)
        x = tl.load(X + b * sxb + (P + j)[:, None] * sxn + offs_c[None, :] * sxc, mask=ok[:, None] & ok_c[None, :],
                    other=0.0).to(tl.float32)
        num += tl.sum(w[:, None] * x, 0)
        den += w
    total = tl.maximum(tl.sum(den, 0), 1e-12)
    tl.store(Y + b * syb + OUT_ROW * syn + offs_c * syc, (num / total).to(Y.dtype.element_ty), mask=ok_c)


rank_kernel = triton.jit(_rank)
kept_before_kernel = triton.jit(_kept_before)
gather_kernel = triton.jit(_gather)
fuse_rest_kernel = triton.jit(_fuse_rest)
SOURCES = {"token_select_rank": _rank, "token_select_kept_before": _kept_before, "token_select_gather": _gather,
           "token_select_fuse_rest": _fuse_rest}


def token_select(x, scores, block: int = 16, block_c: int = 32, **attrs):
    """``TokenSelect`` on torch tensors with the Triton kernels; returns ``(y, indices)``."""
    import torch

    a = TokenSelect.normalize(**attrs)
    bsz, n, ch = x.shape
    p = a["protect"]
    m = n - p
    keep = TokenSelect.kept(n, a).static
    n_out = p + keep + a["fuse_rest"]
    dev = x.device
    rank = torch.empty((bsz, m), dtype=torch.int32, device=dev)
    grid = (triton.cdiv(m, block), bsz)
    rank_kernel[grid](scores, rank, scores.stride(0), scores.stride(1), m, p, BLOCK=block)
    before = rank
    if a["keep_order"]:
        before = torch.empty_like(rank)
        kept_before_kernel[grid](rank, before, m, keep, BLOCK=block)
    y = torch.empty((bsz, n_out, ch), dtype=x.dtype, device=dev)
    idx = torch.empty((bsz, p + keep), dtype=torch.int64, device=dev)
    gather_kernel[(triton.cdiv(n, block), bsz)](
        x, rank, before, y, idx, *x.stride(), *y.stride(), idx.stride(0), n, m, p, ch, keep,
        KEEP_ORDER=bool(a["keep_order"]), BLOCK=block, BLOCK_C=block_c)
    if a["fuse_rest"]:
        fuse_rest_kernel[(bsz, triton.cdiv(ch, block_c))](
            x, scores, rank, y, *x.stride(), scores.stride(0), scores.stride(1), *y.stride(), m, p, ch, keep,
            p + keep, BLOCK=block, BLOCK_C=block_c)
    return y, idx
