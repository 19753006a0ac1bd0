"""Put a token-reducing node on the residual stream and keep everything downstream consistent.

``splice(graph, stream, nodes, reduced)``: every user of ``stream`` (except the new nodes) reads ``reduced``.

``plan_retarget(graph, start, n_old, n_new)`` then ``.apply()`` and ``clear_shapes``: nodes downstream of ``start`` that hard-code the token count get
their own copy of the constant with ``n_old`` replaced by ``n_new``:
  1. ``Reshape`` / ``Expand`` shape from an initializer or ``Constant`` (dynamo writes ``[-1, N, 3, H, D]``);
  2. the same shape built by ``Concat`` of ``Shape`` slices and constants (the Concat is cloned per user);
  3. ``Slice`` ``ends`` equal to ``n_old`` (positional slices ``x[:, a:N]``).
Shared constants are never mutated (the exporter deduplicates them across blocks).

Refusals (:class:`~graphprune.passes.base.Skip`, nothing changed yet): a shape target downstream that is neither
constant nor computed from downstream values; ``n_old`` appearing in a target more than once where it cannot
be told apart from a model dimension (``n_old`` equal to a weight dimension); a token count held by a size
constant of ``Split``/``Tile``/``ConstantOfShape``/``Range``/``Pad``/``Resize``/``OneHot``/``TopK`` downstream.
Value shapes downstream are cleared; the pass re-runs shape inference once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graphprune._ir import NameScope, const_value
from graphprune.passes.base import Skip


def downstream_nodes(start: ir.Value) -> list[ir.Node]:
    """Nodes that (transitively) consume ``start``."""
    seen: dict[int, ir.Node] = {}
    stack = [start]
    while stack:
        v = stack.pop()
        for user, _ in v.uses():
            if id(user) not in seen:
                seen[id(user)] = user
                stack.extend(user.outputs)
    return list(seen.values())


def splice(graph: ir.Graph, stream: ir.Value, new_nodes: Iterable[ir.Node], reduced: ir.Value, anchor: ir.Node) -> None:
    """Insert ``new_nodes`` after ``anchor``; every old user of ``stream`` reads ``reduced`` instead."""
    new_nodes = list(new_nodes)
    new_ids = {id(n) for n in new_nodes}
    uses = [(u, i) for u, i in stream.uses() if id(u) not in new_ids]
    graph.insert_after(anchor, new_nodes)
    for user, i in uses:
        user.replace_input_with(i, reduced)
    for j, out in enumerate(graph.outputs):
        if out is stream:
            graph.outputs[j] = reduced


class _Retarget:
    def __init__(self, graph: ir.Graph, n_old: int, n_new: int, weight_dims: set[int]) -> None:
        self.graph, self.n_old, self.n_new, self.weight_dims = graph, n_old, n_new, weight_dims
        self.edits: list = []
        self._consts: dict[tuple, ir.Value] = {}
        self._names = NameScope(graph)

    def _new_const(self, arr: np.ndarray, hint: str) -> ir.Value:
        key = (arr.shape, tuple(arr.reshape(-1).tolist()))
        if key in self._consts:  # one new constant per distinct value, shared by the users that need it
            return self._consts[key]
        val = self._names.initializer(f"{hint}_tok{self.n_new}", arr.astype(np.int64), register=False)
        self._consts[key] = val
        return val

    def _fix_array(self, arr: np.ndarray, where: str, allow_many: bool = False) -> np.ndarray | None:
        hits = int(np.sum(arr == self.n_old))
        if hits == 0:
            return None
        if self.n_old in self.weight_dims or (hits > 1 and not allow_many):
            raise Skip(
                f"{where}: token count {self.n_old} also appears as a model dimension; cannot tell the token axis")
        out = arr.copy()
        out[arr == self.n_old] = self.n_new
        return out

    def shape_input(self, node: ir.Node, i: int, down: set[int]) -> None:
        val = node.inputs[i]
        arr = const_value(val)
        if arr is not None:
            fixed = self._fix_array(np.asarray(arr), f"{node.op_type} {node.name}", allow_many=node.op_type == "Expand")
            if fixed is not None:
                self.edits.append(("input", node, i, self._new_const(fixed, val.name or "shape")))
            return
        prod = val.producer()
        if prod is None or id(prod) in down:
            return  # a graph input or computed from reduced values: already right
        if prod.op_type != "Concat":
            if _depends_only_on_shapes_of_downstream(prod, down):
                return
            raise Skip(f"{node.op_type} {node.name}: shape target is computed upstream by {prod.op_type}; cannot retarget")
        parts, changed = [], False
        for part in prod.inputs:
            parr = const_value(part)
            fixed = None if parr is None else self._fix_array(np.asarray(parr), f"Concat {prod.name}")
            if fixed is not None:
                parts.append(self._new_const(fixed, part.name or "shape"))
                changed = True
            else:
                parts.append(part)
        if changed:
            self.edits.append(("concat", node, i, prod, parts))

    def slice_ends(self, node: ir.Node) -> None:
        if len(node.inputs) < 3:
            return
        arr = const_value(node.inputs[2])
        if arr is None:
            return
        fixed = self._fix_array(np.asarray(arr), f"Slice {node.name}")
        if fixed is not None:
            self.edits.append(("input", node, 2, self._new_const(fixed, node.inputs[2].name or "ends")))

    def apply(self) -> None:
        for edit in self.edits:
            if edit[0] == "input":
                _, node, i, val = edit
                if val.name not in self.graph.initializers:
                    self.graph.register_initializer(val)
                node.replace_input_with(i, val)
            else:
                _, node, i, concat, parts = edit
                for p in parts:
                    if p.const_value is not None and p.name not in self.graph.initializers:
                        self.graph.register_initializer(p)
                clone = ir.Node("", "Concat", parts, concat.attributes.values(), num_outputs=1,
                                name=f"{concat.name}_tok{self.n_new}")
                clone.outputs[0].type = ir.TensorType(ir.DataType.INT64)
                self.graph.insert_before(node, clone)
                node.replace_input_with(i, clone.outputs[0])


def _depends_only_on_shapes_of_downstream(node: ir.Node, down: set[int]) -> bool:
    """True when ``node`` computes from ``Shape`` of downstream values and constants only."""
    stack, steps = [node], 0
    while stack and steps < 64:
        n = stack.pop()
        steps += 1
        if id(n) in down:
            continue
        if n.op_type == "Constant":
            continue
        for v in n.inputs:
            if v is None or const_value(v) is not None:
                continue
            p = v.producer()
            if p is None:
                return False
            stack.append(p)
    return not stack


def weight_dims(nodes: Iterable[ir.Node]) -> set[int]:
    """Dimensions of weight initializers (rank ≥ 2) used by ``nodes``."""
    dims: set[int] = set()
    for n in nodes:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        for v in n.inputs:
            if v is not None and v.const_value is not None and len(v.const_value.shape) >= 2:
                dims.update(int(d) for d in v.const_value.shape.numpy())
    return dims


def plan_retarget(graph: ir.Graph, start: ir.Value, n_old: int, n_new: int, model_dims: Iterable[int] = ()) -> _Retarget:
    """Collect the constant rewrites downstream of ``start`` (raises before anything is changed).

    ``model_dims`` (heads, head_dim, ...) join the weight dimensions as values the token count must not equal
    for a constant holding it to be rewritten: e.g. ``[-1, H, D]`` with ``D == n_old`` folds the tokens into -1.
    """
    rt = _Retarget(graph, n_old, n_new, set())
    if n_old == n_new:
        return rt
    nodes = downstream_nodes(start)
    down = {id(n) for n in nodes}
    rt.weight_dims = weight_dims(nodes) | {int(d) for d in model_dims if d}
    for node in nodes:
        if node.domain != "":
            continue
        if node.op_type in ("Reshape", "Expand") and len(node.inputs) > 1:
            rt.shape_input(node, 1, down)
        elif node.op_type == "Slice":
            rt.slice_ends(node)
        elif node.op_type in _SIZE_OPS:
            for v in node.inputs[1:]:
                arr = const_value(v)
                arr = None if arr is None else np.asarray(arr)
                if arr is None or not np.issubdtype(arr.dtype, np.integer):
                    continue
                if np.any(arr == n_old) or (node.op_type == "Split" and int(arr.sum()) == n_old):
                    raise Skip(
                        f"{node.op_type} {node.name}: a constant input holds the token count {n_old}; not retargeted")
    return rt


#: Ops whose integer constant inputs are sizes; a token count there is refused rather than guessed.
_SIZE_OPS = {"Split", "Tile", "ConstantOfShape", "Range", "Pad", "Resize", "OneHot", "TopK"}


def clear_shapes(start: ir.Value) -> None:
    """Forget the static shapes of values downstream of ``start`` (the caller re-runs shape inference).

    Shapes are not patched by value: a token count can equal another dimension (10 tokens, 10 classes).
    """
    for node in downstream_nodes(start):
        for out in node.outputs:
            out.shape = None


def detach(nodes: Iterable[ir.Node]) -> None:
    """Drop the inputs of nodes that were built but will not be inserted (their uses would dangle)."""
    for node in nodes:
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)


def gather_mask(t, mask: ir.Value, idx: ir.Value, rows: bool) -> ir.Value:
    """``mask[b, :, idx[b]][:, :, :, idx[b]]`` for an additive mask ``[B|1, H|1, Nq, Nk]`` and indices ``[B, K]``.

    Built on tape ``t`` with dynamic shapes only (no token-count constants). ``rows=False`` for masks whose
    query axis is broadcast (size 1), such as key-padding biases ``[B, 1, 1, N]``.
    """
    bdim = t.op("Slice", [t.op("Shape", [idx]), t.ints(0), t.ints(1)])
    kdim = t.op("Slice", [t.op("Shape", [idx]), t.ints(1), t.ints(2)])
    m = t.op("Expand", [mask, t.op("Concat", [bdim, t.ints(1, 1, 1)], {"axis": 0})])
    mshape = t.op("Shape", [m])
    cols = t.op("Unsqueeze", [idx, t.ints(1, 2)])  # [B, 1, 1, K]
    cols = t.op("Expand", [cols, t.op("Concat", [t.op("Slice", [mshape, t.ints(0), t.ints(3)]), kdim], {"axis": 0})])
    m = t.op("GatherElements", [m, cols], {"axis": 3})
    if rows:
        r = t.op("Unsqueeze", [idx, t.ints(1, 3)])  # [B, 1, K, 1]
        shape = t.op("Concat", [t.op("Slice", [mshape, t.ints(0), t.ints(2)]), kdim, kdim], {"axis": 0})
        m = t.op("GatherElements", [m, t.op("Expand", [r, shape])], {"axis": 2})
    return m
