"""``ai.graphprune::TokenMerge``: ToMe bipartite soft matching, scatter-free.

Semantics (``TokenMerge.compute`` is the definition), for ``x [B, N, C]``, ``metric [B, N, D]``, ``size [B, N, 1]``:
  1. the first ``protect`` tokens pass through unchanged (never merged), first;
  2. the other ``M = N - protect`` tokens alternate into set A (even offsets, ``ceil(M/2)`` tokens) and set B
     (odd offsets, ``floor(M/2)``); ``r`` is clamped to ``|A|``, and to 0 when ``M < 2`` (identity);
  3. cosine similarity of A to B on ``metric``; each A token's best B match (``ArgMax``, first on ties) and
     its similarity; the ``r`` A tokens with the highest similarity (``TopK`` order) merge into their match;
  4. a merged B token is the size-weighted mean ``(x_b·s_b + Σ x_a·s_a) / (s_b + Σ s_a)``, its size the sum;
  5. output order: the original order of each output token's representative position (prefix first); a
     merged token sits where its B token was. At ``r = 0`` the op is the identity.
``size`` is optional (all ones when absent). Outputs: ``y [B, N - r, C]``, ``size_out [B, N - r, 1]``,
``indices [B, N - r]`` (int64): each output token's representative input position (itself, or the B token
that absorbed merges), used to carry per-token attention masks along. Any ``N`` (dynamic) is accepted.
Following blocks use proportional attention: ``log(size_out)`` is added to their attention logits (the pass
does that; it is not part of this op).

Body: one ``[B,|A|,D]·[B,D,|B|]`` MatMul for similarity, ReduceMax/ArgMax, one full-length ``TopK`` sort,
``GatherND(batch_dims=1)`` row gathers, and the merge as a one-hot assignment ``OneHot(dst) [B, |B|, r]``
times ``[B, r, C+1]`` (values and sizes together): no ScatterElements (unreliable with add on TensorRT).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import INT64_MAX, Attr, Body, OpDef, Port, register
from graphprune.ops._dims import Dim, cdiv, dmin

OP = "TokenMerge"


@register
class TokenMerge(OpDef):
    name = OP
    snake = "token_merge"
    doc = __doc__ or ""
    attributes = (
        Attr("r", int, 0, "tokens merged (clamped to the size of set A)", min=0),
        Attr("protect", int, 0, "prefix tokens never merged", min=0),
    )
    inputs = (Port("x", ("B", "N", "C")), Port("metric", ("B", "N", "D")),
              Port("size", ("B", "N", 1), optional=True, doc="token sizes (ones when absent)"))
    outputs = (Port("y", ("B", "N_out", "C")), Port("size_out", ("B", "N_out", 1)),
               Port("indices", ("B", "N_out"), "int64"))

    @classmethod
    def merged(cls, n, a: dict) -> Dim:
        """Tokens removed for ``n`` input tokens: ``r`` clamped to ``|A|``, and 0 when set B is empty (fewer than
        two tokens after the prefix: a short runtime sequence passes through unchanged)."""
        m = Dim.of(n) - a["protect"]
        return dmin(dmin(a["r"], cdiv(m, 2)), (m // 2) * a["r"])

    @classmethod
    def shape(cls, a: dict) -> list[tuple]:
        out = Dim.of("N") - cls.merged("N", a)
        return [("B", out, "C"), ("B", out, 1), ("B", out)]

    @classmethod
    def constraints(cls, a: dict):
        return [(Dim.of("N"), Dim.of(a["protect"]), "needs at least the protected prefix")]

    @classmethod
    def flops(cls, shapes, a: dict) -> int:
        """Similarity (2·B·|A|·|B|·D), weighting/merging (4·B·N·C + 2·B·|B|·r·(C+1)), normalisation (3·B·N·D)."""
        b, n, c = shapes[0]
        d = shapes[1][2]
        m = n - a["protect"]
        na, nb = (m + 1) // 2, m // 2
        r = cls.merged(n, a).static
        return 2 * b * na * nb * d + 4 * b * n * c + 2 * b * nb * r * (c + 1) + 3 * b * n * d

    @classmethod
    def compute(cls, xp, x, metric, size=None, **a):
        b, n, c = x.shape
        p = a["protect"]
        f64 = xp.float64
        if size is None:
            size = xp.ones((b, n, 1), dtype=x.dtype)
        r = cls.merged(n, a).static
        nb = (n - p) // 2
        if nb == 0:  # fewer than two tokens after the prefix: nothing to merge into
            return x, size, xp.broadcast_to(xp.arange(n, dtype=xp.int64)[None, :], (b, n))
        rest, srest = xp.astype(x[:, p:], f64), xp.astype(size[:, p:], f64)
        mr = xp.astype(metric[:, p:], f64)
        mr = mr / xp.sqrt(xp.sum(mr * mr, axis=-1, keepdims=True))
        ma, mb = mr[:, 0::2], mr[:, 1::2]
        sim = ma @ xp.permute_dims(mb, (0, 2, 1))  # [B, |A|, |B|]
        best, match = xp.max(sim, axis=2), xp.argmax(sim, axis=2)
        order = xp.argsort(best, axis=1, descending=True, stable=True)
        src, unm = order[:, :r], xp.sort(order[:, r:], axis=1)
        dst = xp.take_along_axis(match, src, axis=1)  # [B, r]
        xs = xp.concat([rest * srest, srest], axis=2)  # (x·s, s) travel together
        xa, xb = xs[:, 0::2], xs[:, 1::2]

        def rows(v, idx):
            return xp.take_along_axis(v, xp.broadcast_to(idx[:, :, None], (b, idx.shape[1], v.shape[2])), axis=1)

        hot = xp.astype(dst[:, None, :] == xp.arange(nb)[None, :, None], f64)  # [B, |B|, r]
        b_new = xb + hot @ rows(xa, src)
        parts = [rows(xa, unm), b_new]
        pos_parts = [2 * xp.astype(unm, xp.int64) + p,
                     xp.broadcast_to(xp.arange(nb, dtype=xp.int64)[None, :] * 2 + 1 + p, (b, nb))]
        if p:
            head = xp.astype(x[:, :p], f64)
            parts.insert(0, xp.concat([head * xp.astype(size[:, :p], f64), xp.astype(size[:, :p], f64)], axis=2))
            pos_parts.insert(0, xp.broadcast_to(xp.arange(p, dtype=xp.int64)[None, :], (b, p)))
        merged, rep = xp.concat(parts, axis=1), xp.concat(pos_parts, axis=1)
        perm = xp.argsort(rep, axis=1, stable=True)
        merged, ids = rows(merged, perm), xp.take_along_axis(rep, perm, axis=1)
        s_out = merged[:, :, c:]
        return xp.astype(merged[:, :, :c] / s_out, x.dtype), xp.astype(s_out, x.dtype), ids

    @classmethod
    def lower(cls, t: Body, inputs, a: dict, dtype: ir.DataType, static) -> list[ir.Value]:
        x, metric, size = inputs
        p = a["protect"]
        env = t.dims(cls, inputs, static)
        m = Dim.of("N") - p
        na, nb = t.count(cdiv(m, 2), env), t.count(m // 2, env)
        rr = t.count(cls.merged("N", a), env)
        n_unm = t.count(cdiv(m, 2) - cls.merged("N", a), env)
        n_out = t.count(Dim.of("N") - cls.merged("N", a), env)
        if size is None:  # ones [B, N, 1], built by broadcasting so that shape inference keeps B and N
            size = t.op("Add", [t.op("Mul", [t.slice(x, 0, 1, 2), t.lit(0.0, x)]), t.lit(1.0, x)])
        xs = t.op("Concat", [t.op("Mul", [x, size]), size], {"axis": 2})  # [B, N, C+1] holding (x·s, s)
        rest = t.slice_tokens(xs, p) if p else xs
        mrest = t.slice_tokens(metric, p) if p else metric
        mrest = t.op("Div", [mrest, t.op("ReduceL2", [mrest, t.ints(-1)], {"keepdims": 1})])

        def every_other(v, start):
            return t.op("Slice", [v, t.ints(start), t.ints(INT64_MAX), t.ints(1), t.ints(2)])

        xa, xb = every_other(rest, 0), every_other(rest, 1)
        ma, mb = every_other(mrest, 0), every_other(mrest, 1)
        sim = t.op("MatMul", [ma, t.op("Transpose", [mb], {"perm": [0, 2, 1]})])
        if not isinstance(nb, int) or nb == 0:  # set B may be empty at run time: a floor column (cosine ≥ -1) keeps
            floor = t.op("Add", [t.op("Mul", [t.slice(ma, 0, 1, 2), t.lit(0.0, sim)]), t.lit(-3.0, sim)])
            sim = t.op("Concat", [sim, floor], {"axis": 2})  # ReduceMax/ArgMax defined; never chosen (r is 0 then)
        best = t.op("ReduceMax", [sim, t.ints(2)], {"keepdims": 0})
        match = t.op("ArgMax", [sim], {"axis": 2, "keepdims": 0})
        _, order = t.op_multi_out("TopK", [t.rank(best), t.value(na)], {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)
        src = t.slice(order, 0, t.value(rr), 1)
        unm = t.slice(order, t.value(rr), INT64_MAX, 1)
        unm, _ = t.op_multi_out("TopK", [unm, t.value(n_unm)], {"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2)
        dst = t.op("GatherElements", [match, src], {"axis": 1})  # [B, r]

        def rows(v, idx):  # v[b, idx[b, j], :]
            return t.op("GatherND", [v, t.op("Unsqueeze", [idx, t.ints(2)])], {"batch_dims": 1})

        if isinstance(nb, int) and nb > 0:
            hot = t.one_hot(dst, t.scalar(nb), [0.0, 1.0], axis=1)  # [B, |B|, r]
        else:  # OneHot needs depth ≥ 1: build max(|B|, 1) rows, keep |B| (r is 0 when B is empty)
            depth = t.op("Max", [t.value(nb), t.ints(1)])
            hot = t.slice(t.one_hot(dst, t.scalar(depth), [0.0, 1.0], axis=1), 0, t.value(nb), 1)
        b_new = t.op("Add", [xb, t.op("MatMul", [hot, rows(xa, src)])])
        parts = [rows(xa, unm), b_new]
        if p:
            parts.insert(0, t.slice(xs, 0, p, 1))
        merged = t.op("Concat", parts, {"axis": 1})  # [B, N-r, C+1]
        # representative positions: prefix, 2·unm + protect, then 2·j + 1 + protect for every B token
        if isinstance(nb, int):
            b_pos = t.const(np.arange(nb, dtype=np.int64) * 2 + 1 + p)
        else:
            b_pos = t.op("Range", [t.const(0, np.int64), t.scalar(nb), t.const(1, np.int64)])
            b_pos = t.op("Add", [t.op("Mul", [b_pos, t.ints(2)]), t.ints(1 + p)])
        first = t.op("ArgMax", [t.slice(x, 0, 1, 1)], {"axis": 2, "keepdims": 0})  # [B, 1] (N ≥ 1, set A may be empty)
        zero = t.op("Mul", [first, t.const(0, np.int64)])  # [B, 1]
        b_pos = t.op("Add", [zero, t.op("Unsqueeze", [b_pos, t.ints(0)])])  # [B, |B|] by broadcasting
        ids = [t.op("Add", [t.op("Mul", [unm, t.ints(2)]), t.ints(p)]), b_pos]
        if p:
            ids.insert(0, t.op("Add", [zero, t.const(np.arange(p, dtype=np.int64)[None, :])]))
        ids = t.op("Concat", ids, {"axis": 1})
        idx, perm = t.op_multi_out("TopK", [ids, t.value(n_out)], {"axis": 1, "largest": 0, "sorted": 1},
                                   num_outputs=2)
        merged = rows(merged, perm)  # back to the original token order
        s_out = t.slice(merged, -1, INT64_MAX, 2)
        y = t.op("Div", [t.slice(merged, 0, -1, 2), s_out])
        return [y, s_out, idx]


def merged_count(n: int, protect: int, r: int) -> int:
    """Tokens removed for ``n`` input tokens (the op's shape rule, evaluated)."""
    return TokenMerge.merged(n, TokenMerge.normalize(r=r, protect=protect)).static


def reference(x: np.ndarray, metric: np.ndarray, size: np.ndarray | None = None, **attrs):
    """Numpy oracle; returns ``(y, size_out, indices)``."""
    return TokenMerge.reference(x, metric, size, **attrs)


make_node = TokenMerge.make_node
make_function = TokenMerge.make_function
