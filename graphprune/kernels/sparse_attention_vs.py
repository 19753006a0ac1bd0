"""Triton kernel for ``SparseAttention``'s ``vertical_slash`` pattern: flash-style over the kept lines only.

The selection (the run-time estimate from the last ``last_q`` queries, then the top columns and block offsets) is
:func:`graphprune.ops.sparse_attention.vertical_slash_select`, on the tensors' device; it costs ``last_q · N`` scores. The kernel
then runs one program per (query block of ``b`` rows, batch·head), with an online softmax (running max, sum, fp32
accumulator):

  1. the band: for each kept block offset ``δ`` (the local one, ``δ = 0``, comes first: it scores +inf), the key
     block ``qb - δ`` when it exists, causal inside the local block;
  2. the columns, ``BLOCK_C`` at a time: a kept column is read when it lies in an earlier block whose offset is not
     kept (a kept block already holds it; the local block always is).

Cost: ``b · (slash · b + vertical)`` scores per query block, never ``N²``. Semantics: :meth:`SparseAttention.compute`
(tests compare against ``SparseAttention.reference``). Inputs contiguous ``[B, H, N, D]``; offsets and columns
``[B, H, slash]`` / ``[B, H, vertical]`` int32. TensorRT's AOT path (one launch, no host step) has no kernel for
this pattern: its selection needs a top-k over N that the table-free kernels do not do (``aot_refusal`` says so).
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphprune.kernels import pow2
from graphprune.ops import SparseAttention
from graphprune.ops.sparse_attention import at_length
from graphprune.ops.sparse_attention import vertical_slash_select as select


@triton.jit
def _softmax_step(s, m_i, l_i, acc, v):
    """One online-softmax update with the [M, C] scores ``s`` (masked entries -inf) and their values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


def _vertical_slash_fwd(Q, K, V, Offsets, Columns, Out, N, D, DV, SK, VK, scale,
                        BS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    rows = qb * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    base_qk = bh.to(tl.int64) * N * D
    base_v = bh.to(tl.int64) * N * DV
    q = tl.load(Q + base_qk + rows[:, None] * D + offs_d[None, :], mask=(rows < N)[:, None] & (offs_d < D)[None, :],
                other=0.0)
    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, BLOCK_DV], tl.float32)
    for j in range(0, SK):
        kb = qb - tl.load(Offsets + bh * SK + j)
        if kb >= 0:
            cols = kb * BS + tl.arange(0, BS)
            kmask = (cols < N)[:, None]
            k = tl.load(K + base_qk + cols[:, None] * D + offs_d[None, :], mask=kmask & (offs_d < D)[None, :],
                        other=0.0)
            v = tl.load(V + base_v + cols[:, None] * DV + offs_dv[None, :], mask=kmask & (offs_dv < DV)[None, :],
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < N)[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v)
    for c0 in range(0, VK, BLOCK_C):
        ci = c0 + tl.arange(0, BLOCK_C)
        col = tl.load(Columns + bh * VK + ci, mask=ci < VK, other=0)
        delta = qb - col // BS
        ok = (ci < VK) & (delta > 0)
        for j in range(0, SK):
            ok = ok & (delta != tl.load(Offsets + bh * SK + j))
        k = tl.load(K + base_qk + col[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d < D)[None, :],
                    other=0.0)
        v = tl.load(V + base_v + col[:, None] * DV + offs_dv[None, :], mask=ok[:, None] & (offs_dv < DV)[None, :],
                    other=0.0)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision="ieee") * scale, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v)
    out = acc / l_i[:, None]
    tl.store(Out + base_v + rows[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=(rows < N)[:, None] & (offs_dv < DV)[None, :])


vertical_slash_fwd = triton.jit(_vertical_slash_fwd)
#: The plain function, for ahead-of-time compilation (``graphprune.kernels.aot``).
SOURCES = {"sparse_attention_vs": _vertical_slash_fwd}


def vertical_slash(q, k, v, block_c: int = 16, **attrs):
    """``SparseAttention`` ``vertical_slash`` on torch tensors ``[B, H, N, D]`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``): the selection on the device, then one launch over (query blocks, batch·head)."""
    import torch
    from array_api_compat import torch as xp

    bsz, heads, n, d = q.shape
    dv = v.shape[3]
    a = at_length(SparseAttention.normalize(**attrs), n, d)
    if a["pattern"] != "vertical_slash":
        raise ValueError(f"this kernel runs vertical_slash, not {a['pattern']}")
    columns, offsets, b = select(xp, a, q, k)
    if b < 16 or b & (b - 1):
        raise ValueError(f"the vertical_slash kernel needs a power-of-two block of at least 16 tokens, not {b}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty((bsz, heads, n, dv), dtype=q.dtype, device=q.device)
    offsets = offsets.to(torch.int32).contiguous()
    columns = columns.to(torch.int32).contiguous()
    grid = (-(-n // b), bsz * heads)
    vertical_slash_fwd[grid](q, k, v, offsets, columns, out, n, d, dv, offsets.shape[-1], columns.shape[-1],
                              float(a["scale"]), BS=b, BLOCK_C=block_c, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv))
    return out
