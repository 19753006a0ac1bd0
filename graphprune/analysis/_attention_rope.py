"""Rotary embeddings in a q/k chain, for the whole-head rule (:mod:`graphprune.analysis._attention_heads`): matched
as one chain step (``x·cos + rotate_half(x)·sin``, the halves taken with Slices or a ``chunk`` Split; partial rotary
``Concat(rope(x[..., :r]), x[..., r:])``), run on index arrays, and accepted only when its last axis lies within one
head and cos/sin do not vary across heads."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis._channel_core import static_shape


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

