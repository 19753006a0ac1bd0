"""Whole-head channel rule for :mod:`graphprune.analysis.channels`, anchored on :class:`AttentionBlock`.

Pattern (any layout the exporter writes between the projections and the core):
    root_q/k/v [.., C] --(Reshape | Transpose | Gather | Split | Slice | Squeeze | Unsqueeze | Expand
                          | Mul/Div by scalar | rotary embedding)*-->
        q [B, H, N, D], k (or kᵀ) [B, Hk, N, D], v [B, Hk, N, D] --core--> out [B, H, N, D]
        --(Transpose | Reshape)*--> merged [.., H·D] --> output projection
A decode step's KV cache, ``Concat(past, new)`` on the sequence axis with the past a graph input, is a chain step
too: the heads pass through it, and the past input's declared head axis is rewritten with them.
The root values are the outputs of the q/k/v projections (plus bias), labeled on their last axis. One root may feed
all three (a fused qkv projection: timm's ``[B, N, 3, H, D]`` view picked apart with Gather or, for ``unbind(0)``,
Slice + Squeeze; GPT-2's ``c_attn`` split in three). A rotary embedding (``x·cos + rotate_half(x)·sin``, halves
taken with Slices or a ``chunk`` Split; partial rotary ``Concat(rope(x[..., :r]), x[..., r:])``) is one chain step:
the index tensor goes through its Slices, Split and Concats exactly, and the step is accepted only when its last
axis lies within one head and cos/sin do not vary across heads.

How the channel ↔ (head, dim) maps are found: an index tensor (channel + C·position) is pushed through the
chain by the index-tracing interpreter (:mod:`graphprune.analysis._index_trace`, which also evaluates computed
reshape targets), with symbolic dims (batch, tokens) set to 1; where it stops, its reason blocks the heads. The result at q/k/v gives, for each
(head, dim), the projection channel it reads; a channel that would depend on the token position, or a head
that would mix channels of several positions, blocks the block. The same is done backwards from the core
output to the merged tensor. Nothing about ``[B, N, 3, H, D]`` or ``permute(2, 0, 3, 1, 4)`` is assumed.

Coupling: each q head h is one class with k/v head ``h·Hk/H`` (grouped-query attention keeps whole kv groups),
and with the merged channels of head h (the rows of the output projection).
Rewrites: every static entry of a chain Reshape/Expand target, Split sizes (explicit ones written for a Split with
``num_outputs``) and Slice bounds that vary with the channel; the
``q_num_heads``/``kv_num_heads`` attributes of a 3-D ``Attention`` op; com.microsoft ``num_heads``.
A per-head additive mask (``[B, H, N, N]``; T5's relative-position bias) is pruned with the heads when its head
axis is a tracked channel axis (a gathered ``[buckets, H]`` table): each head's mask atom joins the head's class.
A constant ``[1, H, T, T]`` bias (Swin's and MaxViT's relative-position bias, folded by the exporter), as the mask
or added by one ``Add`` to a head-broadcast mask (Swin's shift mask), is sliced on its head axis with the heads.
Blocked: com.microsoft packed ``Attention``, other per-head masks, chains with other ops or other users.

This module finds the chains and claims the blocks (``claim``); rotary steps are matched in
:mod:`graphprune.analysis._attention_rope`, and the maps and rewrites are made by
:mod:`graphprune.analysis._attention_head_edits` (``apply``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis._attention_rope import _Rope, _rope
from graphprune.analysis._channel_core import Builder
from graphprune.analysis.attention import AttentionBlock

_CHAIN = {"Reshape", "Transpose", "Gather", "Split", "Slice", "Squeeze", "Unsqueeze", "Expand", "Mul", "Div", "Identity",
          "Cast"}
_OUT_CHAIN = {"Transpose", "Reshape"}


@dataclasses.dataclass
class _Block:
    blk: AttentionBlock
    operands: list[ir.Value]  # q-side, k-side, v-side inputs of the core
    k_transposed: bool
    chains: list[list[ir.Node]]  # per operand, forward order
    roots: list[ir.Value]
    out_chain: list[ir.Node]
    merged: ir.Value | None
    reason: str | None = None


@dataclasses.dataclass
class Claims:
    finishers: dict[ir.Node, _Block]


def cache_concat(node: ir.Node) -> ir.Value | None:
    """The new keys or values of a decode step's ``Concat(past, new)`` (every other input a graph input: the KV
    cache fed back), joined on an axis that is not the last (the sequence axis); else ``None``. The head atoms pass
    through it as through an ``Identity``: the past tensor is the same heads, written by an earlier step."""
    if node.op_type != "Concat" or node.domain != "" or len(node.inputs) < 2:
        return None
    data = [v for v in node.inputs if v is not None and not v.is_graph_input()]
    if len(data) != 1 or data[0].shape is None:
        return None
    rank = len(data[0].shape)
    axis = node.attributes.get_int("axis", 0)
    if rank < 3 or axis % rank == rank - 1 or any(v.shape is None or len(v.shape) != rank for v in node.inputs):
        return None
    return data[0]


def _data_input(node: ir.Node) -> ir.Value | None:
    if node.op_type in ("Mul", "Div"):
        consts = [v for v in node.inputs if const_value(v) is not None and const_value(v).size == 1]
        data = [v for v in node.inputs if const_value(v) is None]
        return data[0] if len(consts) == 1 and len(data) == 1 else None
    return node.inputs[0]


def _flat(chain: list) -> list[ir.Node]:
    """Chain steps as graph nodes (a rotary step stands for its inner nodes)."""
    return [m for n in chain for m in (n.nodes if isinstance(n, _Rope) else [n])]


def _walk_back(value: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    chain: list[ir.Node] = []
    cur = value
    while True:
        rope = _rope(cur)
        if rope is not None:
            chain.append(rope)
            cur = rope.inputs[0]
            continue
        p = cur.producer()
        new = cache_concat(p) if p is not None else None
        if new is not None:
            chain.append(p)
            cur = new
            continue
        if p is None or p.domain != "" or p.op_type not in _CHAIN:
            return list(reversed(chain)), cur
        data = _data_input(p)
        shape_ok = p.op_type in ("Reshape", "Expand")  # targets may be computed; entries are checked in _edits
        if data is None or (not shape_ok and any(const_value(v) is None for v in p.inputs[1:] if v is not None and v is not data)):
            return list(reversed(chain)), cur
        chain.append(p)
        cur = data


def _walk_forward(value: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    chain: list[ir.Node] = []
    cur = value
    while True:
        users = [u for u, _ in cur.uses() if u.op_type != "Shape"]  # a Shape user reads only the (pruned) size
        if len(users) != 1 or users[0].op_type not in _OUT_CHAIN or users[0].domain != "":
            return chain, cur
        chain.append(users[0])
        cur = users[0].outputs[0]


def _describe(b: Builder, blk: AttentionBlock) -> _Block:
    if blk.kind == "ms_attention":
        return _Block(blk, [], False, [], [], [], None, "com.microsoft packed Attention: heads are not separable")
    if blk.kind == "matmul_softmax":
        qk = next(n for n in blk.nodes if n.op_type in ("MatMul", "Einsum"))
        if qk.op_type == "Einsum":  # torchvision MaxViT's 5-D einsum core
            return _Block(blk, [], False, [], [], [], None, "the attention core is an Einsum; heads are not followed")
        pv = blk.nodes[-1]
        operands, kt = [qk.inputs[0], qk.inputs[1], pv.inputs[1]], True
    else:
        operands, kt = list(blk.nodes[0].inputs[:3]), False
    chains, roots = [], []
    for v in operands:
        c, r = _walk_back(v)
        chains.append(c)
        roots.append(r)
    out_chain, merged = _walk_forward(blk.output)
    return _Block(blk, operands, kt, chains, roots, out_chain, merged)


def _mask_heads(b: Builder, blk: AttentionBlock, h: int):
    """How a per-head additive mask (``[B, H, N, N]``) follows the heads: ``None`` for a head-broadcast mask; the atom
    of each head when its head axis is a tracked channel axis (T5's relative-position bias, a ``[buckets, H]`` table
    gathered and permuted; a mask shared by several blocks couples their heads); ``(node, index)`` of a constant
    ``[1, H, T, T]`` bias (Swin's or MaxViT's relative-position bias, folded by the exporter) that is the mask, or
    that one broadcasting op adds to a head-broadcast mask (Swin's shift mask), sliced with the heads; else why it
    blocks."""
    m = blk.mask
    if m is None or m.shape is None or len(m.shape) != 4:
        return None
    mh = m.shape[1]
    if isinstance(mh, int) and mh == 1:
        return None
    lab = b.label(m)
    if lab is not None and lab.axis == 1 and len(lab.atoms) == h:
        return lab.atoms
    if lab is None and blk.window_mask is not None:
        return "a per-head bias beside a shift mask added over a 5-D view of the logits"
    if lab is None:
        site = _const_bias_site(blk, m, h)
        if site is not None and not b.folded_biases:
            return "a constant per-head bias on the logits (folded_biases: false)"
        if site is not None:
            return site
    return "the mask has a head axis that is not a tracked channel axis"


def _const_bias_site(blk: AttentionBlock, m: ir.Value, h: int) -> tuple[ir.Node, int] | None:
    def per_head(v: ir.Value | None) -> bool:
        c = const_value(v) if v is not None else None
        return c is not None and np.ndim(c) == 4 and np.shape(c)[1] == h

    if per_head(m):
        node = next((n for n in blk.nodes if any(x is m for x in n.inputs)), None)
        return (node, [x is m for x in node.inputs].index(True)) if node is not None else None
    p = m.producer()
    if p is None or p.domain != "" or p.op_type != "Add" or len(m.uses()) != 1:
        return None
    consts = [i for i, x in enumerate(p.inputs) if per_head(x)]
    others = [x for x in p.inputs if x is not None and const_value(x) is None]
    if len(consts) != 1 or any(x.shape is None or len(x.shape) != 4 or x.shape[1] != 1 for x in others):
        return None
    return p, consts[0]


def claim(b: Builder, blocks: list[AttentionBlock]) -> Claims:
    """Mark core and chain nodes as handled by this rule; the last core node finishes the block."""
    finishers: dict[ir.Node, _Block] = {}
    for blk in blocks:
        rec = _describe(b, blk)
        nodes = set(blk.nodes) | set(rec.out_chain) | {n for c in rec.chains for n in _flat(c)}
        inner = [o for n in nodes for o in n.outputs if o is not rec.merged]
        if any(u not in nodes and u.op_type != "Shape" for o in inner for u, _ in o.uses()):
            rec.reason = rec.reason or "an intermediate attention value has users outside the block"
        b.claimed |= nodes
        finishers[blk.nodes[-1]] = rec
    return Claims(finishers)


