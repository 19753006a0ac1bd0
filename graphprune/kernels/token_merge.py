"""Triton kernel for ``TokenMerge`` (ToMe bipartite soft matching with sizes): one launch, one program per batch row.

The semantics are :meth:`graphprune.ops.TokenMerge.compute`; tests compare against ``TokenMerge.reference``. For
``x [B, N, C]``, ``metric [B, N, D]``, ``size [B, N, 1]`` (optional), with ``M = N - protect`` candidates split
into A (even offsets, ``|A| = ceil(M/2)``) and B (odd offsets, ``|B| = floor(M/2)``), program ``b``:

  1. similarity: ``[|A|, |B|]`` dot products of the metric rows (``tl.dot`` over ``BLOCK_D`` chunks of ``D``, fp32,
     IEEE precision), divided by the rows' norms: cosine similarity;
  2. each A token's best B match: ``max`` and ``argmax`` over B (first on ties, as ONNX ``ArgMax``);
  3. top-r **without a sort**: an A token's rank is the number of A tokens with a higher best similarity, plus
     those with an equal one and a lower index (the stable descending order of the definition); it merges when
     ``rank < r`` (``r`` clamped to ``|A|``);
  4. output rows in the original order: a surviving token at position ``t`` goes to row ``t - (merged A tokens
     before t)``; a B token's row holds ``(x_b·s_b + Σ x_a·s_a) / (s_b + Σ s_a)`` over the A tokens merged into it
     (a ``[|B|, |A|]`` one-hot assignment times ``[|A|, C]``, ``tl.dot``, fp32), its size the sum; unmerged
     tokens are copied; ``indices`` is each output row's representative input position.

Everything lives in registers: the program holds ``[BLOCK_A, BLOCK_B]`` similarities, so the launcher accepts
``|A| <= MAX_SIDE`` (512; 1024 tokens) and callers fall back to the op's torch implementation above that. No
scratch memory, no host-built table and no torch op: the kernel alone is the op, which is what TensorRT's
ahead-of-time plugin path (one kernel, tensors and int32 scalars) can launch. Arguments: the input pointers,
then ``N, C, D`` (int32), then the output pointers; attributes and block sizes are compile-time constants.
Tensors are contiguous (the launcher makes them so; TensorRT's linear format is).
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphprune.kernels import pow2
from graphprune.ops import TokenMerge

#: Largest |A| (and |B|) the kernel holds in registers.
MAX_SIDE = 512


def _token_merge(X, Metric, Size, N, C, D, Y, SizeOut, Idx,
                 P: tl.constexpr, R: tl.constexpr, HAS_SIZE: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    m = N - P
    na = (m + 1) // 2
    nb = m // 2
    r = tl.minimum(na, R)
    n_out = N - r
    ia = tl.arange(0, BLOCK_A)
    ib = tl.arange(0, BLOCK_B)
    ok_a = ia < na
    ok_b = ib < nb
    ta = P + 2 * ia  # input positions of A and B tokens
    tb = P + 2 * ib + 1
    # 1. cosine similarity of A to B
    mbase = Metric + b * N * D
    dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    sq_a = tl.zeros([BLOCK_A], tl.float32)
    sq_b = tl.zeros([BLOCK_B], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        od = d0 + tl.arange(0, BLOCK_D)
        ok_d = od < D
        ma = tl.load(mbase + ta[:, None] * D + od[None, :], mask=ok_a[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
        mb = tl.load(mbase + tb[:, None] * D + od[None, :], mask=ok_b[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
        dots += tl.dot(ma, tl.trans(mb), input_precision="ieee")
        sq_a += tl.sum(ma * ma, 1)
        sq_b += tl.sum(mb * mb, 1)
    inv_a = 1.0 / tl.sqrt(tl.where(ok_a, sq_a, 1.0))
    inv_b = 1.0 / tl.sqrt(tl.where(ok_b, sq_b, 1.0))
    sim = dots * inv_a[:, None] * inv_b[None, :]
    sim = tl.where(ok_b[None, :], sim, float("-inf"))
    # 2. best match per A token (first on ties)
    best = tl.max(sim, 1)
    match = tl.argmax(sim, 1, tie_break_left=True)
    best = tl.where(ok_a, best, float("-inf"))
    # 3. rank among A by best similarity (descending, lower index first on ties): merged when rank < r
    bi = best[:, None]
    bj = best[None, :]
    ahead = ((bi > bj) | ((bi == bj) & (ia[:, None] < ia[None, :]))) & ok_a[:, None]
    rank = tl.sum(ahead.to(tl.int32), 0)
    merged = ok_a & (rank < r)
    # 4. output rows: t - (merged A tokens before t)
    mrg = merged.to(tl.int32)
    before_a = tl.sum(tl.where(ia[:, None] < ia[None, :], mrg[:, None], 0), 0)  # A tokens i' < i
    before_b = tl.sum(tl.where(ia[:, None] <= ib[None, :], mrg[:, None], 0), 0)  # A tokens i' <= j sit before B j
    row_a = ta - before_a
    row_b = tb - before_b
    keep_a = ok_a & (rank >= r)
    hot = (merged[None, :] & (match[None, :] == ib[:, None])).to(tl.float32)  # [BLOCK_B, BLOCK_A]
    if HAS_SIZE:
        s_a = tl.load(Size + b * N + ta, mask=ok_a, other=0.0).to(tl.float32)
        s_b = tl.load(Size + b * N + tb, mask=ok_b, other=0.0).to(tl.float32)
    else:
        s_a = tl.where(ok_a, 1.0, 0.0)
        s_b = tl.where(ok_b, 1.0, 0.0)
    s_new = s_b + tl.sum(hot * s_a[None, :], 1)
    xbase = X + b * N * C
    ybase = Y + b * n_out * C
    for c0 in range(0, C, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        ok_c = oc < C
        xa = tl.load(xbase + ta[:, None] * C + oc[None, :], mask=ok_a[:, None] & ok_c[None, :], other=0.0)
        xb = tl.load(xbase + tb[:, None] * C + oc[None, :], mask=ok_b[:, None] & ok_c[None, :],
                     other=0.0).to(tl.float32)
        acc = xb * s_b[:, None] + tl.dot(hot, xa.to(tl.float32) * s_a[:, None], input_precision="ieee")
        y_b = acc / tl.where(ok_b, s_new, 1.0)[:, None]
        tl.store(ybase + row_b[:, None] * C + oc[None, :], y_b.to(Y.dtype.element_ty),
                 mask=ok_b[:, None] & ok_c[None, :])
        tl.store(ybase + row_a[:, None] * C + oc[None, :], xa.to(Y.dtype.element_ty),
                 mask=keep_a[:, None] & ok_c[None, :])
        for t in range(P):  # the protected prefix, unchanged
            xp = tl.load(xbase + t * C + oc, mask=ok_c, other=0.0)
            tl.store(ybase + t * C + oc, xp.to(Y.dtype.element_ty), mask=ok_c)
    sbase = SizeOut + b * n_out
    ibase = Idx + b * n_out
    tl.store(sbase + row_b, s_new.to(SizeOut.dtype.element_ty), mask=ok_b)
    tl.store(sbase + row_a, s_a.to(SizeOut.dtype.element_ty), mask=keep_a)
    tl.store(ibase + row_b, tb.to(tl.int64), mask=ok_b)
    tl.store(ibase + row_a, ta.to(tl.int64), mask=keep_a)
    for t in range(P):
        if HAS_SIZE:
            s_t = tl.load(Size + b * N + t).to(tl.float32)
        else:
            s_t = 1.0
        tl.store(sbase + t, s_t.to(SizeOut.dtype.element_ty))
        tl.store(ibase + t, t + tl.zeros([], tl.int64))


token_merge_kernel = triton.jit(_token_merge)
#: The plain function, for ahead-of-time compilation (``graphprune.kernels.aot``).
SOURCES = {"token_merge": _token_merge}


def constexprs(n: int, c: int, d: int, attrs: dict) -> dict:
    """The kernel's compile-time constants for ``N = n`` (``n`` bounds the block sizes: the kernel also runs for
    any smaller N), channels ``c`` and metric dim ``d``."""
    a = TokenMerge.normalize(**attrs)
    m = n - a["protect"]
    return dict(P=a["protect"], R=a["r"], BLOCK_A=pow2((m + 1) // 2), BLOCK_B=pow2(m // 2),
                BLOCK_D=min(pow2(d), 64), BLOCK_C=min(pow2(c), 64))


def supported(n: int, attrs: dict) -> bool:
    """Whether the kernel takes ``n`` tokens (``|A| <= MAX_SIDE``, and the op's own ``N >= protect + 2``)."""
    a = TokenMerge.normalize(**attrs)
    m = n - a["protect"]
    return 2 <= m and (m + 1) // 2 <= MAX_SIDE


def num_warps(n: int, attrs: dict) -> int:
    """Warps per program: 4, or 8 once the similarity block reaches 128 × 128."""
    k = constexprs(n, 16, 16, attrs)
    return 8 if k["BLOCK_A"] * k["BLOCK_B"] >= 128 * 128 else 4


def token_merge(x, metric, size=None, **attrs):
    """``TokenMerge`` on torch tensors with the Triton kernel; returns ``(y, size_out, indices)``."""
    import torch

    a = TokenMerge.normalize(**attrs)
    bsz, n, c = x.shape
    d = metric.shape[2]
    if not supported(n, a):
        raise ValueError(f"token_merge kernel: N = {n} with protect = {a['protect']} is outside 2 <= N - protect and "
                         f"|A| <= {MAX_SIDE}")
    n_out = n - TokenMerge.merged(n, a).static
    x, metric = x.contiguous(), metric.contiguous()
    size = size.contiguous() if size is not None else None
    y = torch.empty((bsz, n_out, c), dtype=x.dtype, device=x.device)
    s_out = torch.empty((bsz, n_out, 1), dtype=x.dtype, device=x.device)
    idx = torch.empty((bsz, n_out), dtype=torch.int64, device=x.device)
    token_merge_kernel[(bsz,)](x, metric, size if size is not None else x, n, c, d, y, s_out, idx,
                               HAS_SIZE=size is not None, num_warps=num_warps(n, a), **constexprs(n, c, d, a))
    return y, s_out, idx
