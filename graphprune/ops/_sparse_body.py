"""Standard-op bodies of ``ai.graphprune.SparseAttention`` (see ``_sparse_plan`` for the geometry).

Gathered body (sliding_window, neighborhood_2d), per (batch, head)::

    Qb = Reshape(Pad(Q·scale)) or Gather(Q·scale, q_idx)       [nb, bq, D]
    Kb, Vb = Gather(K, kv_idx), Gather(V, kv_idx)               [nb, L, D]
    O = Softmax(Qb·Kbᵀ + sbias + Gather(bias)) · Vb             [nb, bq, Dv] → Slice / Gather back to [N, Dv]
    global rows: Softmax(Q[:g]·Kᵀ + bias) · V, Concat in front.

Routed body (block_topk, block_layout)::

    Qb, Kb = Reshape(Pad(Q·scale)), Reshape(Pad(K))           [nb, b, D]
    idx = TopK(mean(Qb)·mean(Kb)ᵀ·scale + blockmax(bias) + force) | TopK(layout)   [nb, k]
    Kg, Vg = Gather(K as [B·H·nb, b, D], idx + (b·H + h)·nb)   [nb, k·b, D]
    O = Softmax(Qb·Kgᵀ + key bias of the chosen blocks) · Vg

Masking is an ``Add`` of a float bias (0 / -inf), never a ``Where`` on the score tensor (a broadcast bool
``Where`` runs single-threaded in ORT). The user's bias is clamped to >= -1e30 first, so a query whose allowed
keys are all masked averages V over them instead of producing NaN; see the op module for the rule.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import INT64_MAX, Body
from graphprune.ops._sparse_plan import GatheredPlan, RoutedPlan

BIAS_FLOOR = np.float32(-1e30)
FORCE = np.float32(np.inf)  # added to forced routing scores (biases are floored, so never inf - inf)
#: a causal block_topk's forced first block: above any real score, below the diagonal's +inf (which TopK then always
#: puts in slot 0, where the body masks it by a triangle)
CAUSAL_FIRST = np.float32(1e30)


def bias_floor(dtype: ir.DataType) -> float:
    """The user bias is clamped to this: -1e30 (absorbs any score in float32/bfloat16), float16's lowest finite."""
    return -65504.0 if dtype == ir.DataType.FLOAT16 else float(BIAS_FLOOR)


class SparseBody(Body):
    """A body tape whose float constants are in the data type of the body (that of ``like``, the Q input)."""

    def __init__(self, like: ir.Value, dtype: ir.DataType) -> None:
        super().__init__(dtype)
        self.like = like
        self.floor = bias_floor(dtype)

    def const(self, array, dtype=None) -> ir.Value:
        arr = np.asarray(array, dtype=dtype)
        if np.issubdtype(arr.dtype, np.floating):
            return self.lit(arr, self.like)
        return super().const(arr)

    def pad_tokens(self, x: ir.Value, pad: int, axis_from_end: int = 2, value: float | None = None) -> ir.Value:
        """Pad ``pad`` entries at the end of axis ``-axis_from_end`` of a rank-4 tensor."""
        if pad == 0:
            return x
        pads = [0] * 8
        pads[4 + 4 - axis_from_end] = pad
        inputs = [x, self.ints(*pads)]
        if value is not None:
            inputs.append(self.const(np.float32(value)))
        return self.op("Pad", inputs)

    def lead_shape(self, x: ir.Value, *tail: int) -> ir.Value:
        """``Concat(Shape(x)[0:2], tail)``: a target shape that keeps x's (batch, heads) dims."""
        return self.op("Concat", [self.op("Shape", [x], {"start": 0, "end": 2}), self.ints(*tail)], {"axis": 0})

    def tail_shape(self, x: ir.Value, *head: int) -> ir.Value:
        """``Concat(head, Shape(x)[3:])``: a target shape ending in x's last (head-size) dim."""
        return self.op("Concat", [self.ints(*head), self.op("Shape", [x], {"start": 3})], {"axis": 0})

    def t_last(self, x: ir.Value, rank: int) -> ir.Value:
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return self.op("Transpose", [x], {"perm": perm})


def _floor(body: SparseBody, bias: ir.Value) -> ir.Value:
    return body.op("Max", [bias, body.const(np.float32(body.floor))])


def gathered_body(body: SparseBody, plan: GatheredPlan, scale: float, bias_kind: str, inputs: list[ir.Value]) -> ir.Value:
    """Record the gathered pattern on ``body``; returns the output."""
    q, k, v = inputs[:3]
    bias = inputs[3] if bias_kind != "none" else None
    n, g, nb, bq = plan.seq_len, plan.num_global, plan.nb, plan.bq
    nr = n - g
    # Reshape to the static length first: at another length this or the Q·Kᵀ MatMul fails instead of running wrong.
    q = body.op("Reshape", [q, body.ints(0, 0, n, -1)])
    qs = body.op("Mul", [q, body.const(np.float32(scale))])
    qr = body.slice(qs, g, n, 2) if g else qs
    if plan.q_contiguous:
        qb = body.op("Reshape", [body.pad_tokens(qr, nb * bq - nr), body.ints(0, 0, nb, bq, -1)])
    else:
        qb = body.op("Gather", [qr, body.const(plan.q_idx)], {"axis": 2})
    fb = _floor(body, bias) if bias is not None else None
    outs = []
    for start, end, shared in plan.runs:
        qrun = qb if len(plan.runs) == 1 else body.slice(qb, start, end, 2)
        outs.append(_gathered_run(body, plan, start, end, shared, qrun, k, v, fb, bias_kind))
    ob = outs[0] if len(outs) == 1 else body.op("Concat", outs, {"axis": 2})
    of = body.op("Reshape", [ob, body.ints(0, 0, nb * bq, -1)])
    if plan.q_contiguous:
        out = body.slice(of, 0, nr, 2) if nb * bq != nr else of
    else:
        out = body.op("Gather", [of, body.const(plan.out_idx)], {"axis": 2})
    if g:
        out = body.op("Concat", [_global_rows(body, qs, k, v, fb, bias_kind, g, n, plan.causal), out], {"axis": 2})
    return out


def _global_rows(body: SparseBody, qs: ir.Value, k: ir.Value, v: ir.Value, fb: ir.Value | None, bias_kind: str, g: int,
                 n: int | ir.Value, causal: bool) -> ir.Value:
    """Dense attention of the first ``g`` (global) queries: [B, H, g, Dv]; ``n`` a 1-element value at a dynamic N."""
    sg = body.op("MatMul", [body.slice(qs, 0, g, 2), body.t_last(k, 4)])
    if causal and isinstance(n, int):
        pos = np.arange(n)
        cb = np.where(pos[None, :] <= np.arange(g)[:, None], np.float32(0), np.float32(-np.inf))
        sg = body.op("Add", [sg, body.const(cb.astype(np.float32))])
    elif causal:
        pos = body.op("Range", [body.const(np.int64(0)), body.op("Squeeze", [n]), body.const(np.int64(1))])
        later = body.op("Greater", [pos, body.const(np.arange(g, dtype=np.int64)[:, None])])  # [g, N]
        sg = body.op("Add", [sg, body.op("Where", [later, body.const(np.float32(-np.inf)),
                                                   body.const(np.float32(0))])])
    if fb is not None:
        sg = body.op("Add", [sg, fb if bias_kind == "key" else body.slice(fb, 0, g, 2)])
    return body.op("MatMul", [body.op("Softmax", [sg], {"axis": -1}), v])


def _gathered_run(body: SparseBody, plan: GatheredPlan, start: int, end: int, shared: bool, qb: ir.Value, k: ir.Value,
                  v: ir.Value, fb: ir.Value | None, bias_kind: str) -> ir.Value:
    """Attention of query blocks ``start:end``: [B, H, end - start, bq, Dv]."""
    n, g, nr_blocks, L = plan.seq_len, plan.num_global, end - start, plan.kv_len
    kv = plan.kv_idx[start:end]
    kv_idx = body.const(kv)
    kb = body.op("Gather", [k, kv_idx], {"axis": 2})
    vb = body.op("Gather", [v, kv_idx], {"axis": 2})
    scores = body.op("MatMul", [qb, body.t_last(kb, 5)])
    sb = body.const(plan.shared_bias[None] if shared else plan.sbias[start:end])
    if bias_kind == "key":  # [Bb, Hb, 1, N] → gather the blocks' keys → [Bb, Hb, blocks, 1, L]
        ub = body.op("Gather", [fb, kv_idx], {"axis": 3})
        ub = body.op("Reshape", [ub, body.lead_shape(fb, nr_blocks, 1, L)])
        sb = body.op("Add", [ub, sb])
    elif bias_kind == "full":  # [Bb, Hb, N, N] → flat gather of (query, key) pairs → [Bb, Hb, blocks, bq, L]
        q_abs = np.minimum(plan.q_idx[start:end] + g, n - 1)
        flat = q_abs[:, :, None] * n + kv[:, None, :]
        fl = body.op("Reshape", [fb, body.lead_shape(fb, n * n)])
        sb = body.op("Add", [body.op("Gather", [fl, body.const(flat)], {"axis": 2}), sb])
    probs = body.op("Softmax", [body.op("Add", [scores, sb])], {"axis": -1})
    return body.op("MatMul", [probs, vb])


def _causal_scores(body: SparseBody, scores: ir.Value, idx: ir.Value, blocks: ir.Value, b: int, kk) -> ir.Value:
    """A causal block_topk's scores [B, H, nb, b, k*b]: slot 0 is the diagonal block (its routing score is the only
    +inf), masked by a triangle; a later slot's block after the query block is masked whole. Small additive
    biases, no N × N tensor."""
    tri = np.where(np.arange(b)[None, :] <= np.arange(b)[:, None], np.float32(0), np.float32(-np.inf))
    diag = body.op("Add", [body.slice(scores, 0, b, 4), body.const(tri)])
    width = body.value(kk * b) if isinstance(kk, int) else body.op("Mul", [kk, body.ints(b)])
    rest = body.op("Slice", [scores, body.ints(b), width, body.ints(4)])
    later = body.op("Greater", [body.slice(idx, 1, 2**62, 3), body.op("Unsqueeze", [blocks, body.ints(1)])])
    mask = body.op("Where", [later, body.const(np.float32(-np.inf)), body.const(np.float32(0))])  # [B, H, nb, k-1]
    mask = body.op("Expand", [body.op("Unsqueeze", [mask, body.ints(4)]),
                              body.op("Concat", [body.op("Shape", [mask]), body.ints(b)], {"axis": 0})])
    mask = body.op("Reshape", [mask, body.ints(0, 0, 0, 1, -1)])  # [B, H, nb, 1, (k-1)*b]
    return body.op("Concat", [diag, body.op("Add", [rest, mask])], {"axis": -1})


def routed_body(body: SparseBody, plan: RoutedPlan, scale: float, bias_kind: str, force: np.ndarray | None, layout: bool,
                inputs: list[ir.Value], causal: bool = False) -> ir.Value:
    """Record block_topk (``layout`` False) or block_layout (``layout`` True) on ``body``; returns the output."""
    q, k, v = inputs[:3]
    bias = inputs[3] if bias_kind != "none" else None
    n, b, nb, kk = plan.seq_len, plan.block, plan.nb, plan.topk
    q = body.op("Reshape", [q, body.ints(0, 0, n, -1)])
    qs = body.op("Mul", [q, body.const(np.float32(scale))])
    qb = body.op("Reshape", [body.pad_tokens(qs, plan.pad), body.ints(0, 0, nb, b, -1)])
    kp = body.pad_tokens(k, plan.pad)
    vp = body.pad_tokens(v, plan.pad)
    if layout:
        lay = body.op("CastLike", [inputs[4], q])
        _, idx = body.op_multi_out("TopK", [body.rank(lay), body.ints(kk)], {"axis": -1}, num_outputs=2)
        chosen = body.op("GatherElements", [lay, idx], {"axis": -1})  # [Hl, nb, k] 1 = real block
        sel_bias = body.op("Where", [body.op("Greater", [chosen, body.const(np.float32(0.5))]),
                                     body.const(np.float32(0)), body.const(np.float32(-np.inf))])
        sel_bias = body.op("Unsqueeze", [sel_bias, body.ints(-1)])  # [Hl, nb, k, 1]
    else:
        inv = body.const((1.0 / plan.valid_counts()).reshape(nb, 1))
        qpool = body.op("Mul", [body.op("ReduceSum", [qb, body.ints(3)], {"keepdims": 0}), inv])
        kb = body.op("Reshape", [kp, body.ints(0, 0, nb, b, -1)])
        kpool = body.op("Mul", [body.op("ReduceSum", [kb, body.ints(3)], {"keepdims": 0}), inv])
        route = body.op("MatMul", [qpool, body.t_last(kpool, 4)])  # [B, H, nb, nb]
        if bias is not None:  # a key block's routing score gets its largest bias: fully masked blocks rank last
            route = body.op("Add", [route, _block_bias_max(body, plan, bias, bias_kind)])
        if force is not None:
            route = body.op("Add", [route, body.const(force)])
        _, idx = body.op_multi_out("TopK", [body.rank(route), body.ints(kk)], {"axis": -1}, num_outputs=2)
        sel_bias = None
    # Flat block index into [B*H*nb, b, D]: idx + (batch*H + head) * nb.
    bh = body.op("ReduceProd", [body.op("Shape", [q], {"start": 0, "end": 2})], {"keepdims": 0})
    step = body.const(np.int64(nb))
    offs = body.op("Range", [body.const(np.int64(0)), body.op("Mul", [bh, step]), step])
    offs = body.op("Reshape", [offs, body.lead_shape(q, 1, 1)])
    fidx = body.op("Add", [idx, offs])  # [B, H, nb, k]
    kf = body.op("Reshape", [kp, body.tail_shape(k, -1, b)])
    vf = body.op("Reshape", [vp, body.tail_shape(v, -1, b)])
    kg = body.op("Reshape", [body.op("Gather", [kf, fidx], {"axis": 0}), body.ints(0, 0, 0, kk * b, -1)])
    vg = body.op("Reshape", [body.op("Gather", [vf, fidx], {"axis": 0}), body.ints(0, 0, 0, kk * b, -1)])
    scores = body.op("MatMul", [qb, body.t_last(kg, 5)])  # [B, H, nb, b, k*b]
    if bias_kind == "key":
        scores = body.op("Add", [scores, _routed_key_bias(body, plan, bias, q, fidx)])
    elif bias_kind == "full":
        scores = body.op("Add", [scores, _routed_full_bias(body, plan, bias, q, idx)])
    # Padding keys of the last block (when no user bias carried them) and unused layout picks: [Hl|B, H?, nb, k, b].
    extra = None
    if plan.pad and bias_kind == "none":
        extra = body.op("Gather", [body.const(plan.key_pad_bias()), idx], {"axis": 0})
    if sel_bias is not None:
        extra = sel_bias if extra is None else body.op("Add", [extra, sel_bias])
    if extra is not None:
        if layout:  # [Hl, nb, k, b|1] → [Hl, nb, 1, k*b], broadcast over batch and query rows
            extra = body.op("Expand", [extra, body.ints(1, nb, kk, b)])
            extra = body.op("Reshape", [extra, body.ints(0, nb, 1, kk * b)])
        else:  # [B, H, nb, k, b] → [B, H, nb, 1, k*b]
            extra = body.op("Reshape", [extra, body.ints(0, 0, 0, 1, kk * b)])
        scores = body.op("Add", [scores, extra])
    if causal:
        scores = _causal_scores(body, scores, idx, body.const(np.arange(nb, dtype=np.int64)), b, kk)
    probs = body.op("Softmax", [scores], {"axis": -1})
    ob = body.op("MatMul", [probs, vg])  # [B, H, nb, b, Dv]
    out = body.op("Reshape", [ob, body.ints(0, 0, nb * b, -1)])
    g = plan.num_global
    if plan.pad or g:
        out = body.slice(out, g, n, 2)
    if g:
        fb = _floor(body, bias) if bias is not None else None
        out = body.op("Concat", [_global_rows(body, qs, k, v, fb, bias_kind, g, n, causal), out], {"axis": 2})
    return out


def _routed_key_bias(body: SparseBody, plan: RoutedPlan, bias: ir.Value, q: ir.Value, fidx: ir.Value) -> ir.Value:
    """Key bias [Bb, Hb, 1, N] → the chosen blocks' keys [B, H, nb, 1, k*b] (padding keys -inf)."""
    nb, b, kk = plan.nb, plan.block, plan.topk
    fb = body.pad_tokens(_floor(body, bias), plan.pad, axis_from_end=1, value=0.0)
    fb = body.op("Add", [body.op("Reshape", [fb, body.lead_shape(fb, nb, b)]), body.const(plan.key_pad_bias())])
    full = body.op("Expand", [fb, body.lead_shape(q, nb, b)])
    kb = body.op("Gather", [body.op("Reshape", [full, body.ints(-1, b)]), fidx], {"axis": 0})
    return body.op("Reshape", [kb, body.ints(0, 0, 0, 1, kk * b)])


def _routed_full_bias(body: SparseBody, plan: RoutedPlan, bias: ir.Value, q: ir.Value, idx: ir.Value) -> ir.Value:
    """Full bias [Bb, Hb, N, N] → the (query block, chosen key block) tiles [B, H, nb, b, k*b].

    Costs a copy of the bias expanded to [B, H, N, N]: a full bias is already that size.
    """
    nb, b, kk = plan.nb, plan.block, plan.topk
    fb = _floor(body, bias)
    if plan.pad:
        pads = [0, 0, 0, 0, 0, 0, plan.pad, plan.pad]
        fb = body.op("Pad", [fb, body.ints(*pads)])
        fb = body.op("Add", [fb, body.const(plan.key_pad_bias().reshape(1, -1))])
    tiles = body.op("Reshape", [fb, body.lead_shape(fb, nb, b, nb, b)])
    tiles = body.op("Transpose", [tiles], {"perm": [0, 1, 2, 4, 3, 5]})  # [Bb, Hb, nb(q), nb(k), b, b]
    tiles = body.op("Expand", [tiles, body.lead_shape(q, nb, nb, b, b)])
    tiles = body.op("Reshape", [tiles, body.ints(-1, b, b)])
    bh = body.op("ReduceProd", [body.op("Shape", [q], {"start": 0, "end": 2})], {"keepdims": 0})
    step = body.const(np.int64(nb * nb))
    offs = body.op("Range", [body.const(np.int64(0)), body.op("Mul", [bh, step]), step])
    offs = body.op("Reshape", [offs, body.lead_shape(q, 1, 1)])
    row = body.const((np.arange(nb, dtype=np.int64) * nb).reshape(nb, 1))
    fidx = body.op("Add", [body.op("Add", [idx, offs]), row])  # [B, H, nb, k]
    picked = body.op("Gather", [tiles, fidx], {"axis": 0})  # [B, H, nb, k, b, b]
    picked = body.op("Transpose", [picked], {"perm": [0, 1, 2, 4, 3, 5]})
    return body.op("Reshape", [picked, body.ints(0, 0, 0, 0, kk * b)])


def _block_bias_max(body: SparseBody, plan: RoutedPlan, bias: ir.Value, bias_kind: str) -> ir.Value:
    """Largest (floored) bias per key block: [Bb, Hb, 1, nb] (key bias) or per tile [Bb, Hb, nb, nb] (full)."""
    nb, b = plan.nb, plan.block
    fb = _floor(body, bias)
    if bias_kind == "key":
        fb = body.pad_tokens(fb, plan.pad, axis_from_end=1, value=body.floor)
        tiles = body.op("Reshape", [fb, body.lead_shape(fb, 1, nb, b)])
        return body.op("ReduceMax", [tiles, body.ints(-1)], {"keepdims": 0})
    if plan.pad:
        fb = body.op("Pad", [fb, body.ints(0, 0, 0, 0, 0, 0, plan.pad, plan.pad), body.const(np.float32(body.floor))])
    tiles = body.op("Reshape", [fb, body.lead_shape(fb, nb, b, nb, b)])
    return body.op("ReduceMax", [tiles, body.ints(3, 5)], {"keepdims": 0})


# ---------------------------------------------------------------- sliding_window at a runtime N


def dynamic_window_body(body: SparseBody, window: int, causal: bool, num_global: int, block: int, scale: float,
                        bias_kind: str, inputs: list[ir.Value]) -> ir.Value:
    """``sliding_window`` for any N, read at run time (the static body's index tables, computed in the graph).

    Query blocks of ``block`` consecutive non-global tokens; block ``t`` reads the global keys and ``S`` keys from
    ``start_t`` (``S = min(N, roundup16(block + window - 1))``, enough for every window of the block); a
    per-block additive bias [nb, block, g + S] (0 / -inf) built from the positions keeps each query to its own
    window. Global queries attend densely (causal: to earlier keys).
    """
    q, k, v = inputs[:3]
    bias = inputs[3] if bias_kind != "none" else None
    g, w, bq = num_global, window, block
    span = -(-(bq + w - 1) // 16) * 16
    n = body.op("Shape", [q], {"start": 2, "end": 3})  # [1]
    nr = body.op("Sub", [n, body.ints(g)])
    nb = body.op("Div", [body.op("Add", [nr, body.ints(bq - 1)]), body.ints(bq)])
    s_len = body.op("Min", [n, body.ints(span)])
    zero, one = body.const(np.int64(0)), body.const(np.int64(1))
    t = body.op("Range", [zero, body.op("Squeeze", [nb]), one])  # [nb]
    # first query of each block and its window start; the key range [start, start + S) covers the block
    q0 = body.op("Add", [body.op("Mul", [t, body.ints(bq)]), body.ints(g)])
    lo0 = _window_lo(body, q0, n, w, causal)
    start = body.op("Max", [body.op("Min", [lo0, body.op("Sub", [n, s_len])]), body.ints(0)])
    cols = body.op("Range", [zero, body.op("Squeeze", [s_len]), one])  # [S]
    win = body.op("Add", [body.op("Unsqueeze", [start, body.ints(1)]), body.op("Unsqueeze", [cols, body.ints(0)])])
    if g:
        glob = body.op("Expand", [body.const(np.arange(g, dtype=np.int64)[None, :]),
                                  body.op("Concat", [nb, body.ints(g)], {"axis": 0})])
        kv_idx = body.op("Concat", [glob, win], {"axis": 1})  # [nb, L]
    else:
        kv_idx = win
    # queries: [nb, bq] relative positions, their absolute (pad rows clamped) and validity
    q_rel = body.op("Add", [body.op("Unsqueeze", [body.op("Mul", [t, body.ints(bq)]), body.ints(1)]),
                            body.const(np.arange(bq, dtype=np.int64)[None, :])])
    q_valid = body.op("Less", [q_rel, nr])
    q_abs = body.op("Add", [body.op("Min", [q_rel, body.op("Sub", [nr, body.ints(1)])]), body.ints(g)])
    qa = body.op("Unsqueeze", [q_abs, body.ints(2)])  # [nb, bq, 1]
    key = body.op("Unsqueeze", [kv_idx, body.ints(1)])  # [nb, 1, L]
    lo = _window_lo(body, qa, n, w, causal)
    hi = body.op("Add", [qa, body.ints(1)]) if causal else body.op("Add", [lo, body.op("Min", [n, body.ints(w)])])
    inside = body.op("And", [body.op("GreaterOrEqual", [key, lo]), body.op("Less", [key, hi])])
    if g:  # window columns holding a global key are masked (the key has its global column)
        ncol = body.op("Shape", [kv_idx], {"start": 1, "end": 2})
        is_glob_col = body.op("Less", [body.op("Range", [zero, body.op("Squeeze", [ncol]), one]), body.ints(g)])
        window_ok = body.op("And", [inside, body.op("GreaterOrEqual", [key, body.ints(g)])])
        glob_ok = body.op("LessOrEqual", [key, qa]) if causal else body.op("GreaterOrEqual", [key, body.ints(0)])
        allowed = body.op("Or", [body.op("And", [is_glob_col, glob_ok]),
                                 body.op("And", [body.op("Not", [is_glob_col]), window_ok])])
    else:
        allowed = inside
    allowed = body.op("Or", [allowed, body.op("Unsqueeze", [body.op("Not", [q_valid]), body.ints(2)])])
    sbias = body.op("Where", [allowed, body.const(np.float32(0)), body.const(np.float32(-np.inf))])  # [nb, bq, L]

    qs = body.op("Mul", [q, body.const(np.float32(scale))])
    qr = body.op("Slice", [qs, body.ints(g), body.ints(INT64_MAX), body.ints(2)]) if g else qs
    pad = body.op("Sub", [body.op("Mul", [nb, body.ints(bq)]), nr])
    pads = body.op("Concat", [body.ints(0, 0, 0, 0, 0, 0), pad, body.ints(0)], {"axis": 0})
    qp = body.op("Pad", [qr, pads])
    shape5 = body.op("Concat", [body.op("Shape", [q], {"start": 0, "end": 2}), body.ints(-1, bq),
                                body.op("Shape", [q], {"start": 3})], {"axis": 0})
    qb = body.op("Reshape", [qp, shape5])  # [B, H, nb, bq, D]
    kb = body.op("Gather", [k, kv_idx], {"axis": 2})  # [B, H, nb, L, D]
    vb = body.op("Gather", [v, kv_idx], {"axis": 2})
    scores = body.op("Add", [body.op("MatMul", [qb, body.t_last(kb, 5)]), sbias])
    fb = _floor(body, bias) if bias is not None else None
    if bias_kind == "key":  # [Bb, Hb, 1, N] → [Bb, Hb, 1, nb, L] → [Bb, Hb, nb, 1, L]
        ub = body.op("Gather", [fb, kv_idx], {"axis": 3})
        scores = body.op("Add", [scores, body.op("Transpose", [ub], {"perm": [0, 1, 3, 2, 4]})])
    elif bias_kind == "full":  # flat (query, key) pairs of [Bb, Hb, N, N]
        flat = body.op("Add", [body.op("Mul", [qa, n]), key])  # [nb, bq, L]
        fl = body.op("Reshape", [fb, body.lead_shape(fb, -1)])
        scores = body.op("Add", [scores, body.op("Gather", [fl, flat], {"axis": 2})])
    ob = body.op("MatMul", [body.op("Softmax", [scores], {"axis": -1}), vb])  # [B, H, nb, bq, Dv]
    shape4 = body.op("Concat", [body.op("Shape", [q], {"start": 0, "end": 2}), body.ints(-1),
                                body.op("Shape", [v], {"start": 3})], {"axis": 0})
    out = body.op("Slice", [body.op("Reshape", [ob, shape4]), body.ints(0), nr, body.ints(2)])
    if g:
        sg = body.op("MatMul", [body.op("Slice", [qs, body.ints(0), body.ints(g), body.ints(2)]), body.t_last(k, 4)])
        if causal:
            keys = body.op("Range", [zero, body.op("Squeeze", [n]), one])
            ok = body.op("LessOrEqual", [body.op("Unsqueeze", [keys, body.ints(0)]),
                                         body.const(np.arange(g, dtype=np.int64)[:, None])])
            sg = body.op("Add", [sg, body.op("Where", [ok, body.const(np.float32(0)),
                                                       body.const(np.float32(-np.inf))])])
        if fb is not None:
            sg = body.op("Add", [sg, fb if bias_kind == "key" else
                                 body.op("Slice", [fb, body.ints(0), body.ints(g), body.ints(2)])])
        rows = body.op("MatMul", [body.op("Softmax", [sg], {"axis": -1}), v])
        out = body.op("Concat", [rows, out], {"axis": 2})
    return out


def _window_lo(body: SparseBody, pos: ir.Value, n: ir.Value, w: int, causal: bool) -> ir.Value:
    """First key of the window of query ``pos``: causal ``max(pos - w + 1, 0)``, else NATTEN-clamped."""
    if causal:
        return body.op("Max", [body.op("Sub", [pos, body.ints(w - 1)]), body.ints(0)])
    hi = body.op("Max", [body.op("Sub", [n, body.ints(w)]), body.ints(0)])
    return body.op("Min", [body.op("Max", [body.op("Sub", [pos, body.ints(w // 2)]), body.ints(0)]), hi])


# ---------------------------------------------------------------- block_topk at a runtime N


def dynamic_topk_body(body: SparseBody, block: int, topk: int, keep_first: bool, keep_diagonal: bool,
                      num_global: int, scale: float, bias_kind: str, inputs: list[ir.Value],
                      causal: bool = False) -> ir.Value:
    """``block_topk`` for any N read at run time: the routed body with its block counts, padding, pooling
    weights, forced blocks and padding-key bias computed in the graph (``nb = ceil(N / block)``)."""
    q, k, v = inputs[:3]
    bias = inputs[3] if bias_kind != "none" else None
    b, g = block, num_global
    zero, one = body.const(np.int64(0)), body.const(np.int64(1))
    n = body.op("Shape", [q], {"start": 2, "end": 3})
    nb = body.op("Div", [body.op("Add", [n, body.ints(b - 1)]), body.ints(b)])
    pad = body.op("Sub", [body.op("Mul", [nb, body.ints(b)]), n])
    kk = body.op("Min", [nb, body.ints(topk)])
    blocks = body.op("Range", [zero, body.op("Squeeze", [nb]), one])  # [nb]

    def pad_axis(x, axis_from_end: int, value: float | None = None):
        parts = [body.ints(0, 0, 0, 0, 0, 0), pad, body.ints(0)] if axis_from_end == 2 else \
            [body.ints(0, 0, 0, 0, 0, 0, 0), pad]
        inputs_ = [x, body.op("Concat", parts, {"axis": 0})]
        if value is not None:
            inputs_.append(body.const(np.float32(value)))
        return body.op("Pad", inputs_)

    def blocked(x):  # [B, H, nb*b, D] → [B, H, nb, b, D]
        shape = body.op("Concat", [body.ints(0, 0, -1, b), body.op("Shape", [x], {"start": 3})], {"axis": 0})
        return body.op("Reshape", [x, shape])

    qs = body.op("Mul", [q, body.const(np.float32(scale))])
    qb = blocked(pad_axis(qs, 2))
    kp, vp = pad_axis(k, 2), pad_axis(v, 2)
    # routing: block means over the real tokens
    counts = body.op("Min", [body.op("Sub", [n, body.op("Mul", [blocks, body.ints(b)])]), body.ints(b)])
    inv = body.op("Reciprocal", [body.op("CastLike", [body.op("Unsqueeze", [counts, body.ints(1)]), q])])
    qpool = body.op("Mul", [body.op("ReduceSum", [qb, body.ints(3)], {"keepdims": 0}), inv])
    kpool = body.op("Mul", [body.op("ReduceSum", [blocked(kp), body.ints(3)], {"keepdims": 0}), inv])
    route = body.op("MatMul", [qpool, body.t_last(kpool, 4)])  # [B, H, nb, nb]
    # 0 / -inf per padded key position, [nb, b]
    pos = body.op("Reshape", [body.op("Range", [zero, body.op("Squeeze", [body.op("Mul", [nb, body.ints(b)])]), one]),
                              body.op("Concat", [nb, body.ints(b)], {"axis": 0})])
    key_pad = body.op("Where", [body.op("Less", [pos, n]), body.const(np.float32(0)), body.const(np.float32(-np.inf))])
    fb = _floor(body, bias) if bias is not None else None
    if fb is not None:  # a key block's routing score gets its largest bias: fully masked blocks rank last
        floor = body.floor
        if bias_kind == "key":
            tiles = body.op("Reshape", [pad_axis(fb, 1, floor), body.lead_shape(fb, 1, -1, b)])
            route = body.op("Add", [route, body.op("ReduceMax", [tiles, body.ints(-1)], {"keepdims": 0})])
        else:
            full = pad_axis(pad_axis(fb, 1, floor), 2, floor)
            shape = body.op("Concat", [body.op("Shape", [fb], {"start": 0, "end": 2}), nb, body.ints(b), nb,
                                       body.ints(b)], {"axis": 0})
            tiles = body.op("Reshape", [full, shape])
            route = body.op("Add", [route, body.op("ReduceMax", [tiles, body.ints(3, 5)], {"keepdims": 0})])
    rows, cols = body.op("Unsqueeze", [blocks, body.ints(1)]), body.op("Unsqueeze", [blocks, body.ints(0)])
    if causal:  # later key blocks rank last; the diagonal (+inf) above the first block (1e30): slot 0
        zero_f = body.const(np.float32(0))
        route = body.op("Add", [route, body.op("Where", [body.op("Greater", [cols, rows]),
                                                         body.const(np.float32(-np.inf)), zero_f])])
        if keep_first:
            first = body.op("Equal", [cols, body.op("Mul", [rows, body.ints(0)])])
            route = body.op("Add", [route, body.op("Where", [first, body.const(CAUSAL_FIRST), zero_f])])
        route = body.op("Add", [route, body.op("Where", [body.op("Equal", [rows, cols]), body.const(FORCE),
                                                         zero_f])])
    elif keep_first or keep_diagonal:
        forced = None
        if keep_first:
            forced = body.op("Equal", [cols, body.op("Mul", [rows, body.ints(0)])])  # column 0, [nb, nb]
        if keep_diagonal:
            diag = body.op("Equal", [rows, cols])
            forced = diag if forced is None else body.op("Or", [forced, diag])
        route = body.op("Add", [route, body.op("Where", [forced, body.const(FORCE), body.const(np.float32(0))])])
    _, idx = body.op_multi_out("TopK", [body.rank(route), kk], {"axis": -1}, num_outputs=2)  # [B, H, nb, k]
    # flat block index into [B*H*nb, b, D]: idx + (batch*H + head) * nb
    bh = body.op("ReduceProd", [body.op("Shape", [q], {"start": 0, "end": 2})], {"keepdims": 0})
    step = body.op("Squeeze", [nb])
    offs = body.op("Reshape", [body.op("Range", [zero, body.op("Mul", [bh, step]), step]), body.lead_shape(q, 1, 1)])
    fidx = body.op("Add", [idx, offs])

    def gather_blocks(x, x_pad):  # [B, H, nb, k*b, D]
        flat = body.op("Reshape", [x_pad, body.tail_shape(x, -1, b)])
        shape = body.op("Concat", [body.ints(0, 0, 0, -1), body.op("Shape", [x], {"start": 3})], {"axis": 0})
        return body.op("Reshape", [body.op("Gather", [flat, fidx], {"axis": 0}), shape])

    kg, vg = gather_blocks(k, kp), gather_blocks(v, vp)
    scores = body.op("MatMul", [qb, body.t_last(kg, 5)])  # [B, H, nb, b, k*b]
    if bias_kind == "key":  # the chosen blocks' keys, padding keys -inf
        kb = body.op("Add", [body.op("Reshape", [pad_axis(fb, 1, 0.0), body.lead_shape(fb, -1, b)]), key_pad])
        kb = body.op("Expand", [kb, body.op("Concat", [body.op("Shape", [q], {"start": 0, "end": 2}), nb,
                                                        body.ints(b)], {"axis": 0})])
        kb = body.op("Gather", [body.op("Reshape", [kb, body.ints(-1, b)]), fidx], {"axis": 0})
        scores = body.op("Add", [scores, body.op("Reshape", [kb, body.ints(0, 0, 0, 1, -1)])])
    elif bias_kind == "full":  # the (query block, chosen key block) tiles
        full = pad_axis(pad_axis(fb, 1, 0.0), 2, 0.0)
        full = body.op("Add", [full, body.op("Reshape", [key_pad, body.ints(1, -1)])])
        shape = body.op("Concat", [body.op("Shape", [fb], {"start": 0, "end": 2}), nb, body.ints(b), nb,
                                   body.ints(b)], {"axis": 0})
        tiles = body.op("Transpose", [body.op("Reshape", [full, shape])], {"perm": [0, 1, 2, 4, 3, 5]})
        tiles = body.op("Expand", [tiles, body.op("Concat", [body.op("Shape", [q], {"start": 0, "end": 2}), nb, nb,
                                                             body.ints(b, b)], {"axis": 0})])
        tiles = body.op("Reshape", [tiles, body.ints(-1, b, b)])
        step2 = body.op("Mul", [step, step])
        offs2 = body.op("Reshape", [body.op("Range", [zero, body.op("Mul", [bh, step2]), step2]),
                                    body.lead_shape(q, 1, 1)])
        row = body.op("Unsqueeze", [body.op("Mul", [blocks, step]), body.ints(1)])  # [nb, 1]
        picked = body.op("Gather", [tiles, body.op("Add", [body.op("Add", [idx, offs2]), row])], {"axis": 0})
        picked = body.op("Transpose", [picked], {"perm": [0, 1, 2, 4, 3, 5]})  # [B, H, nb, b, k, b]
        scores = body.op("Add", [scores, body.op("Reshape", [picked, body.ints(0, 0, 0, 0, -1)])])
    else:  # padding keys of the last block
        extra = body.op("Gather", [key_pad, idx], {"axis": 0})  # [B, H, nb, k, b]
        scores = body.op("Add", [scores, body.op("Reshape", [extra, body.ints(0, 0, 0, 1, -1)])])
    if causal:
        scores = _causal_scores(body, scores, idx, blocks, b, kk)
    ob = body.op("MatMul", [body.op("Softmax", [scores], {"axis": -1}), vg])  # [B, H, nb, b, Dv]
    shape4 = body.op("Concat", [body.ints(0, 0, -1), body.op("Shape", [v], {"start": 3})], {"axis": 0})
    out = body.op("Slice", [body.op("Reshape", [ob, shape4]), body.ints(g), n, body.ints(2)])
    if g:
        out = body.op("Concat", [_global_rows(body, qs, k, v, fb, bias_kind, g, n, causal), out], {"axis": 2})
    return out
