"""``token_drop`` on a graph whose token count is a runtime dimension (NLP exports: ``[batch, sequence, C]``).

A static graph hard-codes the count in constants (``rewire`` retargets those). A dynamic export reads it
at run time instead, from ``Shape`` of a value upstream of the stream (``Shape(input_ids)[1:2]``) and feeds it
into the ``Concat`` targets of every later ``Reshape``; and per-token tensors computed upstream (the attention
mask ``[B, 1, N, N]``, a mean-pooling mask ``[B, N]``) meet the stream downstream. After a reduction both are
stale. :class:`DynamicTokens` tracks the token axis by its symbol (the ``sequence`` of the original shapes) and,
for each reduction, plans and applies:

  1. **counts**: every int64 shape value (rank ≤ 1, no token axis of its own) computed upstream and read
     downstream that depends on the count — through ``Shape`` of a value with the token axis, or a count this
     class made for an earlier reduction — is recomputed for the downstream readers from the reduced stream's
     ``Shape(y)[1:2]`` (the chain of shape ops is cloned; the original stays for its upstream readers);
  2. **per-token data**: every other value computed upstream (or a graph input) that has the token axis and is
     read downstream is gathered with the kept indices along each of its token axes (``GatherElements``; a
     batch-1 tensor is expanded to the batch first), one gather per distinct value.

Refusals (:class:`~graphprune.passes.base.Skip`, raised by ``plan`` before anything changes): the token axis of
the stream has no symbol (nothing tells which runtime dims are the count); a per-token tensor read downstream
without a leading batch axis (a ``[N, D]`` table: gathering it per batch would change its rank); an int64 shape
value read downstream that depends on the count through an op this module does not clone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphprune._ir import NameScope, const_value
from graphprune.analysis.tokens import downstream_nodes, is_broadcasting, is_shape, is_shape_arith
from graphprune.ops import Body
from graphprune.passes.base import Skip


@dataclasses.dataclass
class _Plan:
    counts: list[tuple[ir.Node, int, ir.Value]]  # (reader, input index, upstream count-derived value)
    data: list[tuple[ir.Node, int, ir.Value, tuple[int, ...]]]  # (reader, input index, value, token axes)


class DynamicTokens:
    """The token axis of a dynamic graph across the reductions of one ``token_drop`` run (module docstring)."""

    def __init__(self, model: ir.Model, stream: ir.Value, static: int | None = None,
                 model_dims: set[int] = frozenset()) -> None:
        shape = stream.shape
        sym = shape[1] if shape is not None and len(shape) == 3 else None
        self.static = static
        self.model_dims = set(model_dims)
        if static is not None:
            self.symbol: str | int = static
        elif not isinstance(sym, ir.SymbolicDim) or sym.value is None:
            raise Skip("token count is not static and the token axis has no symbolic name; cannot tell which "
                       "runtime dims hold it")
        else:
            self.symbol = sym.value
        self.graph = model.graph
        self.batch = shape[0] if shape is not None else None
        self._axes: dict[int, tuple[ir.Value, tuple[int, ...], ir.Shape]] = {}  # id -> (value, token axes, shape)
        for v in _values(model.graph):
            self._note(v)
        self._counts: dict[int, ir.Value] = {}  # id(value) -> value: counts made for earlier reductions
        self._names = NameScope(model.graph)

    # ------------------------------------------------------------------ facts
    def _note(self, v: ir.Value) -> None:
        if v.shape is None:
            return
        if self.static is not None:
            axes = tuple(i for i, d in enumerate(v.shape) if isinstance(d, int) and d == self.static)
        else:
            axes = tuple(i for i, d in enumerate(v.shape) if isinstance(d, ir.SymbolicDim) and d.value == self.symbol)
        if axes:
            self._axes[id(v)] = (v, axes, v.shape.copy())

    def token_axes(self, v: ir.Value) -> tuple[int, ...]:
        """The axes of ``v`` that had the token count in the original graph (or were registered since)."""
        hit = self._axes.get(id(v))
        return hit[1] if hit is not None and hit[0] is v else ()

    def _shape(self, v: ir.Value) -> ir.Shape | None:
        """``v``'s shape in the original graph (the pass clears shapes downstream of each reduction)."""
        hit = self._axes.get(id(v))
        return hit[2] if hit is not None and hit[0] is v else v.shape

    def _is_shape_value(self, v: ir.Value) -> bool:
        if v.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or self.token_axes(v):
            return False
        return v.shape is None or len(v.shape) <= 1

    def _depends(self, v: ir.Value, memo: dict[int, bool], depth: int = 0) -> bool:
        """Does the int64 shape value ``v`` carry the token count (raises Skip for an op it cannot follow)?"""
        if id(v) in memo:
            return memo[id(v)]
        if id(v) in self._counts:
            memo[id(v)] = True
            return True
        prod = v.producer()
        if prod is None or const_value(v) is not None or depth > 64:
            memo[id(v)] = False
            return False
        if is_shape(prod):
            start, end = _shape_range(prod)
            memo[id(v)] = any(start <= a < end for a in self.token_axes(prod.inputs[0]))
            return memo[id(v)]
        deps = [self._depends(i, memo, depth + 1) for i in prod.inputs if i is not None and self._is_shape_value(i)]
        hit = any(deps)
        if hit and not is_shape_arith(prod):
            raise Skip(f"{prod.op_type} {prod.name}: computes a shape from the token count before the stream; "
                       "not recomputed for the reduced tokens")
        memo[id(v)] = hit
        return hit

    # ------------------------------------------------------------------ plan / apply
    def plan(self, stream: ir.Value, exclude: set[int] = frozenset(), masks: tuple[ir.Value, ...] = ()) -> _Plan:
        """What the reduction at ``stream`` needs downstream (raises :class:`Skip` before anything changes);
        readers in ``exclude`` (node ids past a restore point) keep what they read. Static graphs: only the
        per-token data (constants hold the counts: ``rewire``), and not ``masks`` nor values computed from
        them (the pass gathers the attention masks itself)."""
        nodes = [n for n in downstream_nodes(stream) if id(n) not in exclude]
        down = {id(n) for n in downstream_nodes(stream)}
        memo: dict[int, bool] = {}
        counts, data = [], []
        for node in nodes:
            for i, v in enumerate(node.inputs):
                if v is None or v is stream:
                    continue
                if const_value(v) is not None:
                    axes = self._const_token_axes(node, v, masks)
                    if axes:
                        data.append((node, i, v, axes))
                    continue
                prod = v.producer()
                if prod is not None and id(prod) in down:
                    continue
                if self._is_shape_value(v):
                    if self.static is None and self._depends(v, memo):
                        counts.append((node, i, v))
                    continue
                axes = self.token_axes(v)
                if not axes or (masks and _derived_from(v, masks)):
                    continue
                if self.static is not None and self.static in self.model_dims:
                    raise Skip(f"{node.op_type} {node.name}: reads {v.name!r}, computed before the stream with a "
                               f"dimension {self.static}; the token count {self.static} is also a model dimension, "
                               "so its token axis cannot be told")
                shape = self._shape(v)
                if 0 in axes or not _batch_like(shape[0], self.batch):
                    raise Skip(f"{node.op_type} {node.name}: reads {v.name!r}, a per-token tensor computed before the "
                               "stream without a leading batch axis; cannot gather it to the kept tokens")
                data.append((node, i, v, axes))
        return _Plan(counts, data)

    def _const_token_axes(self, node: ir.Node, v: ir.Value, masks: tuple[ir.Value, ...]) -> tuple[int, ...]:
        """Static graphs: the token axes of a constant that ``node`` broadcasts against per-token data (a rotary
        cos/sin table ``[1, 1, N, D]`` times q; a ``[1, H, N, N]`` bias added to the logits): the axes holding the
        count that line up, from the right, with token axes of another input. Empty for everything else (weights,
        norms, scalars, the masks the pass gathers itself)."""
        if self.static is None or not is_broadcasting(node) or any(v is m for m in masks):
            return ()
        shape = list(np.shape(const_value(v)))
        axes = tuple(a for a, d in enumerate(shape) if d == self.static)
        if not axes:
            return ()
        r = len(shape)
        for u in node.inputs:
            if u is None or u is v or const_value(u) is not None:
                continue
            s = self._shape(u)
            theirs = set(self.token_axes(u))
            if s is None or not theirs or not all(a + len(s) - r in theirs for a in axes):
                continue
            if self.static in self.model_dims:
                raise Skip(f"{node.op_type} {node.name}: constant {v.name!r} has a dimension {self.static}, which is "
                           "both the token count and a model dimension; cannot tell its token axis")
            if 0 in axes or r < 2 or not _batch_like(shape[0], self.batch):
                raise Skip(f"{node.op_type} {node.name}: constant {v.name!r} spans the tokens without a leading batch "
                           "axis; cannot gather it to the kept tokens")
            self._axes[id(v)] = (v, axes, ir.Shape(shape))
            return axes
        return ()

    def apply(self, plan: _Plan, reduced: ir.Value, idx: ir.Value, anchor: ir.Node) -> None:
        """Rewire the readers of ``plan`` to the reduced stream ``reduced`` (kept positions ``idx [B, K]``);
        new nodes go after ``anchor`` (the graph is sorted by the pass at the end)."""
        t = Body()
        count = t.op("Shape", [reduced], {"start": 1, "end": 2})
        count.dtype, count.shape = ir.DataType.INT64, ir.Shape([1])
        count.name = self._names.fresh(f"{reduced.name or 'tokens'}_count")
        clones: dict[int, ir.Value] = {}
        for node, i, v in plan.counts:
            node.replace_input_with(i, self._clone(t, v, count, clones))
        gathered: dict[int, ir.Value] = {}
        for node, i, v, axes in plan.data:
            if id(v) not in gathered:
                g = gather_tokens(t, v, idx, axes, len(self._shape(v)))
                g.name = self._names.fresh(f"{v.name or 'tokens'}_kept")
                self._axes[id(g)] = (g, axes, self._shape(v))
                gathered[id(v)] = g
            node.replace_input_with(i, gathered[id(v)])
        self._counts[id(count)] = count
        self.graph.insert_after(anchor, list(t.nodes))

    def _clone(self, t: Body, v: ir.Value, count: ir.Value, clones: dict[int, ir.Value]) -> ir.Value:
        if id(v) in clones:
            return clones[id(v)]
        if id(v) in self._counts:
            out = count if v.shape is None or len(v.shape) == 1 else t.op("Squeeze", [count])
        else:
            prod = v.producer()
            if prod is None or const_value(v) is not None:
                return v
            if is_shape(prod):
                out = self._shape_of(t, prod, count)
            else:
                memo: dict[int, bool] = {}
                ins = [self._clone(t, x, count, clones)
                       if x is not None and self._is_shape_value(x) and self._depends(x, memo) else x
                       for x in prod.inputs]
                out = t.op(prod.op_type, ins, {a.name: a for a in prod.attributes.values()}, domain=prod.domain)
            out.dtype = v.dtype
            out.name = self._names.fresh(f"{v.name or 'shape'}_tok")
        clones[id(v)] = out
        return out

    def _shape_of(self, t: Body, shape_node: ir.Node, count: ir.Value) -> ir.Value:
        """``Shape(x)[start:end]`` as ``x`` has it now: the token axes read ``count``."""
        x = shape_node.inputs[0]
        start, end = _shape_range(shape_node)
        axes = set(self.token_axes(x))
        pieces, a = [], start
        while a < end:
            if a in axes:
                pieces.append(count)
                a += 1
                continue
            b = a
            while b < end and b not in axes:
                b += 1
            pieces.append(t.op("Shape", [x], {"start": a, "end": b}))
            a = b
        return pieces[0] if len(pieces) == 1 else t.op("Concat", pieces, {"axis": 0})


def gather_tokens(t: Body, v: ir.Value, idx: ir.Value, axes: tuple[int, ...], r: int) -> ir.Value:
    """``v`` (rank ``r``) with each token axis in ``axes`` gathered at ``idx [B, K]`` (per batch row; ``v``'s
    leading axis is the batch or 1, expanded to the batch first)."""
    bdim = t.op("Shape", [idx], {"start": 0, "end": 1})
    kdim = t.op("Shape", [idx], {"start": 1, "end": 2})
    x = t.op("Expand", [v, t.op("Concat", [bdim, t.ints(*([1] * (r - 1)))], {"axis": 0})])
    for ax in axes:
        shape = t.op("Shape", [x])
        pieces = [t.op("Slice", [shape, t.ints(0), t.ints(ax)]), kdim]
        if ax + 1 < r:
            pieces.append(t.op("Slice", [shape, t.ints(ax + 1), t.ints(r)]))
        target = t.op("Concat", pieces, {"axis": 0})
        others = [a for a in range(1, r) if a != ax]
        ix = t.op("Unsqueeze", [idx, t.ints(*others)]) if others else idx  # [B, 1.., K at ax, 1..]
        x = t.op("GatherElements", [x, t.op("Expand", [ix, target])], {"axis": ax})
    return x


def _derived_from(v: ir.Value, roots: tuple[ir.Value, ...], depth: int = 8) -> bool:
    """Is ``v`` one of ``roots`` or computed from one within ``depth`` producers?"""
    stack = [(v, 0)]
    while stack:
        x, d = stack.pop()
        if any(x is r for r in roots):
            return True
        p = x.producer()
        if p is not None and d < depth:
            stack.extend((i, d + 1) for i in p.inputs if i is not None)
    return False


def _values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _shape_range(node: ir.Node) -> tuple[int, int]:
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank if rank is not None else 1 << 30)
    if rank is not None:
        start = start + rank if start < 0 else start
        end = end + rank if end < 0 else min(end, rank)
    return start, end


def _batch_like(d, batch) -> bool:
    return d == 1 or d == batch or (isinstance(d, ir.SymbolicDim) and isinstance(batch, ir.SymbolicDim)
                                     and d.value == batch.value)


__all__ = ["DynamicTokens", "gather_tokens"]
