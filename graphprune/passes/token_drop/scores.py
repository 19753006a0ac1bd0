"""Token scores computed inside the graph from an :class:`AttentionBlock` (used by ``token_drop``).

Sources (each returns a ``[B, N]`` float value built on a tape; nothing is inserted here):
  1. ``cls_attention``: head-mean of the query rows ``rows`` (the CLS row ``[0, 1)`` by default; the last row
     for decoder/VLM graphs, FastV) of the block's softmax probabilities, averaged over those rows (EViT, FasterVLM).
     For a fused ``Attention`` op, which exposes no probabilities, only those rows are recomputed:
     ``softmax(q[rows] · kᵀ · scale + mask[rows])`` — an ``R × N`` product, the block itself stays fused.
  2. ``attention_graph``: Zero-TPrune-style importance: ``s ← s · Ā`` from ``s₀ = 1/N``, ``iterations`` times,
     with ``Ā`` the head-averaged ``[B, N, N]`` probabilities. For a fused op ``Ā`` is recomputed from q and k
     (an extra N² · D matmul per selected block; reported as such by the pass).
  3. ``key_metric``: head-averaged keys ``[B, N, D]`` for ToMe's similarity.

Refusals raise :class:`~graphprune.passes.base.Skip` with the reason (the pass records it as a skip).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune._ir import additive_mask
from graphprune.analysis.attention import AttentionBlock
from graphprune.analysis.tokens import is_matmul
from graphprune.ops import INT64_MAX, Body
from graphprune.passes.base import Skip


def _rows(t: Body, x: ir.Value, rows: tuple[int, int], axis: int) -> ir.Value:
    start, stop = rows
    return t.op("Slice", [x, t.ints(start), t.ints(INT64_MAX if stop == 0 else stop), t.ints(axis)])


def _known(d) -> str | None:
    """A dim as comparable text: an int, or a named symbolic dim; ``None`` when unknown."""
    if isinstance(d, int):
        return str(d)
    return d.value if isinstance(d, ir.SymbolicDim) and d.value else None


def _check_keys(blk: AttentionBlock, q: ir.Value | None, k: ir.Value | None) -> None:
    """The keys must be the stream's tokens: with reduced K/V (PVT/SegFormer spatial reduction) or cross-attention
    the key axis indexes another sequence, so attention columns (or keys) do not score the stream tokens."""
    nq = _known(q.shape[-2]) if q is not None and q.shape is not None and len(q.shape) >= 2 else None
    nk = _known(k.shape[-2]) if k is not None and k.shape is not None and len(k.shape) >= 2 else None
    if nq is not None and nk is not None and nq != nk:
        raise Skip(f"block {blk.index}: keys come from another sequence than the queries ({nq} queries, {nk} keys: "
                   "reduced K/V or cross-attention); attention scores do not rank the stream tokens")


def _check_probs(blk: AttentionBlock, p: ir.Value) -> None:
    if p.shape is None or len(p.shape) < 2:
        return
    nq, nk = _known(p.shape[-2]), _known(p.shape[-1])
    if nq is not None and nk is not None and nq != nk:
        raise Skip(f"block {blk.index}: keys come from another sequence than the queries ({p.shape[-2]} queries, "
                   f"{p.shape[-1]} keys: reduced K/V or cross-attention); attention scores do not rank the stream "
                   "tokens")


def _check_fused(blk: AttentionBlock) -> None:
    if blk.layout != "BHND" or blk.q is None or blk.k is None:
        raise Skip(f"block {blk.index}: fused attention in {blk.layout} layout; q/k [B,H,N,D] needed to recompute scores")
    if blk.kv_heads is not None and blk.heads is not None and blk.kv_heads != blk.heads:
        raise Skip(f"block {blk.index}: grouped KV heads ({blk.kv_heads} ≠ {blk.heads}) not supported for score recompute")
    if blk.scale is None:
        raise Skip(f"block {blk.index}: attention scale unknown")


def _recompute_probs(t: Body, blk: AttentionBlock, rows: tuple[int, int] | None) -> ir.Value:
    """softmax(q[rows] kᵀ · scale + mask[rows]) → [B, H, R, N] for a fused block."""
    _check_fused(blk)
    _check_keys(blk, blk.q, blk.k)
    q = _rows(t, blk.q, rows, 2) if rows is not None else blk.q
    kt = t.op("Transpose", [blk.k], {"perm": [0, 1, 3, 2]})
    scale = t.op("CastLike", [t.const(np.float32(blk.scale)), q])  # the model's dtype (fp16 exports)
    logits = t.op("Mul", [t.op("MatMul", [q, kt]), scale])
    if blk.mask is not None:
        # the static facts come from the original mask; the value is whatever feeds the op now (the pass may
        # have replaced it by a gathered copy after an earlier reduction)
        orig = blk.mask
        if orig.shape is None or len(orig.shape) != 4:
            raise Skip(f"block {blk.index}: attention mask of rank ≠ 4")
        node = blk.nodes[0]
        mask = node.inputs[3] if blk.kind == "attention_op" and len(node.inputs) > 3 else orig
        if orig.dtype == ir.DataType.BOOL:
            mask = additive_mask(t, mask, blk.q.dtype or ir.DataType.FLOAT)
        if rows is not None and orig.shape[2] != 1:
            mask = _rows(t, mask, rows, 2)
        logits = t.op("Add", [logits, mask])
    return t.op("Softmax", [logits], {"axis": -1})


def cls_attention(t: Body, blk: AttentionBlock, rows: tuple[int, int]) -> tuple[ir.Value, str | None]:
    """[B, N] scores; the second item is a note for the report (recomputed from q, k) or None."""
    note = None
    if blk.probs is not None:
        _check_probs(blk, blk.probs)
        p = _rows(t, blk.probs, rows, 2)
    else:
        p = _recompute_probs(t, blk, rows)
        note = f"attention is fused and exposes no probabilities; query rows {list(rows)} recomputed from Q,K"
    return t.op("ReduceMean", [p, t.ints(1, 2)], {"keepdims": 0}), note


def attention_graph(t: Body, blk: AttentionBlock, iterations: int) -> tuple[ir.Value, str | None]:
    """[B, N] Zero-TPrune-style power-iteration importance."""
    note = None
    if blk.probs is not None:
        _check_probs(blk, blk.probs)
        p = blk.probs
    else:
        p = _recompute_probs(t, blk, None)
        note = "attention is fused; full head-mean probabilities recomputed from Q,K (extra N²·D matmul)"
    a = t.op("ReduceMean", [p, t.ints(1)], {"keepdims": 0})  # [B, N, N]
    s = t.op("ReduceMean", [a, t.ints(1)], {"keepdims": 1})  # s₁ = (1/N)·1ᵀĀ  [B, 1, N]
    for _ in range(max(0, iterations - 1)):
        s = t.op("MatMul", [s, a])
    return t.op("Squeeze", [s, t.ints(1)]), note


def _keys(t: Body, blk: AttentionBlock) -> ir.Value | None:
    """[B, H, N, D] keys: the block's, or the transposed keys ``[B, H, D, N]`` its QKᵀ MatMul reads (an eager BERT
    export transposes the keys straight from ``[B, N, H, D]``, so no ``[B, H, N, D]`` value exists)."""
    if blk.k is not None:
        return blk.k
    for node in blk.nodes:
        if is_matmul(node) and node.inputs[0] is blk.q and blk.q is not None:
            kt = node.inputs[1]  # the layout (BHND) was established on the original shapes, which a pass clears
            if kt is not None and (kt.shape is None or len(kt.shape) == 4):
                return t.op("Transpose", [kt], {"perm": [0, 1, 3, 2]})
    return None


def key_metric(t: Body, blk: AttentionBlock) -> ir.Value:
    """[B, N, D] head-mean keys (ToMe's metric)."""
    k = _keys(t, blk) if blk.layout == "BHND" else None
    if k is None:
        raise Skip(f"block {blk.index}: keys [B,H,N,D] not recoverable for ToMe similarity")
    if blk.probs is not None:
        _check_probs(blk, blk.probs)
    _check_keys(blk, blk.q, blk.k)
    return t.op("ReduceMean", [k, t.ints(1)], {"keepdims": 0})
