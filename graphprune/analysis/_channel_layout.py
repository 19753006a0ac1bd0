"""Layout rules for :mod:`graphprune.analysis.channels`: channels moved, cut or reshaped, never mixed.

Cases
  1. Transpose, Squeeze/Unsqueeze: the channel axis moves.
  2. Reshape/Flatten that keep the channel axis, or merge it with the static axes after it (channel-major:
     Flatten→Gemm sees channel × spatial blocks); the target entry is rewritten (0 and -1 need nothing). The axes
     before the channel may merge or split (GPT-2's ``[B, N, C] ↔ [B·N, C]``: a ``seq*batch`` symbol is its factors).
  3. Split / Slice (step 1) on the channel axis with constant sizes / bounds, which are rewritten.
  4. Expand / Tile with channel factor 1 (Expand may also name the channel count, rewritten), Pad without
     channel padding, Resize with channel scale 1.
Also the shared helpers: ranks, constant ints, and ``const_slot`` (where a shape entry is stored).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value, dim, rank
from graphprune.analysis._channel_core import Builder, rule, static_shape


def _ints(v: ir.Value | None) -> list[int] | None:
    c = const_value(v)
    return None if c is None else [int(x) for x in np.asarray(c).ravel()]


def _axes(node: ir.Node, index: int, attr: str = "axes") -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        return _ints(node.inputs[index])
    a = node.attributes.get(attr)
    return list(a.value) if a is not None else None


def _numel(v: ir.Value | None) -> int | None:
    s = static_shape(v)
    return None if s is None else int(math.prod(s))


def const_slot(node: ir.Node, index: int, pos: int) -> tuple[ir.Node, int, int] | str:
    """Where entry ``pos`` of the 1-D shape input ``index`` of ``node`` is stored as a constant, or a reason."""
    v = node.inputs[index] if len(node.inputs) > index else None
    if v is None:
        return "missing shape input"
    if const_value(v) is not None:
        return (node, index, pos)
    p = v.producer()
    if p is not None and p.op_type == "Concat" and p.domain == "":
        off = 0
        for j, piece in enumerate(p.inputs):
            n = dim(piece, 0) if rank(piece) == 1 else (1 if rank(piece) == 0 else None)
            if n is None:
                return f"shape piece {piece.name!r} has unknown length"
            if off <= pos < off + n:
                return const_slot(p, j, pos - off)
            off += n
    return f"channel count in {v.name!r} is computed by {p.op_type if p else 'a graph input'}, not a constant"


def _shape_edit(b: Builder, node: ir.Node, index: int, pos: int, expected: int, lines: np.ndarray) -> None:
    """Rewrite entry ``pos`` of shape input ``index`` (expected value ``expected``; 0/-1 need no rewrite)."""
    slot = const_slot(node, index, pos)
    if isinstance(slot, str):
        b.block(lines, f"{node.op_type} {node.name!r}: {slot}")
        return
    snode, sidx, spos = slot
    cur = int(np.asarray(const_value(snode.inputs[sidx])).ravel()[spos])
    if cur in (-1, 0) and node.op_type == "Reshape":
        return
    if node.op_type == "Expand" and cur == 1:
        return
    if cur != expected:
        b.block(lines, f"{node.op_type} {node.name!r}: shape entry {cur} is not the channel count {expected}")
        return
    b.count_edit(snode, sidx, spos, lines)


@rule("Expand", "Tile")
def _expand_like(b: Builder, node: ir.Node) -> None:
    """Expand / Tile of a labeled tensor: the channel factor must stay 1 (Tile) or the size C (Expand)."""
    lab = b.label(node.inputs[0])
    r_in, r_out = rank(node.inputs[0]), rank(node.outputs[0])
    if r_in is None or r_out is None:
        b.block(lab.atoms, f"{node.op_type} {node.name!r}: unknown rank")
        return
    ax = lab.axis + r_out - r_in
    if node.op_type == "Tile":
        reps = _ints(node.inputs[1])
        if reps is None or reps[lab.axis] != 1:
            b.block(lab.atoms, f"Tile {node.name!r} repeats channels")
            return
    else:
        length = dim(node.inputs[1], 0)
        if length is None or ax - (r_out - length) < 0:
            b.block(lab.atoms, f"Expand {node.name!r}: unknown target length")
            return
        _shape_edit(b, node, 1, ax - (r_out - length), len(lab.atoms), lab.atoms)
    b.set_label(node.outputs[0], ax, lab.atoms)


@rule("Split")
def _split(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    r = rank(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % r
    if axis != lab.axis:
        for o in node.outputs:
            b.set_label(o, lab.axis, lab.atoms)
        return
    given = len(node.inputs) > 1 and node.inputs[1] is not None
    sizes = _ints(node.inputs[1]) if given else None
    base = None
    if not given:  # equal split (num_outputs): the rewrite adds explicit sizes
        n = len(node.outputs)
        if len(lab.atoms) % n:
            b.block(lab.atoms, f"Split {node.name!r}: {len(lab.atoms)} channels do not split evenly in {n}")
            return
        sizes = base = [len(lab.atoms) // n] * n
    if sizes is None:
        b.block(lab.atoms, f"Split {node.name!r} on the channel axis with computed sizes")
        return
    off = 0
    for k, (o, s) in enumerate(zip(node.outputs, sizes, strict=True)):
        piece = lab.atoms[off: off + s]
        b.count_edit(node, 1, k, piece, base=base)
        b.set_label(o, axis, piece)
        off += s


@rule("Slice")
def _slice(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    r = rank(node.inputs[0])
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts or [])))
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(axes or [])
    if None in (starts, ends, axes, steps) or r is None:
        b.block(lab.atoms, f"Slice {node.name!r} with computed bounds")
        return
    axes = [a % r for a in axes]
    if lab.axis not in axes:
        b.set_label(node.outputs[0], lab.axis, lab.atoms)
        return
    k = axes.index(lab.axis)
    n = len(lab.atoms)
    if steps[k] != 1:
        b.block(lab.atoms, f"Slice {node.name!r} strides over channels")
        return
    s, e = (min(max(x + n if x < 0 else x, 0), n) for x in (starts[k], ends[k]))
    if s > 0:
        b.count_edit(node, 1, k, lab.atoms[:s], always=True)
    if e < n:
        b.count_edit(node, 2, k, lab.atoms[:e], always=True)
    b.set_label(node.outputs[0], lab.axis, lab.atoms[s:e])


_UNNAMED = itertools.count()


def _dims(v: ir.Value) -> list | None:
    return None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]


def _prod(dims: list) -> tuple[int, tuple]:
    """Product of ``dims``: the static part, and the symbolic factors (a product symbol the exporter writes for
    merged axes, ``"seq*batch"``, counts as its factors; an unnamed dim never equals another)."""
    p, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            p *= d
        elif d == "None":
            syms.append(f"?{next(_UNNAMED)}")
        else:
            syms.extend(f.strip() for f in d.split("*"))
    return p, tuple(sorted(syms))


def _group_norm(b: Builder, node: ir.Node) -> bool:
    """GroupNorm as exported: Reshape(x, [0, G, -1]) → InstanceNormalization → Reshape(·, Shape(x)) (→ Mul γ,
    Add β, handled as broadcasts). Each norm group becomes one unit; the target's G is rewritten."""
    lab = b.label(node.inputs[0])
    users = [u for u, _ in node.outputs[0].uses()]
    if lab.axis != 1 or rank(node.outputs[0]) != 3 or len(users) != 1 or users[0].op_type != "InstanceNormalization":
        return False
    back = [u for u, _ in users[0].outputs[0].uses()]
    shp = back[0].inputs[1].producer() if len(back) == 1 and back[0].op_type == "Reshape" else None
    if shp is None or shp.op_type != "Shape" or shp.inputs[0] is not node.inputs[0]:
        return False
    g, c = dim(node.outputs[0], 1), len(lab.atoms)
    if not g or c % g:
        return False
    per = lab.atoms.reshape(g, c // g)
    for row in per:
        b.union_all(row)
    _shape_edit(b, node, 1, 1, g, per)
    b.set_label(node.outputs[0], 1, per[:, 0])
    b.restore[back[0]] = lab
    return True


@rule("Reshape", "Flatten")
def _reshape(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    if node in b.restore:
        restored = b.restore[node]
        b.set_label(node.outputs[0], restored.axis, restored.atoms)
        return
    if node.op_type == "Reshape" and _group_norm(b, node):
        return
    src, dst = _dims(node.inputs[0]), _dims(node.outputs[0])
    if src is None or dst is None:
        b.block(lab.atoms, f"{node.op_type} {node.name!r}: unknown shapes")
        return
    a, c = lab.axis, len(lab.atoms)
    inner, inner_syms = _prod(src[a + 1:])
    before = _prod(src[:a])
    for j in range(len(dst)):
        if _prod(dst[:j]) != before or not isinstance(dst[j], int):
            continue
        tail = _prod(dst[j + 1:])
        if inner_syms:
            break
        if dst[j] == c and tail == (inner, ()):
            atoms = lab.atoms
        elif dst[j] == c * inner and tail == (1, ()):
            atoms = np.repeat(lab.atoms, inner)  # channel-major flatten: channel × spatial blocks
        else:
            continue
        if node.op_type == "Reshape":
            _shape_edit(b, node, 1, j, dst[j], atoms)
        elif node.op_type == "Flatten" and not (node.attributes.get_int("axis", 1) % len(src) <= a and j == 1):
            break
        b.set_label(node.outputs[0], j, atoms)
        return
    b.block(lab.atoms, f"{node.op_type} {node.name!r} mixes the channel axis with other axes")


@rule("Transpose")
def _transpose(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    r = rank(node.inputs[0])
    perm = list(node.attributes.get_ints("perm", list(range(r - 1, -1, -1)) if r else []))
    b.set_label(node.outputs[0], perm.index(lab.axis), lab.atoms)


@rule("Squeeze", "Unsqueeze")
def _squeeze(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    r_in, r_out = rank(node.inputs[0]), rank(node.outputs[0])
    axes = _axes(node, 1)
    if r_in is None or r_out is None or (axes is None and node.op_type == "Unsqueeze"):
        b.block(lab.atoms, f"{node.op_type} {node.name!r}: unknown axes")
        return
    if node.op_type == "Squeeze":
        if axes is None:
            axes = [i for i in range(r_in) if dim(node.inputs[0], i) == 1]
        axes = [x % r_in for x in axes]
        if lab.axis in axes:
            b.block(lab.atoms, f"Squeeze {node.name!r} removes the channel axis")
            return
        new = lab.axis - sum(1 for x in axes if x < lab.axis)
    else:
        axes = sorted(x % r_out for x in axes)
        kept = [i for i in range(r_out) if i not in axes]
        new = kept[lab.axis]
    b.set_label(node.outputs[0], new, lab.atoms)


@rule("Pad")
def _pad(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    r = rank(node.inputs[0])
    pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = _axes(node, 3) or list(range(r))
    axes = [x % r for x in axes]
    if pads is None:
        b.block(lab.atoms, f"Pad {node.name!r} with computed pads")
        return
    if lab.axis in axes:
        k = axes.index(lab.axis)
        if pads[k] or pads[k + len(axes)]:
            b.block(lab.atoms, f"Pad {node.name!r} pads channels")
            return
    b.set_label(node.outputs[0], lab.axis, lab.atoms)


@rule("Resize")
def _resize(b: Builder, node: ir.Node) -> None:
    lab = b.label(node.inputs[0])
    scales = _ints(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    sc = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if sc is not None and sc.size and float(np.asarray(sc).ravel()[lab.axis]) == 1.0:
        b.set_label(node.outputs[0], lab.axis, lab.atoms)
        return
    if len(node.inputs) > 3 and node.inputs[3] is not None and scales is None:
        _shape_edit(b, node, 3, lab.axis, len(lab.atoms), lab.atoms)
        b.set_label(node.outputs[0], lab.axis, lab.atoms)
        return
    b.block(lab.atoms, f"Resize {node.name!r} scales channels")
