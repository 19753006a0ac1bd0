"""Triton kernel for ``DiversitySelect`` (DivPrune greedy max-min cosine diversity): one launch, one program per
batch row, the greedy loop inside the kernel.

The semantics are :meth:`graphprune.ops.DiversitySelect.compute`; tests compare against
``DiversitySelect.reference``. On the ``M = N - protect`` candidates, with ``d(i, j) = 1 - cos(x_i, x_j)``,
program ``b``:

  1. row norms of the candidates (fp32);
  2. the first pick ``argmax_i min_{j≠i} d(i, j)``: ``[BLOCK_I, BLOCK_J]`` tiles of dot products (``tl.dot`` over
     ``BLOCK_C`` chunks, fp32, IEEE), a running min over the J tiles and a running argmax over the I tiles (a later
     tile wins only when strictly larger: ties go to the lower index, as ONNX ``ArgMax``). ``O(M²·C)``, no
     ``[M, M]`` matrix;
  3. ``k - 1`` greedy steps, each: ``argmax`` of the min-distance vector (picked tokens hold ``-inf``, the
     definition's ``-4`` exclusion, which never wins either), then the distances of every candidate to the new
     pick (``O(M·C)``) folded in with ``min``. The min-distance vector (``BLOCK_M`` floats) stays in registers;
  4. ``keep_order``: each pick's output row is the number of picks with a lower index (picks are distinct), else
     its pick step; rows are copied from ``x`` and ``indices`` written, after the ``protect`` prefix.

The launcher accepts ``M <= MAX_M`` (1024) and ``k <= MAX_M``; callers fall back to the op's torch implementation
above that. No scratch memory, no host-built table, no torch op: the kernel alone is the op (what TensorRT's
ahead-of-time plugin path can launch). Arguments: the input pointer, ``N, C`` (int32), the output pointers;
attributes and block sizes are compile-time constants. Tensors are contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphprune.kernels import pow2
from graphprune.ops import DiversitySelect

#: Largest candidate count M (and k) the kernel holds in registers.
MAX_M = 1024


def _diversity_select(X, N, C, Y, Idx,
                      P: tl.constexpr, K: tl.constexpr, KEEP_ORDER: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    m = N - P
    xbase = X + b * N * C + P * C  # candidate rows
    om = tl.arange(0, BLOCK_M)
    ok_m = om < m
    # 1. norms
    sq = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        xm = tl.load(xbase + om[:, None] * C + oc[None, :], mask=ok_m[:, None] & (oc < C)[None, :],
                     other=0.0).to(tl.float32)
        sq += tl.sum(xm * xm, 1)
    inv = tl.where(ok_m, 1.0 / tl.sqrt(tl.where(ok_m, sq, 1.0)), 0.0)
    # 2. first pick: argmax_i min_{j != i} d(i, j), tiled over i and j
    best = tl.full([], -float("inf"), tl.float32)
    first = tl.zeros([], tl.int32)
    for i0 in range(0, m, BLOCK_I):
        oi = i0 + tl.arange(0, BLOCK_I)
        ok_i = oi < m
        lo = tl.full([BLOCK_I], float("inf"), tl.float32)
        for j0 in range(0, m, BLOCK_I):
            oj = j0 + tl.arange(0, BLOCK_I)
            ok_j = oj < m
            dots = tl.zeros([BLOCK_I, BLOCK_I], tl.float32)
            sq_i = tl.zeros([BLOCK_I], tl.float32)
            sq_j = tl.zeros([BLOCK_I], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                ok_c = oc < C
                xi = tl.load(xbase + oi[:, None] * C + oc[None, :], mask=ok_i[:, None] & ok_c[None, :],
                             other=0.0).to(tl.float32)
                xj = tl.load(xbase + oj[:, None] * C + oc[None, :], mask=ok_j[:, None] & ok_c[None, :],
                             other=0.0).to(tl.float32)
                dots += tl.dot(xi, tl.trans(xj), input_precision="ieee")
                sq_i += tl.sum(xi * xi, 1)
                sq_j += tl.sum(xj * xj, 1)
            cos = dots / tl.sqrt(tl.where(ok_i, sq_i, 1.0))[:, None] / tl.sqrt(tl.where(ok_j, sq_j, 1.0))[None, :]
            d = tl.where(ok_j[None, :] & (oi[:, None] != oj[None, :]), 1.0 - cos, float("inf"))
            lo = tl.minimum(lo, tl.min(d, 1))
        lo = tl.where(ok_i, lo, -float("inf"))
        tile_best = tl.max(lo, 0)
        tile_arg = tl.argmax(lo, 0, tie_break_left=True) + i0
        take = tile_best > best
        first = tl.where(take, tile_arg, first)
        best = tl.where(take, tile_best, best)
    # 3. greedy steps on the min-distance vector
    ok_out = tl.arange(0, BLOCK_K)
    picks = tl.where(ok_out == 0, first, 0)
    mind = tl.full([BLOCK_M], float("inf"), tl.float32)
    nxt = first
    for step in range(0, K):
        if step > 0:
            nxt = tl.argmax(mind, 0, tie_break_left=True)
            picks = tl.where(ok_out == step, nxt, picks)
        if step < K - 1:
            dot = tl.zeros([BLOCK_M], tl.float32)
            sq_s = tl.zeros([BLOCK_C], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                ok_c = oc < C
                xs = tl.load(xbase + nxt * C + oc, mask=ok_c, other=0.0).to(tl.float32)
                xm = tl.load(xbase + om[:, None] * C + oc[None, :], mask=ok_m[:, None] & ok_c[None, :],
                             other=0.0).to(tl.float32)
                dot += tl.sum(xm * xs[None, :], 1)
                sq_s += xs * xs
            d = 1.0 - dot * inv / tl.sqrt(tl.sum(sq_s, 0))
            mind = tl.minimum(mind, d)
            mind = tl.where(ok_m & (om != nxt), mind, -float("inf"))
    # 4. output rows
    ok_k = ok_out < K
    if KEEP_ORDER:
        lower = (picks[:, None] < picks[None, :]) & ok_k[:, None]
        row = tl.sum(lower.to(tl.int32), 0)
    else:
        row = ok_out
    n_keep = P + K
    ybase = Y + b * n_keep * C
    src = P + picks
    for c0 in range(0, C, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        ok_c = oc < C
        xk = tl.load(X + b * N * C + src[:, None] * C + oc[None, :], mask=ok_k[:, None] & ok_c[None, :], other=0.0)
        tl.store(ybase + (P + row)[:, None] * C + oc[None, :], xk, mask=ok_k[:, None] & ok_c[None, :])
        for t in range(P):  # the protected prefix, first
            xp = tl.load(X + b * N * C + t * C + oc, mask=ok_c, other=0.0)
            tl.store(ybase + t * C + oc, xp, mask=ok_c)
    tl.store(Idx + b * n_keep + P + row, src.to(tl.int64), mask=ok_k)
    for t in range(P):
        tl.store(Idx + b * n_keep + t, t + tl.zeros([], tl.int64))


diversity_select_kernel = triton.jit(_diversity_select)
#: The plain function, for ahead-of-time compilation (``graphprune.kernels.aot``).
SOURCES = {"diversity_select": _diversity_select}


def constexprs(n: int, c: int, attrs: dict) -> dict:
    """The kernel's compile-time constants for ``N = n`` (``n`` bounds ``BLOCK_M``: the kernel also runs for any
    smaller N >= protect + k) and ``c`` channels."""
    a = DiversitySelect.normalize(**attrs)
    return dict(P=a["protect"], K=a["k"], KEEP_ORDER=bool(a["keep_order"]), BLOCK_M=pow2(n - a["protect"]),
                BLOCK_I=32, BLOCK_C=min(pow2(c), 32 if n - a["protect"] > 256 else 64), BLOCK_K=pow2(a["k"]))


def supported(n: int, attrs: dict) -> bool:
    """Whether the kernel takes ``n`` tokens (``k <= M <= MAX_M``)."""
    a = DiversitySelect.normalize(**attrs)
    return a["k"] <= n - a["protect"] <= MAX_M


def diversity_select(x, **attrs):
    """``DiversitySelect`` on torch tensors with the Triton kernel; returns ``(y, indices)``."""
    import torch

    a = DiversitySelect.normalize(**attrs)
    bsz, n, c = x.shape
    if not supported(n, a):
        raise ValueError(f"diversity_select kernel: N = {n} needs k <= N - protect <= {MAX_M} "
                         f"(k = {a['k']}, protect = {a['protect']})")
    x = x.contiguous()
    keep = a["protect"] + a["k"]
    y = torch.empty((bsz, keep, c), dtype=x.dtype, device=x.device)
    idx = torch.empty((bsz, keep), dtype=torch.int64, device=x.device)
    k = constexprs(n, c, a)
    diversity_select_kernel[(bsz,)](x, n, c, y, idx, num_warps=8 if k["BLOCK_M"] >= 512 else 4, **k)
    return y, idx
