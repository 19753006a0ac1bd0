"""Triton kernel for ``SparseAttention``: flash-style, reading only the pattern's KV tiles.

One program per (query tile of ``BLOCK_M`` rows, batch·head). It walks a **tile table** (``[.., n_qtiles, T]``
int32, ``-1`` padded) listing the KV tiles (``BLOCK_N`` keys) its queries may read, and keeps an online softmax
(running max ``m``, sum ``l``, fp32 accumulator): no ``[N, N]`` tensor exists anywhere. Inside a tile the exact
allowed set is a mask computed from the pattern (``MODE``):

  0. routed (``block_topk``, ``block_layout``): ``chosen[q_block, k_block]`` from the op definition's routing
     (:func:`graphprune.ops.sparse_attention.routed_blocks`, on ``[nb, nb]`` block means), global query rows see
     every key;
  1. ``sliding_window``: the NATTEN-clamped window (or causal window) plus ``num_global`` global tokens;
  2. ``neighborhood_2d``: the k × k (dilated) neighborhood on the token grid plus the global prefix.

The tile table is a superset built on the host from each query's key interval (O(N)), so the cost follows the
pattern. TensorRT's AOT path has no host step, so it runs table-free kernels instead: ``sparse_attention_static``
below (each query tile's KV span computed in the kernel) and, for the routed patterns,
:mod:`graphprune.kernels.sparse_attention_routed` (routing or layout row read in the kernel). The semantics are :meth:`SparseAttention.compute`; tests compare against ``SparseAttention.reference``.
Bias (``key`` or ``full``) is added floored at -1e30, so fully masked rows average V over their allowed keys.
"""

from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl

from graphprune.kernels import pow2
from graphprune.ops import SparseAttention
from graphprune.ops.sparse_attention import at_length, routed_blocks

MODES = {"block_topk": 0, "block_layout": 0, "sliding_window": 1, "neighborhood_2d": 2}


def _sparse_attention_fwd(
    Q, K, V, Bias, Chosen, Table, Out,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sbb, sbh, sbq, sbk, scb, sch, stb, sth, stq,
    H, N, D, DV, scale, W, G, GH, GW, KS, DIL, RB, NBR, T,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TABLE: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    i = offs_m[:, None]
    if TABLE:
        n_iter = T
        gt = 0
        start_t = 0
    else:  # static patterns: the tile's key span from each row's interval (as key_intervals), global tiles first
        n_kt = tl.cdiv(N, BLOCK_N)
        rows = offs_m
        if MODE == 1:
            if CAUSAL:
                lo_r = tl.maximum(rows - W + 1, 0)
                hi_r = rows + 1
            else:
                lo_r = tl.minimum(tl.maximum(rows - W // 2, 0), tl.maximum(N - W, 0))
                hi_r = tl.minimum(lo_r + W, N)
        else:
            qr = tl.maximum(rows - G, 0) // GW
            sub = (GH - qr % DIL + DIL - 1) // DIL
            ka = tl.minimum(sub * 0 + KS, sub)
            st = tl.minimum(tl.maximum(qr // DIL - KS // 2, 0), sub - ka)
            lo_r = G + (st * DIL + qr % DIL) * GW
            hi_r = G + ((st + ka - 1) * DIL + qr % DIL + 1) * GW
        lo_k = tl.min(tl.where(row_ok, lo_r, N), 0)
        hi_k = tl.max(tl.where(row_ok, hi_r, 0), 0)
        has_global = pid_m * BLOCK_M < G  # global query rows see every key: the whole row of tiles
        gt = tl.where(has_global, 0, tl.cdiv(G, BLOCK_N))
        start_t = tl.where(has_global, 0, tl.maximum(lo_k // BLOCK_N, gt))
        end_t = tl.where(has_global, n_kt, tl.cdiv(hi_k, BLOCK_N))
        n_iter = gt + tl.maximum(end_t - start_t, 0)
    for t in range(0, n_iter):
        if TABLE:
            kt = tl.load(Table + b * stb + h * sth + pid_m * stq + t)
        else:
            kt = tl.where(t < gt, t, t - gt + start_t)
        if kt >= 0:
            offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                        mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)
            s = tl.dot(q, k, input_precision="ieee") * scale
            j = offs_n[None, :]
            if MODE == 0:
                ch = tl.load(Chosen + b * scb + h * sch + (i // RB) * NBR + j // RB,
                             mask=row_ok[:, None] & col_ok[None, :], other=0)
                allowed = (ch != 0) | (i < G)
                if CAUSAL:  # block_topk causal: no key after the query
                    allowed = allowed & (j <= i)
            elif MODE == 1:
                if CAUSAL:
                    allowed = tl.where(i < G, j <= i, ((j <= i) & (j > i - W)) | (j < G))
                else:
                    start = tl.minimum(tl.maximum(i - W // 2, 0), tl.maximum(N - W, 0))
                    allowed = (i < G) | (j < G) | ((j >= start) & (j < start + W))
            else:
                qi = tl.maximum(i - G, 0)
                kj = tl.maximum(j - G, 0)
                r = qi // GW
                c = qi % GW
                kr = kj // GW
                kc = kj % GW
                ok = ((kr % DIL) == (r % DIL)) & ((kc % DIL) == (c % DIL))
                sub_r = (GH - r % DIL + DIL - 1) // DIL
                ka_r = tl.minimum(sub_r * 0 + KS, sub_r)
                st_r = tl.minimum(tl.maximum(r // DIL - KS // 2, 0), sub_r - ka_r)
                ok = ok & (kr // DIL >= st_r) & (kr // DIL < st_r + ka_r)
                sub_c = (GW - c % DIL + DIL - 1) // DIL
                ka_c = tl.minimum(sub_c * 0 + KS, sub_c)
                st_c = tl.minimum(tl.maximum(c // DIL - KS // 2, 0), sub_c - ka_c)
                ok = ok & (kc // DIL >= st_c) & (kc // DIL < st_c + ka_c)
                allowed = (i < G) | (j < G) | ok
            allowed = allowed & col_ok[None, :] & row_ok[:, None]
            if HAS_BIAS:
                bias = tl.load(Bias + b * sbb + h * sbh + i * sbq + j * sbk,
                               mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                s = s + tl.maximum(bias.to(tl.float32), -1e30)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])


sparse_attention_fwd = triton.jit(_sparse_attention_fwd)


def _sparse_attention_static(Q, K, V, Bias, Layout, H, N, D, DV, Out,
                             SCALE: tl.constexpr, W: tl.constexpr, G: tl.constexpr, GH: tl.constexpr,
                             GW: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr,
                             MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_B: tl.constexpr,
                             BIAS_H: tl.constexpr, BIAS_FULL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DV: tl.constexpr):
    """The static patterns (sliding window, 2-D neighborhood) in TensorRT's AOT argument order: the plugin's
    inputs (``Layout`` unused), the int32 dims, the output; contiguous tensors, a bias ``[B|1, H|1, 1|N, N]``."""
    sbk = 1
    sbq = N if BIAS_FULL else 0
    sbh = (N * N if BIAS_FULL else N) if BIAS_H else 0
    sbb = (H * (N * N if BIAS_FULL else N) if BIAS_H else (N * N if BIAS_FULL else N)) if BIAS_B else 0
    sparse_attention_fwd(
        Q, K, V, Bias, Layout, Layout, Out,
        H * N * D, N * D, D, 1, H * N * D, N * D, D, 1, H * N * DV, N * DV, DV, 1, H * N * DV, N * DV, DV, 1,
        sbb, sbh, sbq, sbk, 0, 0, 0, 0, 0,
        H, N, D, DV, SCALE, W, G, GH, GW, KS, DIL, 1, 1, 0,
        MODE=MODE, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV, TABLE=False)


sparse_attention_static = triton.jit(_sparse_attention_static)
#: The plain functions, for ahead-of-time compilation (``graphprune.kernels.aot``).
SOURCES = {"sparse_attention_fwd": _sparse_attention_fwd, "sparse_attention_static": _sparse_attention_static}
#: Patterns of the table-free ``sparse_attention_static`` (the routed ones have ``sparse_attention_routed``).
STATIC_PATTERNS = ("sliding_window", "neighborhood_2d")


def key_intervals(a: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query ``[lo, hi)``: a key interval covering its allowed non-global keys (window / neighborhood)."""
    i = np.arange(n)
    g = a["num_global"]
    if a["pattern"] == "sliding_window":
        w = a["window"]
        if a["causal"]:
            lo, hi = np.maximum(0, i - w + 1), i + 1
        else:
            lo = np.clip(i - w // 2, 0, max(n - w, 0))
            hi = np.minimum(lo + w, n)
        glob_hi = i + 1 if a["causal"] else np.full(n, n)
    else:
        gh, gw = a["grid"]
        k, d = a["kernel"], a["dilation"]
        qi = np.maximum(i - g, 0)
        r = qi // gw
        sub = (gh - r % d + d - 1) // d
        ka = np.minimum(k, sub)
        st = np.clip(r // d - k // 2, 0, sub - ka)
        rows_lo, rows_hi = st * d + r % d, (st + ka - 1) * d + r % d
        lo, hi = g + rows_lo * gw, g + (rows_hi + 1) * gw
        glob_hi = np.full(n, n)
    lo = np.where(i < g, 0, lo)
    hi = np.where(i < g, glob_hi, hi)
    return lo.astype(np.int64), hi.astype(np.int64)


def _static_table(a: dict, n: int, bm: int, bn: int) -> np.ndarray:
    lo, hi = key_intervals(a, n)
    nqt, nkt = -(-n // bm), -(-n // bn)
    g_tiles = -(-a["num_global"] // bn)
    rows = []
    for t in range(nqt):
        sl = slice(t * bm, min(n, (t + 1) * bm))
        span = range(int(lo[sl].min()) // bn, -(-int(hi[sl].max()) // bn))
        rows.append(sorted(set(range(g_tiles)) | set(span)))
    width = max(len(r) for r in rows)
    table = np.full((1, 1, nqt, width), -1, dtype=np.int32)
    for t, r in enumerate(rows):
        table[0, 0, t, : len(r)] = r
    assert width <= nkt
    return table


def _overlap(n: int, tile: int, block: int, count_tiles: int, nb: int) -> np.ndarray:
    """[count_tiles, nb] 0/1: does tile t (``tile`` tokens) overlap routing block r (``block`` tokens)?"""
    t = np.arange(count_tiles)[:, None]
    r = np.arange(nb)[None, :]
    t_lo, t_hi = t * tile, np.minimum((t + 1) * tile, n)
    r_lo, r_hi = r * block, np.minimum((r + 1) * block, n)
    return ((t_lo < r_hi) & (r_lo < t_hi)).astype(np.float32)


def _routed_table(torch, chosen, rb: int, n: int, g: int, bm: int, bn: int):
    nb = chosen.shape[-1]
    nqt, nkt = -(-n // bm), -(-n // bn)
    oq = torch.from_numpy(_overlap(n, bm, rb, nqt, nb)).to(chosen.device)
    ok = torch.from_numpy(_overlap(n, bn, rb, nkt, nb)).to(chosen.device)
    hit = (oq @ chosen.to(torch.float32) @ ok.T) > 0  # [B, H, nqt, nkt]
    glob = torch.arange(nqt, device=chosen.device) * bm < g
    hit = hit | glob[:, None]
    cols = torch.arange(nkt, device=chosen.device, dtype=torch.int32)
    key = torch.where(hit, cols, cols + nkt)
    order = torch.sort(key, dim=-1).values
    width = int(hit.sum(-1).max())
    table = order[..., :width]
    return torch.where(table < nkt, table, torch.full_like(table, -1)).to(torch.int32).contiguous()


def sparse_attention(q, k, v, attn_bias=None, layout=None, block_m: int = 16, block_n: int = 16, **attrs):
    """``SparseAttention`` on torch tensors with the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    import torch
    from array_api_compat import torch as xp

    if attrs.get("pattern") == "vertical_slash":
        from graphprune.kernels.sparse_attention_vs import vertical_slash

        return vertical_slash(q, k, v, **attrs)
    bsz, heads, n, d = q.shape
    dv = v.shape[3]
    a = at_length(SparseAttention.normalize(**attrs), n, d)
    mode = MODES[a["pattern"]]
    out = torch.empty((bsz, heads, n, dv), dtype=q.dtype, device=q.device)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    chosen, rb, nbr = dummy, 1, 1
    if mode == 0:
        ch, rb = routed_blocks(xp, a, q, k, layout, attn_bias)
        chosen = ch.to(torch.int8).expand(bsz, heads, -1, -1).contiguous()
        nbr = chosen.shape[-1]
        table = _routed_table(torch, chosen, rb, n, a["num_global"], block_m, block_n)
    else:
        table = torch.from_numpy(_static_table(a, n, block_m, block_n)).to(q.device)
    bias = attn_bias if attn_bias is not None else q
    bstride = [0, 0, 0, 0]
    if attn_bias is not None:
        bstride = [st if sz != 1 else 0 for st, sz in zip(attn_bias.stride(), attn_bias.shape)]
    cst = (chosen.stride(0), chosen.stride(1)) if mode == 0 else (0, 0)
    tst = [st if sz != 1 else 0 for st, sz in zip(table.stride()[:3], table.shape[:3])]
    grid = (-(-n // block_m), bsz * heads)
    gh, gw = a["grid"] if a["grid"] else (1, 1)
    sparse_attention_fwd[grid](
        q, k, v, bias, chosen, table, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bstride, *cst, *tst,
        heads, n, d, dv, float(a["scale"]), a["window"] or 1, a["num_global"] or 0, gh, gw, a["kernel"] or 1,
        a["dilation"] or 1, rb, nbr, table.shape[-1],
        MODE=mode, CAUSAL=bool(a["causal"]), HAS_BIAS=attn_bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv),
    )
    return out


def static_constexprs(attrs: dict, n: int | None, d: int, dv: int, bias_shape: tuple | None,
                      block: int = 16) -> dict:
    """Compile-time constants of the table-free kernel (``sliding_window``, ``neighborhood_2d``) for one attribute
    set, head sizes and bias shape (``None``: no bias); ``n`` checks the attributes against a static N (``None``
    for a dynamic one, sliding window only)."""
    a = SparseAttention.normalize(**attrs)
    if a["pattern"] not in STATIC_PATTERNS:
        raise ValueError(f"the table-free SparseAttention kernel takes {' and '.join(STATIC_PATTERNS)}, "
                         f"not {a['pattern']}")
    if n is not None:
        a = at_length(a, n, d)
    elif a["pattern"] != "sliding_window":
        raise ValueError(f"SparseAttention {a['pattern']} needs a static sequence length")
    gh, gw = a["grid"] if a["grid"] else (1, 1)
    full = bias_shape is not None and bias_shape[2] != 1
    return dict(SCALE=float(a["scale"] or 1.0 / math.sqrt(d)), W=a["window"] or 1, G=a["num_global"] or 0, GH=gh,
                GW=gw, KS=a["kernel"] or 1, DIL=a["dilation"] or 1, MODE=MODES[a["pattern"]], CAUSAL=bool(a["causal"]),
                HAS_BIAS=bias_shape is not None, BIAS_B=bias_shape is not None and bias_shape[0] != 1,
                BIAS_H=bias_shape is not None and bias_shape[1] != 1, BIAS_FULL=full, BLOCK_M=block, BLOCK_N=block,
                BLOCK_D=pow2(d), BLOCK_DV=pow2(dv))


def sparse_attention_table_free(q, k, v, attn_bias=None, layout=None, block: int = 16, **attrs):
    """Any pattern without a host table (what TensorRT's AOT path runs): the static patterns with
    :data:`sparse_attention_static` (``block``-token tiles), the routed ones with
    :func:`graphprune.kernels.sparse_attention_routed.sparse_attention_routed_table_free`."""
    import torch

    if attrs.get("pattern") in ("block_topk", "block_layout"):
        from graphprune.kernels.sparse_attention_routed import sparse_attention_routed_table_free

        return sparse_attention_routed_table_free(q, k, v, attn_bias, layout, **attrs)

    bsz, heads, n, d = q.shape
    dv = v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bias = attn_bias.contiguous() if attn_bias is not None else q
    out = torch.empty((bsz, heads, n, dv), dtype=q.dtype, device=q.device)
    const = static_constexprs(attrs, n, d, dv, None if attn_bias is None else tuple(attn_bias.shape), block)
    sparse_attention_static[(-(-n // block), bsz * heads)](q, k, v, bias, q, heads, n, d, dv, out, **const)
    return out


def visited_fraction(attrs: dict, n: int, block: int = 16) -> float:
    """Share of the KV tiles a static pattern's tile table reads (1.0 = dense); for tests and docs."""
    a = at_length(SparseAttention.normalize(**attrs), n, 16)
    table = _static_table(a, n, block, block)
    return float((table >= 0).sum()) / (table.shape[2] * math.ceil(n / block))
