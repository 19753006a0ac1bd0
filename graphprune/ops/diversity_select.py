"""``ai.graphprune::DiversitySelect``: keep ``k`` mutually diverse tokens (DivPrune: greedy max-min diversity).

Semantics (``reference`` is the definition), for ``x [B, N, C]``:
  1. the first ``protect`` tokens are always kept, first;
  2. on the other ``M = N - protect`` tokens, cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``;
  3. the first pick is the token whose nearest other token is farthest (``argmax_i min_{j≠i} d(i, j)``);
  4. each further pick maximises the distance to the nearest already-picked token
     (``argmax_j min_{s∈S} d(s, j)``, picked tokens excluded); ``ArgMax`` ties go to the lower index;
  5. ``keep_order=1`` returns the picks in original order, else in pick order.
Outputs: ``y [B, protect + k, C]``, ``indices [B, protect + k]`` (int64).

Body: one ``[B, M, C]·[B, C, M]`` similarity MatMul, then ``k - 1`` unrolled steps of
``GatherND`` (the picked row) → ``Min`` → ``ArgMax`` on ``[B, M]`` vectors, a ``OneHot`` exclusion mask, and one
row ``GatherND`` at the end. Cost ``2·B·M²·C`` for the similarity plus ``O(k·B·M)``; the unrolled loop adds
about 6 nodes per kept token, so keep ``k`` moderate at batch 1.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import DOMAIN, OpSchema, flops_rule, overload_key
from graphprune.ops._token_body import Body, build_function, node_attrs

OP = "DiversitySelect"
_EXCLUDE = 4.0  # distances are in [0, 2]; picked tokens get -4 so they are never picked again

SCHEMA = OpSchema(
    name=OP,
    inputs=("x [B, N, C]",),
    outputs=("y [B, protect + k, C]", "indices [B, protect + k] int64"),
    attributes={"k": "int ≥ 1, kept non-prefix tokens", "protect": "int, prefix tokens always kept",
                "keep_order": "int 0/1, return picks in original order"},
    shape_rule="y[1] = protect + min(k, N - protect)",
    doc=__doc__ or "",
)


def _attrs(k: int, protect: int, keep_order: bool) -> dict:
    return {"k": int(k), "protect": int(protect), "keep_order": int(bool(keep_order))}


def reference(x: np.ndarray, k: int, protect: int = 0, keep_order: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Numpy definition of DiversitySelect; returns ``(y, indices)``."""
    b, n, _ = x.shape
    m = n - protect
    k = min(k, m)
    out_idx = []
    for i in range(b):
        f = x[i, protect:].astype(np.float32)
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        d = (1.0 - f @ f.T).astype(np.float32)
        np.fill_diagonal(d, _EXCLUDE)
        first = int(np.argmax(d.min(axis=1)))
        np.fill_diagonal(d, 0.0)
        picks = [first]
        mind = d[first].copy()
        mind[first] -= _EXCLUDE
        for _ in range(k - 1):
            nxt = int(np.argmax(mind))
            picks.append(nxt)
            mind = np.minimum(mind, d[nxt])
            mind[nxt] -= _EXCLUDE
        picks = np.array(sorted(picks) if keep_order else picks, dtype=np.int64)
        out_idx.append(np.concatenate([np.arange(protect), picks + protect]))
    idx = np.stack(out_idx).astype(np.int64)
    return np.take_along_axis(x, idx[:, :, None], axis=1), idx


def make_function(k: int, protect: int = 0, keep_order: bool = True) -> ir.Function:
    """The standard-op body, unrolled for ``k`` picks (see module docstring)."""
    attrs = _attrs(k, protect, keep_order)
    t = Body()
    x = ir.Value(name="x")
    xs = t.slice_tokens(x, protect) if protect else x
    f = t.op("Div", [xs, t.op("ReduceL2", [xs, t.ints(-1)], {"keepdims": 1})])
    d = t.op("Sub", [t.const(np.float32(1.0)), t.op("MatMul", [f, t.op("Transpose", [f], {"perm": [0, 2, 1]})])])
    m_dim = t.op("Slice", [t.op("Shape", [d]), t.ints(1), t.ints(2)])
    eye = t.op("EyeLike", [t.op("ConstantOfShape", [t.op("Concat", [m_dim, m_dim], {"axis": 0})])])
    d = t.op("Mul", [d, t.op("Sub", [t.const(np.float32(1.0)), eye])])  # exact 0 on the diagonal
    d_excl = t.op("Add", [d, t.op("Mul", [eye, t.const(np.float32(_EXCLUDE))])])
    first = t.op("ArgMax", [t.op("ReduceMin", [d_excl, t.ints(2)], {"keepdims": 0})], {"axis": 1, "keepdims": 1})
    picks = [first]  # each [B, 1]
    depth = t.op("Squeeze", [m_dim])
    onoff = t.const(np.array([0.0, -_EXCLUDE], np.float32))

    def row(i: ir.Value) -> ir.Value:  # d[b, i[b], :] -> [B, M]
        return t.op("Squeeze", [t.op("GatherND", [d, t.op("Unsqueeze", [i, t.ints(2)])], {"batch_dims": 1}), t.ints(1)])

    def excluded(i: ir.Value) -> ir.Value:  # -4 at i[b], 0 elsewhere -> [B, M]
        return t.op("Squeeze", [t.op("OneHot", [i, depth, onoff], {"axis": -1}), t.ints(1)])

    mind = t.op("Add", [row(first), excluded(first)])
    for step in range(k - 1):
        nxt = t.op("ArgMax", [mind], {"axis": 1, "keepdims": 1})
        picks.append(nxt)
        if step < k - 2:
            mind = t.op("Add", [t.op("Min", [mind, row(nxt)]), excluded(nxt)])
    idx = t.op("Concat", picks, {"axis": 1}) if len(picks) > 1 else picks[0]
    if keep_order:
        idx, _ = t.op_multi_out("TopK", [idx, t.ints(k)], {"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2)
    if protect:
        idx = t.op("Add", [idx, t.ints(protect)])
        zero = t.op("Mul", [t.op("Slice", [idx, t.ints(0), t.ints(1), t.ints(1)]), t.const(0, np.int64)])
        idx = t.op("Concat", [t.op("Add", [zero, t.const(np.arange(protect, dtype=np.int64)[None, :])]), idx], {"axis": 1})
    y = t.op("GatherND", [x, t.op("Unsqueeze", [idx, t.ints(2)])], {"batch_dims": 1})
    y.name = "y"
    idx = t.op("Identity", [idx])
    idx.name = "indices"
    return build_function(t, OP, overload_key(attrs), [x], [y, idx], attrs)


def make_node(x: ir.Value, *, k: int, protect: int = 0, keep_order: bool = True, name: str | None = None) -> ir.Node:
    """A DiversitySelect node; the caller clamps ``k`` to ``N - protect`` (the body is unrolled for ``k``)."""
    attrs = _attrs(k, protect, keep_order)
    return ir.Node(DOMAIN, OP, [x], node_attrs(attrs), overload=overload_key(attrs), num_outputs=2, name=name)


def _int(d) -> int:
    return d if isinstance(d, int) else 1


@flops_rule(OP)
def flops(node: ir.Node) -> int:
    """Similarity ``2·B·M²·C`` plus the unrolled min/argmax updates ``3·B·M·k``."""
    shape = node.inputs[0].shape
    if shape is None or len(shape) != 3:
        return 0
    b, n, c = (_int(d) for d in shape)
    m = n - node.attributes.get_int("protect", 0)
    return 2 * b * m * m * c + 3 * b * m * node.attributes.get_int("k", 1)
