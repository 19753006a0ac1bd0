"""Per-op channel rules for :mod:`graphprune.analysis.channels` (op-type strings live here).

Each rule reads the labels of a node's inputs and sets the labels of its outputs, recording members to slice,
shape constants to rewrite and couplings (unions). An op with a labeled input and no rule blocks the atoms.

Cases
  1. Producers: Conv (groups: each conv group unions its input and output channels; depthwise is the case of one
     input channel per group), ConvTranspose (group 1), Gemm (transB either way), MatMul with a constant 2-D
     weight, Gather from a constant embedding table. Output channels open a new space.
  2. Per-channel ops: BatchNorm, InstanceNorm, LayerNorm over the last axis only, GroupNorm (whole norm groups),
     PRelu, unary activations, pooling, Softmax/Reduce over other axes.
  3. Broadcasting ops (Add, Mul, Where, ...): operands with the full channel count are unioned position by
     position; a constant with the full channel count is a member (bias, layer scale, gate); an operand with
     one channel on that axis couples nothing. An untracked operand with the full channel count blocks.
  4. Concat (on the channel axis: labels concatenated; on another axis: unioned like a broadcast) and Gather
     on the channel axis with constant indices (rewritten).
  Layout ops (Transpose, Reshape/Flatten, Squeeze, Split, Slice, Expand, Pad, Resize) are in ``_channel_layout``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value, dim, rank
from graphprune.analysis import vocab
from graphprune.analysis._channel_core import Builder, GatherEdit, rule
from graphprune.analysis._channel_layout import _axes, _ints, _numel, _shape_edit

_UNARY, _BROADCAST, _REDUCE = vocab.UNARY, vocab.BROADCASTING, vocab.REDUCE
_POOL = vocab.POOL | vocab.GLOBAL_POOL
_SINKS = vocab.SHAPE


def _new_space(b: Builder, node: ir.Node, size: int, data: ir.Value | None, kind: str = "channels") -> np.ndarray:
    atoms = b.new_space(node, size, kind)
    if b.label(data) is None and data not in b.derived:
        b.stem_spaces.add(len(b.space_nodes) - 1)
    return atoms


def _reads_input_data(value: ir.Value, limit: int = 256) -> bool:
    """Whether ``value`` is computed from a graph input's values (token ids), not from constants and shapes only
    (position ids: a constant table, or ``arange`` over a ``Shape``)."""
    seen: set[ir.Value] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.is_graph_input():
            return True
        p = v.producer()
        if p is not None and p.op_type not in _SINKS:
            stack.extend(x for x in p.inputs if x is not None)
    return False


@rule("Conv", producer=True)
def _conv(b: Builder, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    wv = const_value(w)
    lab = b.label(x)
    if wv is None or rank(x) is None:
        b.block_value(x, f"Conv {node.name!r} has a computed weight")
        return
    if lab is not None and lab.axis != 1:
        b.block(lab.atoms, f"Conv {node.name!r} reads channels on axis {lab.axis}")
        lab = None
    g = node.attributes.get_int("group", 1)
    cout, cin_g = wv.shape[0], wv.shape[1]
    out = _new_space(b, node, cout, x, "groups" if g > 1 else "channels")
    if g == 1:
        if lab is not None:
            b.member(node, 1, 1, lab.atoms, "in")
    elif lab is None:
        b.block(out, f"grouped Conv {node.name!r} on an untracked input")
    else:
        in_g = lab.atoms.reshape(g, cin_g)
        out_g = out.reshape(g, cout // g)
        for i in range(g):
            b.union_all(np.concatenate([in_g[i], out_g[i]]))
        b.count_edit(node, None, 0, out_g, attr="group")
    b.member(node, 1, 0, out, "out")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b.member(node, 2, 0, out, "param")
    b.set_label(node.outputs[0], 1, out)
    n = _numel(node.outputs[0])
    b.cost(node, 2 * n * cin_g * int(np.prod(wv.shape[2:])) if n else None, lab.atoms if (g == 1 and lab) else None, out)


@rule("ConvTranspose", producer=True)
def _conv_transpose(b: Builder, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    wv = const_value(w)
    lab = b.label(x)
    if wv is None or node.attributes.get_int("group", 1) != 1 or (lab is not None and lab.axis != 1):
        b.block_value(x, f"ConvTranspose {node.name!r}: computed weight, groups or channels off axis 1")
        return
    out = _new_space(b, node, wv.shape[1], x)
    if lab is not None:
        b.member(node, 1, 0, lab.atoms, "in")
    b.member(node, 1, 1, out, "out")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b.member(node, 2, 0, out, "param")
    b.set_label(node.outputs[0], 1, out)
    n = _numel(x)
    b.cost(node, 2 * n * wv.shape[1] * int(np.prod(wv.shape[2:])) if n else None, lab.atoms if lab else None, out)


@rule("Gemm", producer=True)
def _gemm(b: Builder, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    wv = const_value(w)
    lab = b.label(x)
    if wv is None or wv.ndim != 2 or node.attributes.get_int("transA", 0) or (lab is not None and lab.axis != 1):
        b.block_value(x, f"Gemm {node.name!r}: computed weight or transA")
        return
    tb = node.attributes.get_int("transB", 0)
    n_out = wv.shape[0] if tb else wv.shape[1]
    out = _new_space(b, node, n_out, x)
    if lab is not None:
        b.member(node, 1, 1 if tb else 0, lab.atoms, "in")
    b.member(node, 1, 0 if tb else 1, out, "out")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_value(node.inputs[2])
        if c is not None and c.ndim >= 1 and c.shape[-1] == n_out:
            b.member(node, 2, c.ndim - 1, out, "param")
        elif c is None or (c.size != 1):
            b.block(out, f"Gemm {node.name!r}: bias does not broadcast per channel")
    b.set_label(node.outputs[0], 1, out)
    n = _numel(node.outputs[0])
    k = wv.shape[1] if tb else wv.shape[0]
    b.cost(node, 2 * n * k if n else None, lab.atoms if lab else None, out)


@rule("MatMul", producer=True)
def _matmul(b: Builder, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    wv = const_value(w)
    lab = b.label(x)
    if wv is None or wv.ndim != 2 or const_value(x) is not None:
        for v in node.inputs:
            b.block_value(v, f"MatMul {node.name!r} has no constant 2-D weight")
        return
    r = rank(x)
    if lab is not None and (r is None or lab.axis != r - 1):
        b.block(lab.atoms, f"MatMul {node.name!r} contracts axis {r and r - 1}, not the channel axis {lab.axis}")
        lab = None
    out = _new_space(b, node, wv.shape[1], x)
    if lab is not None:
        b.member(node, 1, 0, lab.atoms, "in")
    b.member(node, 1, 1, out, "out")
    ro = rank(node.outputs[0])
    b.set_label(node.outputs[0], (ro or 2) - 1, out)
    n = _numel(node.outputs[0])
    b.cost(node, 2 * n * wv.shape[0] if n else None, lab.atoms if lab else None, out)


@rule("Gather", producer=True)
def _gather(b: Builder, node: ir.Node) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    axis = node.attributes.get_int("axis", 0)
    table = const_value(data)
    if table is not None and table.ndim == 2 and axis == 0 and b.label(idx) is None:  # embedding lookup
        out = _new_space(b, node, table.shape[1], idx)
        if len(b.space_nodes) - 1 in b.stem_spaces and _reads_input_data(idx):
            b.lookup_stems.add(len(b.space_nodes) - 1)
        b.member(node, 0, 1, out, "out")
        b.set_label(node.outputs[0], (rank(node.outputs[0]) or 2) - 1, out)
        return
    lab = b.label(data)
    if lab is None:
        b.block_value(idx, f"Gather {node.name!r} uses channels as indices")
        return
    r = rank(data)
    axis = axis % r if r else axis
    ind = const_value(idx)
    if axis == lab.axis:
        if ind is None or ind.ndim != 1:
            b.block(lab.atoms, f"Gather {node.name!r} picks channels with {'computed' if ind is None else 'scalar'} indices")
            return
        ind = np.where(ind < 0, ind + len(lab.atoms), ind)
        b.gather_edits.append(GatherEdit(node, 1, lab.atoms))
        b.set_label(node.outputs[0], axis, lab.atoms[ind])
        return
    ir_rank = rank(idx)
    if ir_rank is None:
        b.block(lab.atoms, f"Gather {node.name!r}: unknown index rank")
        return
    b.set_label(node.outputs[0], lab.axis if lab.axis < axis else lab.axis - 1 + ir_rank, lab.atoms)


def _const_member(b: Builder, node: ir.Node, index: int, axis_from_end: int, atoms: np.ndarray) -> str | None:
    """An untracked operand with the full channel count: a constant (maybe Expand/Cast of one) becomes a member."""
    v = node.inputs[index]
    c = const_value(v)
    if c is not None:
        b.member(node, index, c.ndim - axis_from_end, atoms, "param")
        return None
    p = v.producer()
    if p is not None and p.op_type in ("Expand", "Cast") and p.domain == "" and const_value(p.inputs[0]) is not None:
        src = const_value(p.inputs[0])
        if src.ndim < axis_from_end or src.shape[src.ndim - axis_from_end] != len(atoms):
            return f"{v.name!r} broadcasts a constant to the channel axis"
        if any(u.node is not node for u in v.uses()):
            return f"{v.name!r} is also used elsewhere"
        if index != next(i for i, x in enumerate(node.inputs) if x is v):
            return None  # read twice by this node (one constant the exporter deduplicated): recorded at the first
        if p.op_type == "Expand":
            shp = _ints(p.inputs[1]) if const_value(p.inputs[1]) is not None else None
            if shp is None:  # Concat of pieces: check the piece at the channel axis
                r = rank(v)
                _shape_edit(b, p, 1, r - axis_from_end, len(atoms), atoms)
            else:
                _shape_edit(b, p, 1, len(shp) - axis_from_end, len(atoms), atoms)
        b.member(p, 0, src.ndim - axis_from_end, atoms, "param")
        b.shape_line(v, rank(v) - axis_from_end, atoms[:, None])
        return None
    return f"{v.name!r} ({p.op_type if p else 'graph input'}) carries untracked channels"


def _broadcast(b: Builder, node: ir.Node) -> None:
    out = node.outputs[0]
    r = rank(out)
    labeled = [(i, b.label(v)) for i, v in enumerate(node.inputs) if b.label(v) is not None]
    if r is None or any(rank(node.inputs[i]) is None for i, _ in labeled):
        for _, lab in labeled:
            b.block(lab.atoms, f"{node.op_type} {node.name!r}: unknown rank")
        return
    axes = {r - rank(node.inputs[i]) + lab.axis for i, lab in labeled}
    if len(axes) != 1:
        for _, lab in labeled:
            b.block(lab.atoms, f"{node.op_type} {node.name!r} mixes channels on different axes")
        return
    ax = axes.pop()
    c = max(len(lab.atoms) for _, lab in labeled)
    ref = next(lab.atoms for _, lab in labeled if len(lab.atoms) == c)
    if c == 1 and (dim(out, ax) or 1) > 1:  # a 1-channel tensor broadcast over many: fixed size
        b.block(ref, f"{node.op_type} {node.name!r} broadcasts a single channel")
        return
    for i, v in enumerate(node.inputs):
        if v is None:
            continue
        lab = b.label(v)
        if lab is not None:
            if len(lab.atoms) == c:
                b.union(ref, lab.atoms)
            else:
                b.block(lab.atoms, f"{node.op_type} {node.name!r} broadcasts a single channel")
            continue
        rv = rank(v)
        d = None if rv is None else (1 if ax - (r - rv) < 0 else dim(v, ax - (r - rv)))
        if d == 1:
            continue  # broadcast over channels: no coupling
        reason = "operand of unknown size" if d is None else _const_member(b, node, i, r - ax, ref)
        if reason is not None:
            b.block(ref, f"{node.op_type} {node.name!r}: {reason}")
    b.set_label(out, ax, ref)


@rule("Concat", data_first=False)
def _concat(b: Builder, node: ir.Node) -> None:
    out = node.outputs[0]
    r = rank(out)
    axis = node.attributes.get_int("axis", 0) % r if r else None
    labs = [b.label(v) for v in node.inputs]
    lab0 = next(lab for lab in labs if lab is not None)
    if axis is None or any(lab is not None and lab.axis != lab0.axis for lab in labs):
        for lab in labs:
            if lab is not None:
                b.block(lab.atoms, f"Concat {node.name!r}: channels on different axes")
        return
    if axis == lab0.axis:
        if any(lab is None for lab in labs):
            for lab in labs:
                if lab is not None:
                    b.block(lab.atoms, f"Concat {node.name!r} joins tracked and untracked channels")
            return
        b.set_label(out, axis, np.concatenate([lab.atoms for lab in labs]))
        return
    _broadcast(b, node)  # same channels in every input, joined on another axis


@rule("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")
def _norm(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lab = b.label(x)
    r = rank(x)
    op = node.op_type
    if op in ("BatchNormalization", "InstanceNormalization"):
        if lab.axis != 1:
            b.block(lab.atoms, f"{op} {node.name!r} normalizes axis 1, channels are on {lab.axis}")
            return
        for i in range(1, len(node.inputs)):
            if node.inputs[i] is not None:
                b.member(node, i, 0, lab.atoms, "bn" if (op == "BatchNormalization" and i == 1) else "param")
    elif op == "LayerNormalization":
        start = node.attributes.get_int("axis", -1) % r
        if lab.axis >= start and not (lab.axis == start == r - 1):
            b.block(lab.atoms, f"LayerNormalization {node.name!r} normalizes channels with other axes")
            return
        if lab.axis == start:
            for i in (1, 2):
                if len(node.inputs) > i and node.inputs[i] is not None:
                    b.member(node, i, 0, lab.atoms, "param")
    elif op == "GroupNormalization":
        g = node.attributes.get_int("num_groups", 0)
        if lab.axis != 1 or g <= 0 or len(lab.atoms) % g:
            b.block(lab.atoms, f"GroupNormalization {node.name!r}: channels off axis 1")
            return
        per = lab.atoms.reshape(g, -1)
        for row in per:
            b.union_all(row)
        b.count_edit(node, None, 0, per, attr="num_groups")
        for i in (1, 2):
            c = const_value(node.inputs[i])
            b.member(node, i, 0, lab.atoms if (c is not None and c.shape[0] == len(lab.atoms)) else per[:, 0], "param")
    b.set_label(node.outputs[0], lab.axis, lab.atoms)


def _axis_op(b: Builder, node: ir.Node) -> None:
    """Pooling, Softmax and reductions: fine as long as the channel axis is not the one they work on."""
    lab = b.label(node.inputs[0])
    r = rank(node.inputs[0])
    op = node.op_type
    if op in _POOL:
        if lab.axis != 1:
            b.block(lab.atoms, f"{op} {node.name!r} pools with channels on axis {lab.axis}")
            return
        b.set_label(node.outputs[0], 1, lab.atoms)
        return
    if op in ("Softmax", "LogSoftmax"):
        if node.attributes.get_int("axis", -1) % r == lab.axis:
            b.block(lab.atoms, f"{op} {node.name!r} normalizes over channels")
            return
        b.set_label(node.outputs[0], lab.axis, lab.atoms)
        return
    if op in ("ArgMax", "ArgMin"):
        axes = [node.attributes.get_int("axis", 0)]
    else:
        axes = _axes(node, 1)
    keep = node.attributes.get_int("keepdims", 1)
    if axes is None or not axes:
        if node.attributes.get_int("noop_with_empty_axes", 0) and axes == []:
            b.set_label(node.outputs[0], lab.axis, lab.atoms)
            return
        axes = list(range(r))
    axes = [x % r for x in axes]
    if lab.axis in axes:
        b.block(lab.atoms, f"{op} {node.name!r} reduces over the channel axis")
        return
    new = lab.axis if keep else lab.axis - sum(1 for x in axes if x < lab.axis)
    b.set_label(node.outputs[0], new, lab.atoms)


rule(*_BROADCAST, data_first=False)(_broadcast)
rule(*_POOL, *_REDUCE, "Softmax", "LogSoftmax")(_axis_op)


@rule(*_UNARY)
def _unary(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    b.set_label(node.outputs[0], lab.axis, lab.atoms)


@rule(*_SINKS, data_first=False)
def _sizes(b: Builder, node: ir.Node) -> None:
    """Shape / Size read only sizes, which follow the pruned tensor at run time: nothing to track."""
