"""``ai.graphprune::TokenMerge``: ToMe bipartite soft matching, scatter-free.

Semantics (``reference`` is the definition), for ``x [B, N, C]``, ``metric [B, N, D]``, ``size [B, N, 1]``:
  1. the first ``protect`` tokens pass through unchanged (never merged), first;
  2. the other tokens alternate into set A (even offsets) and set B (odd offsets);
     ``r`` is clamped to ``|A|``;
  3. cosine similarity of A to B on ``metric``; each A token's best B match (``ArgMax``, first on ties) and
     its similarity; the ``r`` A tokens with the highest similarity (``TopK`` order) merge into their match;
  4. a merged B token is the size-weighted mean ``(x_b·s_b + Σ x_a·s_a) / (s_b + Σ s_a)``, its size the sum;
  5. output order: the original order of each output token's representative position (prefix first); a
     merged token sits where its B token was. At ``r = 0`` the op is the identity.
``size`` is optional (all ones when absent). Outputs: ``y [B, N - r, C]``, ``size_out [B, N - r, 1]``,
``indices [B, N - r]`` (int64): each output token's representative input position (itself, or the B token
that absorbed merges), used to carry per-token attention masks along.
Following blocks use proportional attention: ``log(size_out)`` is added to their attention logits (the pass
does that; it is not part of this op).

Body: one ``[B,|A|,D]·[B,D,|B|]`` MatMul for similarity, ReduceMax/ArgMax, one full-length ``TopK`` sort,
``GatherND(batch_dims=1)`` row gathers, and the merge as a one-hot assignment ``OneHot(dst) [B, |B|, r]``
times ``[B, r, C+1]`` (values and sizes together): no ScatterElements (unreliable with add on TensorRT).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import DOMAIN, OpSchema, flops_rule, overload_key
from graphprune.ops._token_body import Body, build_function, node_attrs

OP = "TokenMerge"

SCHEMA = OpSchema(
    name=OP,
    inputs=("x [B, N, C]", "metric [B, N, D]", "size [B, N, 1] (optional)"),
    outputs=("y [B, N - r, C]", "size_out [B, N - r, 1]", "indices [B, N - r] int64"),
    attributes={"r": "int, tokens merged (clamped to the size of set A)", "protect": "int, prefix tokens never merged",
                "has_size": "int 0/1, whether the size input is given", "n": "int, input token count the body is specialised to (0: any)"},
    shape_rule="y[1] = N - min(r, ceil((N - protect) / 2))",
    doc=__doc__ or "",
)


def merged_count(n: int, protect: int, r: int) -> int:
    """Tokens removed for ``n`` input tokens."""
    return max(0, min(r, (n - protect + 1) // 2))


def reference(x: np.ndarray, metric: np.ndarray, size: np.ndarray | None = None, r: int = 0,
              protect: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy definition of TokenMerge; returns ``(y, size_out, indices)``."""
    b, n, c = x.shape
    if size is None:
        size = np.ones((b, n, 1), dtype=x.dtype)
    r = merged_count(n, protect, r)
    rest, srest, mrest = x[:, protect:], size[:, protect:], metric[:, protect:].astype(np.float64)
    mrest = mrest / np.linalg.norm(mrest, axis=-1, keepdims=True)
    ma, mb = mrest[:, 0::2], mrest[:, 1::2]
    xa, xb, sa, sb = rest[:, 0::2], rest[:, 1::2], srest[:, 0::2], srest[:, 1::2]
    ys, ss, ids = [], [], []
    pos = np.arange(n - protect) + protect
    pa, pb = pos[0::2], pos[1::2]
    for i in range(b):
        sim = ma[i] @ mb[i].T
        best, match = sim.max(axis=1), sim.argmax(axis=1)
        order = np.argsort(-best, kind="stable")
        src, unm = order[:r], np.sort(order[r:])
        acc = xb[i].astype(np.float64) * sb[i]
        acc_s = sb[i].astype(np.float64).copy()
        for a in src:
            acc[match[a]] += xa[i, a] * sa[i, a]
            acc_s[match[a]] += sa[i, a]
        rep = np.concatenate([np.arange(protect), pa[unm], pb]).astype(np.int64)
        perm = np.argsort(rep, kind="stable")
        ys.append(np.concatenate([x[i, :protect], xa[i, unm], (acc / acc_s).astype(x.dtype)], axis=0)[perm])
        ss.append(np.concatenate([size[i, :protect], sa[i, unm], acc_s.astype(x.dtype)], axis=0)[perm])
        ids.append(rep[perm])
    return np.stack(ys), np.stack(ss), np.stack(ids)


def _batched_gather(t: Body, data: ir.Value, idx: ir.Value) -> ir.Value:
    """``data[b, idx[b, j], :]`` for [B, N, C] data and [B, K] indices (GatherND, batch_dims=1)."""
    return t.op("GatherND", [data, t.op("Unsqueeze", [idx, t.ints(2)])], {"batch_dims": 1})


def _attrs(r: int, protect: int, has_size: bool, n: int) -> dict:
    return {"r": int(r), "protect": int(protect), "has_size": int(bool(has_size)), "n": int(n)}


def make_function(r: int, protect: int = 0, has_size: bool = True, n: int = 0) -> ir.Function:
    """The standard-op body for one ``(r, protect, has_size, n)``.

    ``n > 0`` specialises the body to ``n`` input tokens: the set sizes become constants, so ONNX shape
    inference (and FLOPs counting) sees static token counts. ``n = 0`` works for any ``N``.
    """
    attrs = _attrs(r, protect, has_size, n)
    t = Body()
    x, metric, size = ir.Value(name="x"), ir.Value(name="metric"), ir.Value(name="size")
    if not has_size:
        # ones [B, N, 1], built by broadcasting so that shape inference keeps B and N
        size = t.op("Add", [t.op("Mul", [t.op("Slice", [x, t.ints(0), t.ints(1), t.ints(2)]), t.const(np.float32(0.0))]),
                            t.const(np.float32(1.0))])
    # values and sizes travel together: [B, N, C+1] holding (x·s, s)
    xs = t.op("Concat", [t.op("Mul", [x, size]), size], {"axis": 2})
    big = np.iinfo(np.int64).max
    rest = t.slice_tokens(xs, protect) if protect else xs
    mrest = t.slice_tokens(metric, protect) if protect else metric
    mrest = t.op("Div", [mrest, t.op("ReduceL2", [mrest, t.ints(-1)], {"keepdims": 1})])
    a = t.op("Slice", [rest, t.ints(0), t.ints(big), t.ints(1), t.ints(2)])
    bb = t.op("Slice", [rest, t.ints(1), t.ints(big), t.ints(1), t.ints(2)])
    ma = t.op("Slice", [mrest, t.ints(0), t.ints(big), t.ints(1), t.ints(2)])
    mb = t.op("Slice", [mrest, t.ints(1), t.ints(big), t.ints(1), t.ints(2)])
    sim = t.op("MatMul", [ma, t.op("Transpose", [mb], {"perm": [0, 2, 1]})])
    best = t.op("ReduceMax", [sim, t.ints(2)], {"keepdims": 0})
    match = t.op("ArgMax", [sim], {"axis": 2, "keepdims": 0})
    if n > 0:
        na_, nb_ = (n - protect + 1) // 2, (n - protect) // 2
        na, nb = t.ints(na_), t.ints(nb_)
    else:
        na = t.dim(t.op("Shape", [a]), 1)
        nb = t.dim(t.op("Shape", [bb]), 1)
    _, order = t.op_multi_out("TopK", [best, na], {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)
    rr = t.ints(min(r, na_)) if n > 0 else t.op("Min", [t.ints(r), na])
    src = t.op("Slice", [order, t.ints(0), rr, t.ints(1)])
    unm = t.op("Slice", [order, rr, t.ints(big), t.ints(1)])
    n_unm = t.ints(na_ - min(r, na_)) if n > 0 else t.op("Sub", [na, rr])
    unm, _ = t.op_multi_out("TopK", [unm, n_unm], {"axis": 1, "largest": 0, "sorted": 1},
                            num_outputs=2)
    dst = t.op("GatherElements", [match, src], {"axis": 1})  # [B, r]
    a_src = _batched_gather(t, a, src)  # [B, r, C+1]
    a_unm = _batched_gather(t, a, unm)
    hot = t.op("OneHot", [dst, t.const(np.int64(nb_)) if n > 0 else t.op("Squeeze", [nb]), t.const([0.0, 1.0], np.float32)], {"axis": 1})  # [B, |B|, r]
    b_new = t.op("Add", [bb, t.op("MatMul", [hot, a_src])])
    parts = [a_unm, b_new]
    if protect:
        parts.insert(0, t.op("Slice", [xs, t.ints(0), t.ints(protect), t.ints(1)]))
    merged = t.op("Concat", parts, {"axis": 1})  # [B, N-r, C+1]
    # representative positions: prefix, 2·unm + protect, then 2·j + 1 + protect for every B token
    if n > 0:
        b_pos = t.const(np.arange(nb_, dtype=np.int64) * 2 + 1 + protect)
    else:
        b_pos = t.op("Range", [t.const(0, np.int64), t.op("Squeeze", [nb]), t.const(1, np.int64)])
        b_pos = t.op("Add", [t.op("Mul", [b_pos, t.ints(2)]), t.ints(1 + protect)])
    zero = t.op("Mul", [t.op("Slice", [match, t.ints(0), t.ints(1), t.ints(1)]), t.const(0, np.int64)])  # [B, 1]
    b_pos = t.op("Add", [zero, t.op("Unsqueeze", [b_pos, t.ints(0)])])  # [B, |B|] by broadcasting
    ids = [t.op("Add", [t.op("Mul", [unm, t.ints(2)]), t.ints(protect)]), b_pos]
    if protect:
        ids.insert(0, t.op("Add", [zero, t.const(np.arange(protect, dtype=np.int64)[None, :])]))
    ids = t.op("Concat", ids, {"axis": 1})
    nout = t.ints(n - min(r, na_)) if n > 0 else t.dim(t.op("Shape", [ids]), 1)
    idx, perm = t.op_multi_out("TopK", [ids, nout], {"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2)
    merged = _batched_gather(t, merged, perm)  # back to the original token order
    s_out = t.op("Slice", [merged, t.ints(-1), t.ints(big), t.ints(2)])
    y = t.op("Div", [t.op("Slice", [merged, t.ints(0), t.ints(-1), t.ints(2)]), s_out])
    y.name = "y"
    s_out = t.op("Identity", [s_out])
    s_out.name = "size_out"
    idx = t.op("Identity", [idx])
    idx.name = "indices"
    inputs = [x, metric, size] if has_size else [x, metric]
    return build_function(t, OP, overload_key(attrs), inputs, [y, s_out, idx], attrs)


def make_node(x: ir.Value, metric: ir.Value, size: ir.Value | None = None, *, r: int, protect: int = 0, n: int = 0,
              name: str | None = None) -> ir.Node:
    """A TokenMerge node (outputs ``y``, ``size_out``, ``indices``); pair it with ``make_function(r, protect, size is not None, n)``."""
    attrs = _attrs(r, protect, size is not None, n)
    inputs = [x, metric] + ([size] if size is not None else [])
    return ir.Node(DOMAIN, OP, inputs, node_attrs(attrs), overload=overload_key(attrs), num_outputs=3, name=name)


def _int(d) -> int:
    return d if isinstance(d, int) else 1


@flops_rule(OP)
def flops(node: ir.Node) -> int:
    """Similarity (2·B·(N/2)²·D), weighting/merging (2·B·N·C + 2·B·(N/2)·r·C), normalisation."""
    xs, ms = node.inputs[0].shape, node.inputs[1].shape
    if xs is None or ms is None or len(xs) != 3 or len(ms) != 3:
        return 0
    b, n, c = (_int(d) for d in xs)
    d = _int(ms[2])
    r = node.attributes.get_int("r", 0)
    half = (n + 1) // 2
    return 2 * b * half * half * d + 4 * b * n * c + 2 * b * half * r * (c + 1) + 3 * b * n * d
