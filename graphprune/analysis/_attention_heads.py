"""Whole-head channel rule for :mod:`graphprune.analysis.channels`, anchored on :class:`AttentionBlock`.

Pattern (any layout the exporter writes between the projections and the core):
    root_q/k/v [.., C] --(Reshape | Transpose | Gather | Split | Slice | Squeeze | Unsqueeze | Expand
                          | Mul/Div by scalar | rotary embedding)*-->
        q [B, H, N, D], k (or kᵀ) [B, Hk, N, D], v [B, Hk, N, D] --core--> out [B, H, N, D]
        --(Transpose | Reshape)*--> merged [.., H·D] --> output projection
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
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis import _index_trace
from graphprune.analysis._channel_core import Builder, static_shape
from graphprune.analysis._channel_layout import const_slot
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


def _data_input(node: ir.Node) -> ir.Value | None:
    if node.op_type in ("Mul", "Div"):
        consts = [v for v in node.inputs if const_value(v) is not None and const_value(v).size == 1]
        data = [v for v in node.inputs if const_value(v) is None]
        return data[0] if len(consts) == 1 and len(data) == 1 else None
    return node.inputs[0]


@dataclasses.dataclass
class _Rope:
    """A rotary embedding ``y = x·cos + rotate_half(x)·sin`` (``rotate_half(x) = Concat(-x[..., h:], x[..., :h])``
    on the last axis; the halves taken with two Slices or one two-output Split, as ``chunk(2, -1)`` exports) in a
    q/k chain: one chain step from ``x`` to ``y``. Partial rotary (GPT-NeoX, Phi:
    ``y = Concat(rope(x[..., :r]), x[..., r:])``) is one step too. It mixes only positions of the last axis, so
    heads pass through unchanged when the last axis lies within one head and cos/sin do not vary across heads; both
    are checked on the simulated head map (``_check_rope``)."""

    nodes: list[ir.Node]  # inner nodes, in dependency order, each once
    inputs: list[ir.Value]  # [x]
    outputs: list[ir.Value]  # [y]
    sides: list[ir.Value]  # cos, sin
    pieces: dict[ir.Value, list[tuple[int, int]]]  # every inner value: the last-axis ranges of x it holds, in order
    factors: list[tuple[ir.Node, ir.Value]]  # (Mul by cos or sin, its operand on the x side)
    op_type: str = "Rope"
    domain: str = ""

    @property
    def name(self) -> str:
        return self.nodes[-1].name


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    p = value.producer() if value is not None else None
    return p if p is not None and p.op_type == op and p.domain == "" else None


def _last_dim(x: ir.Value) -> int | None:
    return x.shape[-1] if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int) else None


def _last_axis_slice(node: ir.Node | None, x: ir.Value) -> tuple[int, int] | None:
    """(start, end) of a step-1 Slice of ``x`` on its last axis with constant bounds, else ``None``."""
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x or x.shape is None or len(node.inputs) < 4:
        return None
    vals = [const_value(v) if v is not None else None for v in node.inputs[1:5]]
    if any(v is None or np.asarray(v).size != 1 for v in vals[:3]) or (len(vals) > 3 and vals[3] is not None
                                                                      and int(np.asarray(vals[3]).ravel()[0]) != 1):
        return None
    r = len(x.shape)
    if int(np.asarray(vals[2]).ravel()[0]) % r != r - 1 or _last_dim(x) is None:
        return None
    n = x.shape[r - 1]
    s, e = (int(np.asarray(v).ravel()[0]) for v in vals[:2])
    s, e = (min(max(v + n if v < 0 else v, 0), n) for v in (s, e))
    return s, e


def _last_axis_piece(value: ir.Value, x: ir.Value) -> tuple[ir.Node, int, int] | None:
    """``value`` as ``x[..., s:e]``: a Slice of ``x``, or one output of a Split of ``x`` on its last axis."""
    node = value.producer()
    if node is None or node.domain != "" or node.inputs[0] is not x:
        return None
    if node.op_type == "Slice":
        b = _last_axis_slice(node, x)
        return (node, *b) if b is not None else None
    n = _last_dim(x)
    if node.op_type != "Split" or n is None or node.attributes.get_int("axis", 0) % len(x.shape) != len(x.shape) - 1:
        return None
    given = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    k = len(node.outputs)
    if given is not None:
        sizes = [int(v) for v in np.asarray(given).ravel()]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        return None
    else:  # num_outputs: ceil(n / k) each, the last one smaller
        step = -(-n // k)
        sizes = [min(step, max(n - step * i, 0)) for i in range(k)]
    if len(sizes) != k or sum(sizes) != n:
        return None
    i = list(node.outputs).index(value)
    return node, sum(sizes[:i]), sum(sizes[: i + 1])


def _rope(value: ir.Value) -> _Rope | None:
    return _full_rope(value) or _partial_rope(value)


def _full_rope(value: ir.Value) -> _Rope | None:
    add = _producer(value, "Add")
    if add is None:
        return None
    muls = [_producer(v, "Mul") for v in add.inputs]
    if None in muls or muls[0] is muls[1]:
        return None
    for direct, rotated in ((muls[0], muls[1]), (muls[1], muls[0])):
        for xi in (0, 1):
            x, cos = direct.inputs[xi], direct.inputs[1 - xi]
            for ri in (0, 1):
                rot, sin = rotated.inputs[ri], rotated.inputs[1 - ri]
                cat = _producer(rot, "Concat")
                n = _last_dim(x)
                if cat is None or len(cat.inputs) != 2 or n is None or n % 2:
                    continue
                r = len(x.shape)
                neg = _producer(cat.inputs[0], "Neg")
                if cat.attributes.get_int("axis", 0) % r != r - 1 or neg is None:
                    continue
                hi, lo = _last_axis_piece(neg.inputs[0], x), _last_axis_piece(cat.inputs[1], x)
                if hi is None or lo is None or lo[1:] != (0, n // 2) or hi[1:] != (n // 2, n):
                    continue
                srcs = list(dict.fromkeys([hi[0], lo[0]]))
                inner = {hi[0], lo[0], neg, cat}
                if any(const_value(v) is None and (v is x or v.producer() in inner) for v in (cos, sin)):
                    continue
                h = n // 2
                pieces = {neg.inputs[0]: [(h, n)], cat.inputs[1]: [(0, h)], neg.outputs[0]: [(h, n)],
                          cat.outputs[0]: [(h, n), (0, h)], rotated.outputs[0]: [(h, n), (0, h)],
                          direct.outputs[0]: [(0, n)], value: [(0, n)]}
                return _Rope([*srcs, neg, cat, rotated, direct, add], [x], [value], [cos, sin], pieces,
                             [(rotated, rot), (direct, x)])
    return None


def _partial_rope(value: ir.Value) -> _Rope | None:
    """``Concat(rope(x[..., :r]), x[..., r:])`` on the last axis."""
    cat = _producer(value, "Concat")
    if cat is None or len(cat.inputs) != 2 or value.shape is None:
        return None
    if cat.attributes.get_int("axis", 0) % len(value.shape) != len(value.shape) - 1:
        return None
    inner = _full_rope(cat.inputs[0])
    if inner is None:
        return None
    xr = inner.inputs[0]
    src = xr.producer()
    x = src.inputs[0] if src is not None and src.inputs else None
    n = _last_dim(x) if x is not None else None
    rot = _last_axis_piece(xr, x) if n is not None else None
    rest = _last_axis_piece(cat.inputs[1], x) if n is not None else None
    if rot is None or rest is None or rot[0].op_type != "Slice" or rot[1:] != (0, _last_dim(xr)) \
            or rest[1:] != (rot[2], n):
        return None
    pieces = {v: [(s, e)] for v, (s, e) in ((xr, rot[1:]), (cat.inputs[1], rest[1:]))}
    pieces.update({v: list(r) for v, r in inner.pieces.items()})  # inner ranges are relative to xr = x[..., :r]
    pieces[value] = [(0, n)]
    nodes = list(dict.fromkeys([rot[0], rest[0], *inner.nodes, cat]))
    return _Rope(nodes, [x], [value], inner.sides, pieces, inner.factors)


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


def _run_rope(rope: _Rope, x: np.ndarray, env: dict) -> list[np.ndarray]:
    """Index arrays through a rotary step: every inner value holds known last-axis ranges of ``x`` (the Slices,
    the Split and the Concats exactly); the products by cos/sin are their x-side operand."""
    for v, ranges in rope.pieces.items():
        env[v] = np.concatenate([x[..., s:e] for s, e in ranges], axis=-1)
    for node, data in rope.factors:
        side = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
        s = static_shape(side) if const_value(side) is None else list(np.asarray(const_value(side)).shape)
        if s is None:
            raise ValueError(f"rotary factor {side.name!r} has an unknown shape")
        arr = env[data]
        if tuple(np.broadcast_shapes(arr.shape, tuple(s))) != arr.shape:
            raise ValueError(f"rotary factor {side.name!r} broadcasts the operand")
    return [env[rope.outputs[0]]]


def _check_rope(chain: list, env: dict, width: int, hm: np.ndarray) -> str | None:
    """A rotary step keeps heads whole: its last axis lies within one head, and cos/sin are constant along every
    axis on which the head changes (they may vary over tokens and within a head)."""
    head_of = np.full(width, -1, dtype=np.int64)
    for h, row in enumerate(hm):
        head_of[row] = h
    for step in chain:
        if not isinstance(step, _Rope):
            continue
        arr = env.get(step.inputs[0])
        if arr is None:
            return f"cannot follow channels into rotary embedding {step.name!r}"
        heads = head_of[arr % width]
        r = heads.ndim
        varies = [ax for ax in range(r) if not (heads == np.take(heads, [0], axis=ax)).all()]
        if r - 1 in varies:
            return f"rotary embedding {step.name!r} mixes positions of several heads"
        for side in step.sides:
            c = const_value(side)
            s = list(np.asarray(c).shape) if c is not None else static_shape(side)
            off = r - len(s)
            if any(s[ax - off] > 1 for ax in varies if ax - off >= 0):
                return f"rotary factor {side.name!r} varies across heads"
    return None


def _rope_step(step, env: dict) -> list[np.ndarray] | None:
    """The interpreter's hook for a rotary step (``None``: an ordinary node)."""
    if not isinstance(step, _Rope):
        return None
    x = env.get(step.inputs[0])
    return None if x is None else _run_rope(step, x, env)


def _simulate(chain: list, start: ir.Value, arr: np.ndarray, env: dict) -> str | None:
    """Push ``arr`` at ``start`` through ``chain`` (the index-tracing interpreter); why it stopped, else ``None``."""
    return _index_trace.trace(chain, {start: arr}, custom=_rope_step, env=env).reason


def _index_array(value: ir.Value, width: int) -> np.ndarray | None:
    """Seed codes of a ``[.., width]`` value: channel + width·position (symbolic dims 1)."""
    s = static_shape(value)
    return _index_trace.index_map(s) if s is not None and s[-1] == width else None


def _head_map(arr: np.ndarray | None, width: int, transposed: bool) -> np.ndarray | str:
    """[H, D] channel of each (head, dim), from a simulated [1, H, N, D] (or [1, H, D, N]) operand."""
    if arr is None or arr.ndim != 4 or arr.shape[0] != 1:
        return "q/k/v are not [B, H, N, D] views of the projections"
    if transposed:
        arr = np.swapaxes(arr, 2, 3)
    ch, pos = arr % width, arr // width
    if not (ch == ch[:, :, :1, :]).all() or not (pos == pos[:, :1, :, :1]).all():
        return "heads mix channels with token positions"
    return ch[0, :, 0, :]


def _runtime_shape(value: ir.Value, allowed: set, forbidden: set[int], depth: int = 0) -> str | None:
    """``None`` when ``value`` is computed only from constants and ``Shape`` of ``allowed`` values (so it follows
    the pruned sizes at run time) and no constant in it equals a head count or width in ``forbidden``."""
    c = const_value(value)
    if c is not None:
        hit = set(np.asarray(c).ravel().tolist()) & forbidden
        return f"constant {sorted(hit)[0]} looks like a head count" if hit else None
    p = value.producer()
    if p is None or depth > 12:
        return f"{value.name!r} depends on a graph input"
    if p.op_type == "Shape":
        return None if p.inputs[0] in allowed else f"Shape of {p.inputs[0].name!r} outside the block"
    for v in p.inputs:
        if v is not None:
            bad = _runtime_shape(v, allowed, forbidden, depth + 1)
            if bad:
                return bad
    return None


def _edits(b: Builder, rec: _Block, env: dict, atoms_of, allowed: set, forbidden: set[int]) -> str | None:
    """Count edits for every chain Reshape/Expand/Split entry that varies with the kept heads."""
    atoms: dict[int, tuple] = {}  # id(simulated array) -> (array, its atoms), computed once per value

    def lines_of(y: np.ndarray, ax: int) -> np.ndarray:
        a = atoms.get(id(y), (None, None))[1]
        if a is None:
            a = atoms_of(y)
            atoms[id(y)] = (y, a)  # y kept referenced, so its id is not reused
        return np.moveaxis(a, ax, 0).reshape(y.shape[ax], -1)

    for node in _flat([n for c in rec.chains for n in c]) + rec.out_chain:
        for o in node.outputs:  # new shapes of the intermediate values
            y = env.get(o)
            for ax in range(y.ndim if y is not None else 0):
                lines = lines_of(y, ax)
                if not (lines == lines[:1]).all():
                    b.shape_line(o, ax, lines)
        if node.op_type in ("Reshape", "Expand"):
            y = env.get(node.outputs[0])
            length = node.inputs[1].shape[0] if node.inputs[1].shape is not None and len(node.inputs[1].shape) == 1 else None
            if y is None or not isinstance(length, int):
                return f"{node.op_type} {node.name!r}: unknown target length"
            off = y.ndim - length
            for p in range(length):
                if p + off < 0:
                    continue
                lines = lines_of(y, p + off)
                if (lines == lines[:1]).all():
                    continue
                slot = const_slot(node, 1, p)
                if isinstance(slot, str):
                    bad = _runtime_shape(node.inputs[1], allowed, forbidden)
                    if bad:
                        return f"{node.op_type} {node.name!r}: {slot} ({bad})"
                    continue  # computed at run time from the pruned tensors' own shapes
                snode, sidx, spos = slot
                cur = int(np.asarray(const_value(snode.inputs[sidx])).ravel()[spos])
                if cur <= 0 or (node.op_type == "Expand" and cur == 1):
                    continue
                if cur != y.shape[p + off]:
                    return f"{node.op_type} {node.name!r}: target entry {cur} is not the dim {y.shape[p + off]}"
                b.count_edit(snode, sidx, spos, lines)
        elif node.op_type == "Split":
            ys = [env.get(o) for o in node.outputs]
            if any(y is None for y in ys):
                continue
            axis = node.attributes.get_int("axis", 0) % ys[0].ndim
            # without sizes (num_outputs): the rewrite writes explicit ones
            base = None if len(node.inputs) > 1 and node.inputs[1] is not None else [y.shape[axis] for y in ys]
            for k, y in enumerate(ys):
                b.count_edit(node, 1, k, lines_of(y, axis), base=base)
        elif node.op_type == "Slice":
            x = env.get(node.inputs[0])
            if x is None:
                continue
            vals = [np.asarray(const_value(v)).ravel() if v is not None else None for v in node.inputs[1:5]]
            axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(vals[0]))
            steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(axes), dtype=np.int64)
            for k, a in enumerate(int(a) % x.ndim for a in axes):
                lines = lines_of(x, a)
                if (lines == lines[:1]).all():
                    continue  # the same atoms at every position: the bounds never move
                if int(steps[k]) != 1:
                    return f"Slice {node.name!r} strides over heads"
                n = x.shape[a]
                for idx, bound in ((1, int(vals[0][k])), (2, int(vals[1][k]))):
                    pos = min(max(bound + n if bound < 0 else bound, 0), n)
                    if 0 < pos < n:
                        b.count_edit(node, idx, k, lines[:pos], always=bound < 0)
    return None


def apply(b: Builder, rec: _Block) -> None:
    """Finish one block: derive head maps, union whole heads, label the merged tensor, record rewrites."""
    labs = [b.label(r) for r in rec.roots]
    all_atoms = [lab.atoms for lab in labs if lab is not None]

    def fail(reason: str) -> None:
        for a in all_atoms:
            b.block(a, f"attention block {rec.blk.index}: {reason}")
        merged = rec.merged if rec.merged is not None else rec.blk.output
        width = merged.shape[-1] if merged.shape is not None and len(merged.shape) else None
        if isinstance(width, int):  # an opaque source: its consumers stay consistent, nothing is pruned
            b.set_label(merged, len(merged.shape) - 1, b.new_space(rec.blk.nodes[-1], width))
            b.block(b.labels[merged].atoms, f"attention block {rec.blk.index}: {reason}")

    if rec.reason:
        return fail(rec.reason)
    if any(lab is None for lab in labs):
        return fail("q/k/v do not come from tracked projections")
    ranks = [len(r.shape) if r.shape is not None else None for r in rec.roots]
    if any(lab.axis != (rk or 0) - 1 for lab, rk in zip(labs, ranks, strict=True)):
        return fail("projection channels are not on the last axis")
    env: dict = {}
    maps = []
    three_d = rec.blk.layout == "BNC"
    for i, (chain, root, lab) in enumerate(zip(rec.chains, rec.roots, labs, strict=True)):
        width = len(lab.atoms)
        if three_d:
            heads = rec.blk.heads if i == 0 else (rec.blk.kv_heads or rec.blk.heads)
            if not heads or width % heads or chain:
                return fail("3-D attention inputs without a head count")
            maps.append(np.arange(width).reshape(heads, -1))
            continue
        arr = _index_array(root, width)
        if arr is None:
            return fail("projection output shape is unknown")
        err = _simulate(chain, root, arr, env)
        if err:
            return fail(err)
        hm = _head_map(env.get(rec.operands[i]), width, rec.k_transposed and i == 1)
        if isinstance(hm, str):
            return fail(hm)
        err = _check_rope(chain, env, width, hm)
        if err:
            return fail(err)
        maps.append(hm)
    qa, ka, va = (lab.atoms[m] for lab, m in zip(labs, maps, strict=True))
    h, hk = qa.shape[0], ka.shape[0]
    if h % hk or va.shape[0] != hk:
        return fail(f"{h} query heads do not split evenly over {hk} key/value heads")
    mask = _mask_heads(b, rec.blk, h)
    if isinstance(mask, str):
        return fail(mask)
    tracked = isinstance(mask, np.ndarray)
    for i in range(h):
        j = i * hk // h
        b.union_all(np.concatenate([qa[i], ka[j], va[j]] + ([mask[i:i + 1]] if tracked else [])))
    if tracked:  # a per-head parameter (a bias table), not the model's input stem
        b.stem_spaces -= {int(b.atom_space[a]) for a in mask.tolist()}
    elif mask is not None:  # a constant [1, H, T, T] bias: sliced on its head axis with the heads
        node, index = mask
        b.member(node, index, 1, qa[:, 0], "param")
        b.shape_line(rec.blk.mask, 1, qa[:, :1])
    for s in {int(b.atom_space[a]) for a in np.concatenate([qa.ravel(), ka.ravel(), va.ravel()]).tolist()}:
        b.kinds[s] = "heads"
    d = qa.shape[1]
    out_atoms = qa  # output channel (head h, dim d) belongs to q head h's class
    if three_d:
        merged_atoms = qa.reshape(-1)
        node = rec.blk.nodes[0]
        if rec.blk.kind == "attention_op":
            b.count_edit(node, None, 0, qa, attr="q_num_heads")
            b.count_edit(node, None, 0, ka, attr="kv_num_heads")
        else:
            b.count_edit(node, None, 0, qa, attr="num_heads")
        out = rec.blk.output  # contrib ops often carry no inferred shape: the output is [B, N, H·D] like q
        rank = len(out.shape) if out.shape is not None else len(rec.operands[0].shape or (0, 0, 0))
        b.set_label(out, rank - 1, merged_atoms)
    else:
        if rec.merged is None:
            return fail("no merged output")
        start = _index_array(rec.blk.output, d)
        if start is None:  # no inferred shape (a computed reshape target): [B, H, N] of q, D of v, as traced
            qs, vs = env.get(rec.operands[0]), env.get(rec.operands[2])
            if qs is not None and vs is not None and qs.ndim == 4 and vs.shape[-1] == d:
                start = _index_trace.index_map((*qs.shape[:-1], d))
        if start is None or start.shape[1] != h:
            return fail("core output is not [B, H, N, D]")
        code = (start % d) + d * np.arange(h)[None, :, None, None]
        tok = np.arange(start.shape[2])[None, None, :, None]
        err = _simulate(rec.out_chain, rec.blk.output, code + h * d * tok, env)
        if err:
            return fail(err)
        y = env.get(rec.merged)
        if y is None or y.shape[-1] != h * d:
            return fail("merged output is not [.., H·D]")
        ch = y % (h * d)
        if not (ch == ch.reshape(-1, h * d)[:1].reshape((1,) * (y.ndim - 1) + (h * d,))).all():
            return fail("merged output mixes heads with token positions")
        merged_atoms = out_atoms.reshape(-1)[ch.reshape(-1, h * d)[0]]
        b.set_label(rec.merged, y.ndim - 1, merged_atoms)
    # atoms of a simulated element: input side (channel + C·pos of one root) or output side ((h, d) + H·D·pos)
    root_atoms = {id(r): lab.atoms for r, lab in zip(rec.roots, labs, strict=True)}

    def atoms_of_in(root):
        a = root_atoms[id(root)]
        return lambda arr: a[arr % len(a)]

    out_flat = out_atoms.reshape(-1)
    allowed = set(rec.roots) | {rec.blk.output} | {o for c in rec.chains + [rec.out_chain] for n in _flat(c)
                                                     for o in n.outputs}
    forbidden = {h, h * d, hk, hk * d, 3 * h * d} - {1, d}
    for chain, root in zip(rec.chains, rec.roots, strict=True):
        sub = _Block(rec.blk, rec.operands, rec.k_transposed, [chain], [root], [], None)
        reason = _edits(b, sub, env, atoms_of_in(root), allowed, forbidden)
        if reason:
            return fail(reason)
    sub = _Block(rec.blk, rec.operands, rec.k_transposed, [], [], rec.out_chain, None)
    reason = _edits(b, sub, env, lambda arr: out_flat[arr % (h * d)], allowed, forbidden)
    if reason:
        return fail(reason)
    _core_cost(b, rec, qa[:, 0], h, d)
    for node in rec.blk.nodes:
        for o in node.outputs:
            if o.shape is not None and len(o.shape) == 4 and o.shape[1] == h:
                b.shape_line(o, 1, qa[:, :1])


def _core_cost(b: Builder, rec: _Block, head_atoms: np.ndarray, h: int, d: int) -> None:

    n = rec.blk.tokens
    q = static_shape(rec.blk.q) if rec.blk.q is not None else None
    if not n and q is not None and len(q) >= 2:
        n = q[-2]
    for node in rec.blk.nodes:  # per-node FLOPs come from count_flops when the caller has them
        b.cost(node, 4 * h * n * n * d if (n and node is rec.blk.nodes[-1]) else 0, None, head_atoms)
