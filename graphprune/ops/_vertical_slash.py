"""``SparseAttention`` pattern ``vertical_slash``: MInference's dynamic causal pattern, estimated at run time.

Definition (one (batch, head) at a time; ``b = min(block_size, N)``, ``nb = ceil(N / b)``, ``e = min(last_q, N)``,
``g = min(num_global, N)``; query and key blocks are ``i // b``):

1. **Estimate** from the last ``e`` queries: ``A = softmax(scale · Q[N-e:] · Kᵀ)`` over the causal keys (rows
   ``r = N-e .. N-1`` see keys ``<= r``), computed in float32 or wider.
2. **Vertical lines**: a key column's score is its attention mass ``Σ_r A[r, j]``; the first ``g`` (sink) columns
   score +inf. The ``min(vertical, N)`` top columns are kept (ties: lower column first).
3. **Slash lines**: an offset's score is the mass on its diagonal, ``S[o] = Σ_r A[r, r - o]`` (``o >= 0``). A slash
   line at offset ``o = δ·b + t`` crosses key block ``qb - δ`` in ``b - t`` rows of a query block and block
   ``qb - δ - 1`` in ``t`` rows, so a block offset ``δ`` scores ``Σ_t S[δb+t]·(b-t)/b + Σ_t S[(δ-1)b+t]·t/b``;
   ``δ = 0`` (the local, diagonal block) scores +inf. The ``min(slash, nb)`` top block offsets are kept.
4. **Allowed**: query ``i`` sees key ``j <= i`` when ``block(i) - block(j)`` is a kept block offset or ``j`` is a
   kept column. Sink and local tokens are therefore always seen, and every row sees itself (no empty row).

Execution is block-sparse: each query block reads its ``slash`` key blocks (``qb - δ``, gathered per head) and the
``vertical`` kept columns (gathered once per head); a column that a kept block already covers is masked out of
the vertical part so that no key counts twice. Cost per (batch, head): ``e·N`` scores for the estimate plus
``nb·b·(slash·b + vertical)`` for the attention, against ``N²`` dense. Only ``bias: none`` (the pattern is causal
itself; a pass drops a purely causal mask, see ``passes.sparse_attention``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphprune.ops._sparse_body import SparseBody

KEYS = ("block_size", "vertical", "slash", "last_q", "num_global")
DEFAULTS = {"vertical": 128, "slash": 4, "last_q": 64, "num_global": 4}
DEFAULT_BLOCK = 64


def geometry(a: dict, n: int) -> tuple[int, int, int, int, int, int]:
    """``(b, nb, e, g, vk, sk)``: block, blocks, estimating queries, sinks, kept columns and kept block offsets."""
    b = max(1, min(a["block_size"] or DEFAULT_BLOCK, n))
    nb = -(-n // b)
    return b, nb, min(a["last_q"], n), min(a["num_global"], n), min(a["vertical"], n), min(a["slash"], nb)


def scores_per_head(a: dict, n: int) -> int:
    """Score entries (q·k products) per (batch, head): the estimate and the block-sparse attention."""
    b, nb, e, _, vk, sk = geometry(a, n)
    return e * n + nb * b * (sk * b + vk)


def _dev(x):
    return None if isinstance(x, np.ndarray) else getattr(x, "device", None)


def select(xp, a: dict, q, k):
    """``(columns [B, H, vk], offsets [B, H, sk], b)``: the kept key columns and block offsets (float64 estimate).

    ``a`` is resolved at the length (``scale`` set). Kernels use this to route without an [N, N] tensor."""
    bsz, heads, n, _ = q.shape
    dev, f64 = _dev(q), xp.float64
    b, nb, e, g, vk, sk = geometry(a, n)
    rows, cols = np.arange(n - e, n), np.arange(n)
    s = (xp.astype(q[:, :, n - e:, :], f64) @ xp.permute_dims(xp.astype(k, f64), (0, 1, 3, 2))) * a["scale"]
    s = xp.where(xp.asarray(cols[None, :] <= rows[:, None], device=dev), s, xp.asarray(-math.inf, dtype=f64))
    p = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    p = p / xp.sum(p, axis=-1, keepdims=True)
    vscore = xp.where(xp.asarray(cols < g, device=dev), xp.asarray(math.inf, dtype=f64), xp.sum(p, axis=2))
    columns = xp.argsort(vscore, axis=-1, descending=True, stable=True)[..., :vk]
    key = rows[:, None] - cols[None, :]  # the key of offset o (column index) in row r
    idx = xp.asarray(np.broadcast_to(np.maximum(key, 0), (bsz, heads, e, n)).copy(), device=dev)
    on_diag = xp.where(xp.asarray(key >= 0, device=dev), xp.take_along_axis(p, idx, axis=-1),
                       xp.asarray(0.0, dtype=f64))
    per_offset = xp.concat([xp.sum(on_diag, axis=2), xp.zeros((bsz, heads, nb * b - n), dtype=f64, device=dev)],
                           axis=-1)
    blocks = xp.reshape(per_offset, (bsz, heads, nb, b))
    t = np.arange(b, dtype=np.float64)
    here = xp.sum(blocks * xp.asarray((b - t) / b, device=dev), axis=-1)
    spill = xp.sum(blocks * xp.asarray(t / b, device=dev), axis=-1)
    score = here + xp.concat([xp.zeros((bsz, heads, 1), dtype=f64, device=dev), spill[..., :-1]], axis=-1)
    score = xp.where(xp.asarray(np.arange(nb) == 0, device=dev), xp.asarray(math.inf, dtype=f64), score)
    offsets = xp.argsort(score, axis=-1, descending=True, stable=True)[..., :sk]
    return columns, offsets, b


def allowed(xp, a: dict, q, k):
    """[B, H, N, N] bool: the keys each query sees (the definition above, for references)."""
    n = q.shape[2]
    dev = _dev(q)
    columns, offsets, b = select(xp, a, q, k)
    nb = -(-n // b)
    blk = np.arange(n) // b
    delta = blk[:, None] - blk[None, :]
    kept = xp.any(offsets[..., :, None] == xp.arange(nb, device=dev), axis=-2)  # [B, H, nb]
    band = xp.reshape(xp.take(kept, xp.asarray(np.maximum(delta, 0).reshape(-1), device=dev), axis=-1),
                      (*kept.shape[:2], n, n))
    vert = xp.any(columns[..., :, None] == xp.arange(n, device=dev), axis=-2)  # [B, H, N]
    causal = xp.asarray(np.arange(n)[None, :] <= np.arange(n)[:, None], device=dev)
    return xp.logical_and(causal, xp.logical_or(band, vert[:, :, None, :]))


# ---------------------------------------------------------------- the ONNX body (any N, read at run time)


def body(t: SparseBody, a: dict, inputs: list[ir.Value]) -> ir.Value:
    """``vertical_slash`` for any N: the estimate, both selections (TopK) and the block-sparse attention."""
    q, k, v = inputs[:3]
    b = a["block_size"] or DEFAULT_BLOCK
    scale = a["scale"]
    zero, one = t.const(np.int64(0)), t.const(np.int64(1))
    f32 = ir.DataType.FLOAT
    n = t.op("Shape", [q], {"start": 2, "end": 3})
    n0 = t.op("Squeeze", [n])
    nb = t.op("Div", [t.op("Add", [n, t.ints(b - 1)]), t.ints(b)])
    nb0 = t.op("Squeeze", [nb])
    pad = t.op("Sub", [t.op("Mul", [nb, t.ints(b)]), n])
    e = t.op("Min", [n, t.ints(a["last_q"])])
    vk = t.op("Min", [n, t.ints(a["vertical"])])
    sk = t.op("Min", [nb, t.ints(a["slash"])])
    neg_inf = np.float32(-np.inf)

    # 1. the estimate, in float32: A = softmax(scale·Q[N-e:]·Kᵀ + causal) [B, H, e, N]
    start = t.op("Sub", [n, e])
    q_last = t.op("Cast", [t.op("Slice", [q, start, n, t.ints(2)])], {"to": f32})
    kf = t.op("Cast", [k], {"to": f32})
    est = t.op("MatMul", [t.op("Mul", [q_last, t.op("Constant", [], {"value": ir.tensor(np.float32(scale))})]),
                          t.op("Transpose", [kf], {"perm": [0, 1, 3, 2]})])
    rows = t.op("Unsqueeze", [t.op("Range", [t.op("Squeeze", [start]), n0, one]), t.ints(1)])  # [e, 1]
    cols = t.op("Range", [zero, n0, one])  # [N]
    f0 = t.op("Constant", [], {"value": ir.tensor(np.float32(0))})
    finf = t.op("Constant", [], {"value": ir.tensor(neg_inf)})
    est = t.op("Add", [est, t.op("Where", [t.op("LessOrEqual", [cols, rows]), f0, finf])])
    prob = t.op("Softmax", [est], {"axis": -1})

    # 2. vertical lines: column mass, sinks forced
    pinf = t.op("Constant", [], {"value": ir.tensor(np.float32(np.inf))})
    sink = t.op("Where", [t.op("Less", [cols, t.ints(a["num_global"])]), pinf, f0])
    vscore = t.op("Add", [t.op("ReduceSum", [prob, t.ints(2)], {"keepdims": 0}), sink])
    _, columns = t.op_multi_out("TopK", [vscore, vk], {"axis": -1}, num_outputs=2)  # [B, H, vk]

    # 3. slash lines: the mass per offset o (the key r - o of each row r), then per block offset
    key = t.op("Sub", [rows, cols])  # [e, N]
    idx = t.op("Expand", [t.op("Max", [key, zero]), t.op("Shape", [prob])])
    on_diag = t.op("GatherElements", [prob, idx], {"axis": 3})
    on_seq = t.op("Cast", [t.op("GreaterOrEqual", [key, zero])], {"to": f32})  # 0 where r - o < 0
    per_offset = t.op("ReduceSum", [t.op("Mul", [on_diag, on_seq]), t.ints(2)], {"keepdims": 0})  # [B, H, N]
    per_offset = t.op("Pad", [per_offset, t.op("Concat", [t.ints(0, 0, 0, 0, 0), pad], {"axis": 0})])
    blocks = t.op("Reshape", [per_offset, t.ints(0, 0, -1, b)])  # [B, H, nb, b]
    w = np.arange(b, dtype=np.float32)
    weights = np.stack([(b - w) / b, w / b], axis=1).astype(np.float32)  # [b, 2]: here, spill into the next
    parts = t.op("MatMul", [blocks, t.op("Constant", [], {"value": ir.tensor(weights)})])  # [B, H, nb, 2]
    here = t.op("Squeeze", [t.slice(parts, 0, 1, 3), t.ints(3)])
    spill = t.op("Squeeze", [t.slice(parts, 1, 2, 3), t.ints(3)])
    spill = t.op("Slice", [t.op("Pad", [spill, t.ints(0, 0, 1, 0, 0, 0)]), t.ints(0), nb, t.ints(2)])
    bidx = t.op("Range", [zero, nb0, one])  # [nb]
    local = t.op("Where", [t.op("Equal", [bidx, zero]), pinf, f0])
    bscore = t.op("Add", [t.op("Add", [here, spill]), local])
    _, offsets = t.op_multi_out("TopK", [bscore, sk], {"axis": -1}, num_outputs=2)  # [B, H, sk]

    # 4a. the band: query block qb reads key blocks qb - δ (gathered per head)
    def padded(x):
        return t.op("Pad", [x, t.op("Concat", [t.ints(0, 0, 0, 0, 0, 0), pad, t.ints(0)], {"axis": 0})])

    def blocked(x):  # [B, H, nb*b, D] → [B, H, nb, b, D]
        return t.op("Reshape", [x, t.op("Concat", [t.ints(0, 0, -1, b), t.op("Shape", [x], {"start": 3})],
                                        {"axis": 0})])

    qs = t.op("Mul", [q, t.const(np.float32(scale))])
    qb = blocked(padded(qs))
    kblk = t.op("Sub", [t.op("Unsqueeze", [bidx, t.ints(1)]), t.op("Unsqueeze", [offsets, t.ints(2)])])  # [B,H,nb,sk]
    valid = t.op("GreaterOrEqual", [kblk, zero])
    kblk = t.op("Max", [kblk, zero])
    bh = t.op("ReduceProd", [t.op("Shape", [q], {"start": 0, "end": 2})], {"keepdims": 0})
    heads_first = t.op("Reshape", [t.op("Range", [zero, t.op("Mul", [bh, nb0]), nb0]), t.lead_shape(q, 1, 1)])
    fidx = t.op("Add", [kblk, heads_first])

    def gather_blocks(x):  # [B, H, nb, sk*b, D]
        flat = t.op("Reshape", [padded(x), t.tail_shape(x, -1, b)])
        shape = t.op("Concat", [t.ints(0, 0, 0, -1), t.op("Shape", [x], {"start": 3})], {"axis": 0})
        return t.op("Reshape", [t.op("Gather", [flat, fidx], {"axis": 0}), shape])

    band_scores = t.op("MatMul", [qb, t.t_last(gather_blocks(k), 5)])  # [B, H, nb, b, sk*b]
    # masks are small additive biases broadcast onto the scores (a broadcast bool Where runs single-threaded in
    # ORT): a key block before the sequence start is out, and so are the keys after the query in the local block
    fzero, fneg = t.const(np.float32(0)), t.const(neg_inf)
    valid_bias = t.op("Where", [valid, fzero, fneg])  # [B, H, nb, sk]
    valid_bias = t.op("Unsqueeze", [t.op("Expand", [t.op("Unsqueeze", [valid_bias, t.ints(4)]),
                                                    t.op("Concat", [t.op("Shape", [valid]), t.ints(b)], {"axis": 0})]),
                                    t.ints(3)])  # [B, H, nb, 1, sk, b]
    valid_bias = t.op("Reshape", [valid_bias, t.ints(0, 0, 0, 1, -1)])  # [B, H, nb, 1, sk*b]
    tri = np.where(np.arange(b)[None, :] <= np.arange(b)[:, None], np.float32(0), neg_inf)  # [b (query), b (key)]
    is_local = t.op("Unsqueeze", [t.op("Equal", [offsets, zero]), t.ints(2, 4)])  # [B, H, 1, sk, 1]
    tri_bias = t.op("Where", [is_local, t.const(tri[:, None, :]), fzero])  # [B, H, b, sk, b]
    tri_bias = t.op("Reshape", [tri_bias, t.ints(0, 0, 1, b, -1)])  # [B, H, 1, b, sk*b]
    band_scores = t.op("Add", [t.op("Add", [band_scores, valid_bias]), tri_bias])

    # 4b. the vertical columns (gathered once per head), minus those a kept block already covers: a column in the
    # query's own block is covered (δ = 0 is always kept), so a column is seen when it lies in an earlier block
    # whose offset is not kept
    fcol = t.op("Add", [columns, t.op("Reshape", [t.op("Range", [zero, t.op("Mul", [bh, n0]), n0]),
                                                  t.lead_shape(q, 1)])])

    def gather_columns(x):  # [B, H, 1, vk, D]
        flat = t.op("Reshape", [x, t.tail_shape(x, -1)])
        shape = t.op("Concat", [t.ints(0, 0, 1, -1), t.op("Shape", [x], {"start": 3})], {"axis": 0})
        return t.op("Reshape", [t.op("Gather", [flat, fcol], {"axis": 0}), shape])

    col_scores = t.op("MatMul", [qb, t.t_last(gather_columns(k), 5)])  # [B, H, nb, b, vk]
    col_blk = t.op("Div", [columns, t.ints(b)])  # [B, H, vk]
    col_delta = t.op("Sub", [t.op("Unsqueeze", [bidx, t.ints(1)]), t.op("Unsqueeze", [col_blk, t.ints(2)])])
    hits = t.op("Equal", [t.op("Unsqueeze", [col_delta, t.ints(4)]),
                          t.op("Unsqueeze", [offsets, t.ints(2, 3)])])  # [B, H, nb, vk, sk]
    covered = t.op("ReduceMax", [t.op("Cast", [hits], {"to": ir.DataType.INT32}), t.ints(4)], {"keepdims": 0})
    col_ok = t.op("And", [t.op("Greater", [col_delta, zero]),
                          t.op("Equal", [covered, t.const(np.int32(0))])])  # [B, H, nb, vk]
    col_bias = t.op("Unsqueeze", [t.op("Where", [col_ok, fzero, fneg]), t.ints(3)])  # [B, H, nb, 1, vk]
    col_scores = t.op("Add", [col_scores, col_bias])

    # 5. one softmax over both parts
    scores = t.op("Concat", [band_scores, col_scores], {"axis": -1})
    prob_all = t.op("Softmax", [scores], {"axis": -1})
    width = t.op("Mul", [sk, t.ints(b)])
    p_band = t.op("Slice", [prob_all, t.ints(0), width, t.ints(4)])
    p_col = t.op("Slice", [prob_all, width, t.ints(2**62), t.ints(4)])
    out = t.op("Add", [t.op("MatMul", [p_band, gather_blocks(v)]), t.op("MatMul", [p_col, gather_columns(v)])])
    shape4 = t.op("Concat", [t.ints(0, 0, -1), t.op("Shape", [v], {"start": 3})], {"axis": 0})
    return t.op("Slice", [t.op("Reshape", [out, shape4]), t.ints(0), n, t.ints(2)])
