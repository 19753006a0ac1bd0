"""Put a token-reducing node on the residual stream and keep everything downstream consistent.

``splice(graph, stream, nodes, reduced)``: every user of ``stream`` (except the new nodes) reads ``reduced``.

``plan_retarget(graph, start, n_old, n_new)`` then ``.apply()`` and ``clear_shapes``: nodes downstream of
``start`` that hard-code the token count (found by ``analysis.tokens.token_sites``) get their own copy of the
constant with ``n_old`` replaced by ``n_new``:
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

from graphprune._ir import NameScope
from graphprune.analysis.tokens import (
    ConcatShape,
    ShapeConstant,
    Site,
    SizeConstant,
    downstream_nodes,
    is_reshape,
    token_sites,
)
from graphprune.passes.base import Skip


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

    def site(self, site: Site) -> None:
        """Record the rewrite one site needs (raises :class:`Skip` when it cannot be rewritten safely)."""
        node = site.node
        if isinstance(site, ShapeConstant):
            where = f"{node.op_type} {node.name}"
            fixed = self._fix_array(site.array, where, allow_many=site.kind == "expand")
            if fixed is not None:
                hint = node.inputs[site.input_index].name or ("ends" if site.kind == "ends" else "shape")
                self.edits.append(("input", node, site.input_index, self._new_const(fixed, hint)))
        elif isinstance(site, ConcatShape):
            parts, changed = [], False
            for piece, arr in site.pieces:
                fixed = None if arr is None else self._fix_array(arr, f"Concat {site.concat.name}")
                if fixed is not None:
                    parts.append(self._new_const(fixed, piece.name or "shape"))
                    changed = True
                else:
                    parts.append(piece)
            if changed:
                self.edits.append(("concat", node, site.input_index, site.concat, parts))
        elif isinstance(site, SizeConstant):
            if np.any(site.array == self.n_old) or (site.split and int(site.array.sum()) == self.n_old):
                raise Skip(f"{node.op_type} {node.name}: a constant input holds the token count {self.n_old}; "
                           "not retargeted")
        else:
            raise Skip(f"{node.op_type} {node.name}: shape target is computed upstream by {site.producer.op_type}; "
                       "cannot retarget")

    def apply(self) -> None:
        clones: dict[int, ir.Node] = {}  # one retargeted copy per shape Concat, shared by its readers
        for edit in self.edits:
            if edit[0] == "input":
                _, node, i, val = edit
                if val.name not in self.graph.initializers:
                    self.graph.register_initializer(val)
                node.replace_input_with(i, val)
            else:
                _, node, i, concat, parts = edit
                clone = clones.get(id(concat))
                if clone is None:
                    for p in parts:
                        if p.const_value is not None and p.name not in self.graph.initializers:
                            self.graph.register_initializer(p)
                    clone = ir.Node("", "Concat", parts, concat.attributes.values(), num_outputs=1,
                                    name=f"{concat.name}_tok{self.n_new}")
                    clone.outputs[0].type = ir.TensorType(ir.DataType.INT64)
                    self.graph.insert_before(node, clone)
                    clones[id(concat)] = clone
                node.replace_input_with(i, clone.outputs[0])


def plan_retarget(graph: ir.Graph, start: ir.Value, n_old: int, n_new: int, model_dims: Iterable[int] = (),
                  exclude: set[int] = frozenset()) -> _Retarget:
    """Collect the constant rewrites downstream of ``start`` (raises before anything is changed).

    ``model_dims`` (heads, head_dim, ...) join the weight dimensions as values the token count must not equal
    for a constant holding it to be rewritten: e.g. ``[-1, H, D]`` with ``D == n_old`` folds the tokens into -1.
    """
    rt = _Retarget(graph, n_old, n_new, set())
    if n_old == n_new:
        return rt
    found = token_sites(start)
    rt.weight_dims = found.weight_dims | {int(d) for d in model_dims if d}
    for node in found.nodes:
        if id(node) not in exclude:
            _check_spatial(node, n_old)
    for site in found.sites:
        if id(site.node) not in exclude:  # e.g. past the point where ``restore`` brings the full count back
            rt.site(site)
    return rt


def _check_spatial(node: ir.Node, n: int) -> None:
    """Refuse a ``Reshape`` that splits the token axis into a grid (``[B, C, N] → [B, C, H, W]`` with H·W = N,
    as a spatial-reduction attention or a conv between blocks does): dropped tokens leave no grid."""
    if not is_reshape(node):
        return
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.shape is None or y.shape is None or n not in list(x.shape) or n in list(y.shape):
        return
    dims = [d if isinstance(d, int) else None for d in y.shape]
    for i in range(1, len(dims) - 1):
        if dims[i] and dims[i + 1] and dims[i] > 1 and dims[i + 1] > 1 and dims[i] * dims[i + 1] == n:
            raise Skip(f"Reshape {node.name}: lays the {n} tokens out as a {dims[i]}×{dims[i + 1]} grid (a spatial "
                       "op reads them: conv, spatial-reduction attention); dropped tokens leave no grid")


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
