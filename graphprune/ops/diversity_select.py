"""``ai.graphprune::DiversitySelect``: keep ``k`` mutually diverse tokens (DivPrune: greedy max-min diversity).

Semantics (``DiversitySelect.compute`` is the definition), for ``x [B, N, C]``:
  1. the first ``protect`` tokens are always kept, first;
  2. on the other ``M = N - protect`` tokens (``M >= k``), cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``,
     exactly 0 on the diagonal;
  3. the first pick is the token whose nearest other token is farthest (``argmax_i min_{j≠i} d(i, j)``);
  4. each further pick maximises the distance to the nearest already-picked token
     (``argmax_j min_{s∈S} d(s, j)``, picked tokens excluded); ``ArgMax`` ties go to the lower index;
  5. ``keep_order=1`` returns the picks in original order, else in pick order.
Outputs: ``y [B, protect + k, C]``, ``indices [B, protect + k]`` (int64). Any ``N >= protect + k``.

Body: one ``[B, M, C]·[B, C, M]`` similarity MatMul, then ``k - 1`` unrolled steps of
``GatherND`` (the picked row) → ``Min`` → ``ArgMax`` on ``[B, M]`` vectors, a ``OneHot`` exclusion mask, and one
row ``GatherND`` at the end. Cost ``2·B·M²·C`` for the similarity plus ``O(k·B·M)``; the unrolled loop adds
about 6 nodes per kept token, so keep ``k`` moderate at batch 1.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import Attr, Body, OpDef, Port, register
from graphprune.ops._dims import Dim

OP = "DiversitySelect"
_EXCLUDE = 4.0  # distances are in [0, 2]; picked tokens get -4 so they are never picked again


@register
class DiversitySelect(OpDef):
    name = OP
    snake = "diversity_select"
    doc = __doc__ or ""
    attributes = (
        Attr("k", int, 1, "kept non-prefix tokens (the body is unrolled for k)", min=1),
        Attr("protect", int, 0, "prefix tokens always kept", min=0),
        Attr("keep_order", bool, True, "return picks in original order"),
    )
    inputs = (Port("x", ("B", "N", "C")),)
    outputs = (Port("y", ("B", "N_keep", "C")), Port("indices", ("B", "N_keep"), "int64"))

    @classmethod
    def shape(cls, a: dict) -> list[tuple]:
        keep = a["protect"] + a["k"]
        return [("B", keep, "C"), ("B", keep)]

    @classmethod
    def constraints(cls, a: dict):
        return [(Dim.of("N"), Dim.of(a["protect"] + a["k"]), "needs k tokens after the protected prefix")]

    @classmethod
    def flops(cls, shapes, a: dict) -> int:
        """Similarity ``2·B·M²·C`` plus the unrolled min/argmax updates ``3·B·M·k``."""
        b, n, c = shapes[0]
        m = n - a["protect"]
        return 2 * b * m * m * c + 3 * b * m * a["k"]

    @classmethod
    def compute(cls, xp, x, **a):
        b, n, c = x.shape
        p, k = a["protect"], a["k"]
        m = n - p
        f = xp.astype(x[:, p:], xp.float64)
        f = f / xp.sqrt(xp.sum(f * f, axis=-1, keepdims=True))
        eye = xp.eye(m, dtype=xp.float64)
        d = (1.0 - f @ xp.permute_dims(f, (0, 2, 1))) * (1.0 - eye)
        first = xp.argmax(xp.min(d + _EXCLUDE * eye, axis=2), axis=1)
        ar = xp.arange(m)

        def row(i):  # d[b, i[b], :]
            return xp.take_along_axis(d, xp.broadcast_to(i[:, None, None], (b, 1, m)), axis=1)[:, 0]

        def excluded(i):
            return xp.astype(i[:, None] == ar[None, :], xp.float64) * -_EXCLUDE

        picks = [first]
        mind = row(first) + excluded(first)
        for _ in range(k - 1):
            nxt = xp.argmax(mind, axis=1)
            picks.append(nxt)
            mind = xp.minimum(mind, row(nxt)) + excluded(nxt)
        idx = xp.astype(xp.stack(picks, axis=1), xp.int64)
        if a["keep_order"]:
            idx = xp.sort(idx, axis=1)
        pre = xp.broadcast_to(xp.arange(p, dtype=xp.int64)[None, :], (b, p))
        idx = xp.concat([pre, idx + p], axis=1)
        y = xp.take_along_axis(x, xp.broadcast_to(idx[:, :, None], (b, idx.shape[1], c)), axis=1)
        return y, idx

    @classmethod
    def lower(cls, t: Body, inputs, a: dict, dtype: ir.DataType, static) -> list[ir.Value]:
        (x,) = inputs
        p, k = a["protect"], a["k"]
        env = t.dims(cls, inputs, static)
        xs = t.slice_tokens(x, p) if p else x
        f = t.op("Div", [xs, t.op("ReduceL2", [xs, t.ints(-1)], {"keepdims": 1})])
        d = t.op("Sub", [t.lit(1.0, x), t.op("MatMul", [f, t.op("Transpose", [f], {"perm": [0, 2, 1]})])])
        m = t.value(t.count(Dim.of("N") - p, env))
        eye = t.op("EyeLike", [t.op("ConstantOfShape", [t.op("Concat", [m, m], {"axis": 0}), ])])
        eye = t.op("CastLike", [eye, x])
        d = t.op("Mul", [d, t.op("Sub", [t.lit(1.0, x), eye])])  # exact 0 on the diagonal
        d_excl = t.op("Add", [d, t.op("Mul", [eye, t.lit(_EXCLUDE, x)])])
        first = t.op("ArgMax", [t.op("ReduceMin", [d_excl, t.ints(2)], {"keepdims": 0})], {"axis": 1, "keepdims": 1})
        picks = [first]  # each [B, 1]
        depth = t.scalar(m)

        def row(i: ir.Value) -> ir.Value:  # d[b, i[b], :] -> [B, M]
            return t.op("Squeeze", [t.op("GatherND", [d, t.op("Unsqueeze", [i, t.ints(2)])], {"batch_dims": 1}),
                                    t.ints(1)])

        def excluded(i: ir.Value) -> ir.Value:  # -4 at i[b], 0 elsewhere -> [B, M]
            return t.op("Squeeze", [t.one_hot(i, depth, [0.0, -_EXCLUDE], axis=-1), t.ints(1)])

        mind = t.op("Add", [row(first), excluded(first)])
        for step in range(k - 1):
            nxt = t.op("ArgMax", [mind], {"axis": 1, "keepdims": 1})
            picks.append(nxt)
            if step < k - 2:
                mind = t.op("Add", [t.op("Min", [mind, row(nxt)]), excluded(nxt)])
        idx = t.op("Concat", picks, {"axis": 1}) if len(picks) > 1 else picks[0]
        if a["keep_order"]:
            idx, _ = t.op_multi_out("TopK", [idx, t.ints(k)], {"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2)
        if p:
            idx = t.op("Add", [idx, t.ints(p)])
            zero = t.op("Mul", [t.slice(idx, 0, 1, 1), t.const(0, np.int64)])
            idx = t.op("Concat", [t.op("Add", [zero, t.const(np.arange(p, dtype=np.int64)[None, :])]), idx],
                       {"axis": 1})
        y = t.op("GatherND", [x, t.op("Unsqueeze", [idx, t.ints(2)])], {"batch_dims": 1})
        return [y, idx]


def reference(x: np.ndarray, **attrs) -> tuple[np.ndarray, np.ndarray]:
    """Numpy oracle; returns ``(y, indices)``."""
    return DiversitySelect.reference(x, **attrs)


make_node = DiversitySelect.make_node
make_function = DiversitySelect.make_function
