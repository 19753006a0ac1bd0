"""Triton kernel for ``TokenSelect``: selection, order, gather and the fused rest token in one launch.

Selection without a sort. Scores become order-preserving int32 keys (the float's bits, the magnitude bits flipped
for negatives, ``-0`` read as ``+0``), and every program finds the **threshold** key ``t``, the ``k``-th largest,
by a radix select: 4 rounds of 8 bits, each counting, among the keys that match the bits found so far, those whose
next byte is ``>= d`` for every ``d`` (``[32, 256]`` compares per step, ``O(4·256·M)``, no scratch). A
candidate is kept when its key is above ``t``, or equal to it and among the first ``k - #{key > t}`` such ties by
index: exactly the ``k`` first tokens of the stable descending order (ONNX ``TopK``, ties to the lower index).

Grid ``(cdiv(N, BLOCK), B)``; program ``(tile, b)`` takes ``BLOCK`` tokens of row ``b``:

  1. the threshold (above), recomputed by every program;
  2. for its tokens, one pass over the candidates (``[BLOCK, BLOCK]`` compares per step, ``O(BLOCK·M)``) counting,
     per token, the candidates before it that are above ``t`` and those equal to ``t`` (which tells whether it is
     kept and, with ``keep_order``, its output row: ``protect +`` the kept tokens before it), and its rank in the
     descending order (its output row without ``keep_order``);
  3. every kept token (and the ``protect`` prefix) is copied to its row, its index written;
  4. ``fuse_rest``: program ``(0, b)`` also writes the score-weighted mean of the dropped rows (fp32 accumulation;
     zero when nothing is dropped), EViT's fused token, walking the candidates in order with a running tie count.

``k`` follows the runtime ``N`` as the op's shape rule does (``TokenSelect.kept``: an explicit ``k``, or
``ceil(M·num/den)`` for the ratio ``num/den``), from compile-time ``K``, ``NUM``, ``DEN``. Arguments: the input
pointers, ``N, C`` (int32), the output pointers; tensors contiguous. One launch, no scratch memory and no host
table: TensorRT's ahead-of-time plugin path can launch it. Semantics are ``TokenSelect.compute``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphprune.ops import TokenSelect
from graphprune.ops.token_select import ratio_fraction


def _token_select(X, S, N, C, Y, Idx,
                  P: tl.constexpr, K: tl.constexpr, NUM: tl.constexpr, DEN: tl.constexpr,
                  KEEP_ORDER: tl.constexpr, FUSE_REST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                  SEL: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = N - P
    if K > 0:
        kk = tl.minimum(m, K)
    else:
        kk = tl.maximum(1, tl.minimum(m, (m * NUM + DEN - 1) // DEN))
    n_keep = P + kk
    n_out = n_keep + FUSE_REST
    sbase = S + b * N + P
    # 1. threshold key t, the kk-th largest: radix select on the key + 2^31 (unsigned), 8 bits a round
    prefix = tl.zeros([], tl.int64)
    rem = kk  # rank of t among the keys that match the prefix so far
    digits = tl.arange(0, 256)
    for r in range(4):
        shift = 24 - 8 * r
        ge = tl.zeros([256], tl.int32)  # ge[d]: matching keys whose digit is >= d
        for i0 in range(0, m, SEL):
            oi = i0 + tl.arange(0, SEL)
            s = tl.load(sbase + oi, mask=oi < m, other=0.0).to(tl.float32)
            bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))
            u = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
            match = (oi < m) & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = ((u >> shift) & 255).to(tl.int32)
            ge += tl.sum(((digit[:, None] >= digits[None, :]) & match[:, None]).to(tl.int32), 0)
        d = tl.sum((ge >= rem).to(tl.int32), 0) - 1  # the largest digit with ge[d] >= rem (ge falls with d)
        above = tl.sum(tl.where(digits == d + 1, ge, 0), 0)
        rem = rem - above
        prefix = prefix | (d.to(tl.int64) << shift)
    t = prefix - 2147483648
    # 2. per token of this tile: candidates before it above / at t, and its descending rank
    tok = pid * BLOCK + tl.arange(0, BLOCK)
    oj = tok - P
    ok_j = (oj >= 0) & (oj < m)
    s_j = tl.load(sbase + oj, mask=ok_j, other=0.0).to(tl.float32)
    bits_j = tl.where(s_j == 0.0, 0, s_j.to(tl.int32, bitcast=True))
    key_j = tl.where(bits_j < 0, bits_j ^ 0x7FFFFFFF, bits_j).to(tl.int64)
    gt_before = tl.zeros([BLOCK], tl.int32)
    eq_before = tl.zeros([BLOCK], tl.int32)
    gt_all = tl.zeros([], tl.int32)
    rank = tl.zeros([BLOCK], tl.int32)
    for i0 in range(0, m, BLOCK):
        oi = i0 + tl.arange(0, BLOCK)
        ok_i = oi < m
        s = tl.load(sbase + oi, mask=ok_i, other=0.0).to(tl.float32)
        bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        earlier = ok_i[:, None] & (oi[:, None] < oj[None, :])
        gt_before += tl.sum((earlier & (key[:, None] > t)).to(tl.int32), 0)
        eq_before += tl.sum((earlier & (key[:, None] == t)).to(tl.int32), 0)
        gt_all += tl.sum((ok_i & (key > t)).to(tl.int32), 0)
        if not KEEP_ORDER:
            ahead = (key[:, None] > key_j[None, :]) | ((key[:, None] == key_j[None, :]) & (oi[:, None] < oj[None, :]))
            rank += tl.sum((ahead & ok_i[:, None]).to(tl.int32), 0)
    need = kk - gt_all  # ties at t that are kept, by index
    kept = ok_j & ((key_j > t) | ((key_j == t) & (eq_before < need)))
    if KEEP_ORDER:
        pos = gt_before + tl.minimum(eq_before, need)
    else:
        pos = rank
    pre = (tok < P) & (tok < N)
    row = tl.where(pre, tok, P + pos)
    write = pre | kept
    # 3. gather
    tl.store(Idx + b * n_keep + row, tok.to(tl.int64), mask=write)
    for c0 in range(0, C, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        m2 = write[:, None] & (oc < C)[None, :]
        xr = tl.load(X + b * N * C + tok[:, None] * C + oc[None, :], mask=m2, other=0.0)
        tl.store(Y + b * n_out * C + row[:, None] * C + oc[None, :], xr, mask=m2)
    # 4. the fused rest token
    if FUSE_REST:
        if pid == 0:
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                ok_c = oc < C
                num = tl.zeros([BLOCK_C], tl.float32)
                den = tl.zeros([], tl.float32)
                ties = tl.zeros([], tl.int32)
                for i0 in range(0, m, BLOCK):
                    oi = i0 + tl.arange(0, BLOCK)
                    ok_i = oi < m
                    s = tl.load(sbase + oi, mask=ok_i, other=0.0).to(tl.float32)
                    bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))
                    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
                    eq = (ok_i & (key == t)).to(tl.int32)
                    tie_rank = ties + tl.cumsum(eq, 0) - eq
                    keep_i = (key > t) | ((key == t) & (tie_rank < need))
                    w = tl.where(ok_i & ~keep_i, s, 0.0)
                    xr = tl.load(X + b * N * C + (P + oi)[:, None] * C + oc[None, :],
                                 mask=ok_i[:, None] & ok_c[None, :], other=0.0).to(tl.float32)
                    num += tl.sum(w[:, None] * xr, 0)
                    den += tl.sum(w, 0)
                    ties += tl.sum(eq, 0)
                rest = num / tl.maximum(den, 1e-12)
                tl.store(Y + b * n_out * C + n_keep * C + oc, rest.to(Y.dtype.element_ty), mask=ok_c)


token_select_kernel = triton.jit(_token_select)
#: The plain function, for ahead-of-time compilation (``graphprune.kernels.aot``).
SOURCES = {"token_select": _token_select}


def constexprs(attrs: dict, block: int = 128, block_c: int = 64) -> dict:
    """The kernel's compile-time constants for one attribute set (any N)."""
    a = TokenSelect.normalize(**attrs)
    num, den = ratio_fraction(a["keep_ratio"]) if not a["k"] else (1, 1)
    return dict(P=a["protect"], K=a["k"], NUM=num, DEN=den, KEEP_ORDER=bool(a["keep_order"]),
                FUSE_REST=bool(a["fuse_rest"]), BLOCK=block, BLOCK_C=block_c, SEL=32)


def token_select(x, scores, block: int = 16, block_c: int = 32, **attrs):
    """``TokenSelect`` on torch tensors with the Triton kernel; returns ``(y, indices)``."""
    import torch

    a = TokenSelect.normalize(**attrs)
    bsz, n, ch = x.shape
    p = a["protect"]
    keep = TokenSelect.kept(n, a).static
    x, scores = x.contiguous(), scores.contiguous()
    y = torch.empty((bsz, p + keep + a["fuse_rest"], ch), dtype=x.dtype, device=x.device)
    idx = torch.empty((bsz, p + keep), dtype=torch.int64, device=x.device)
    token_select_kernel[(triton.cdiv(n, block), bsz)](x, scores, n, ch, y, idx, **constexprs(a, block, block_c))
    return y, idx
