"""``ai.graphprune::TokenSelect``: keep the highest-scoring tokens of a ``[B, N, C]`` sequence (EViT / FasterVLM).

Semantics (``reference`` is the definition):
  * the first ``protect`` tokens (CLS, registers, distillation token) are always kept, first, in order;
  * of the other ``N - protect`` tokens the ``k`` with the highest ``scores`` are kept
    (``k = 0`` means ``max(1, ceil(keep_ratio · (N - protect)))``, computed from the runtime ``N``);
    ties go to the lower index (ONNX ``TopK`` order);
  * ``keep_order=1`` keeps them in their original order, ``0`` in descending score order;
  * ``fuse_rest=1`` appends one token: the score-weighted mean of the dropped tokens (EViT's fused token;
    zero when nothing is dropped or the dropped weights sum to 0).

Inputs:  ``x [B, N, C]``, ``scores [B, N]`` (the prefix entries are ignored).
Outputs: ``y [B, protect + k + fuse_rest, C]``, ``indices [B, protect + k]`` (int64, positions in ``x``).

Body: Slice → TopK → (TopK ascending on the indices for ``keep_order``) → ``GatherND(batch_dims=1)`` of whole
token rows (a contiguous row copy per kept token; no ``GatherElements`` index tensor over ``C``).
``fuse_rest`` builds the kept mask with ``OneHot`` + ``ReduceMax`` and a ``[B, 1, N] @ [B, N, C]`` MatMul:
scatter-free.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import DOMAIN, OpSchema, flops_rule, overload_key
from graphprune.ops._token_body import Body, build_function, node_attrs

OP = "TokenSelect"

SCHEMA = OpSchema(
    name=OP,
    inputs=("x [B, N, C]", "scores [B, N]"),
    outputs=("y [B, protect + k + fuse_rest, C]", "indices [B, protect + k] int64"),
    attributes={
        "k": "int, kept non-prefix tokens (0: use keep_ratio)",
        "keep_ratio": "float in (0, 1], used when k == 0",
        "protect": "int, prefix tokens always kept",
        "keep_order": "int 0/1, restore the original token order",
        "fuse_rest": "int 0/1, append the score-weighted mean of the dropped tokens",
    },
    shape_rule="y[1] = protect + (k or max(1, ceil(keep_ratio*(N-protect)))) + fuse_rest",
    doc=__doc__ or "",
)


def kept_count(n: int, protect: int, k: int = 0, keep_ratio: float = 1.0) -> int:
    """Number of kept non-prefix tokens for ``n`` input tokens (``keep_ratio`` rounded as float32, like the body)."""
    if k > 0:
        return min(k, n - protect)
    ratio = float(np.float32(keep_ratio))
    return max(1, min(n - protect, math.ceil(np.float32(ratio) * np.float32(n - protect))))


def _attrs(k: int, keep_ratio: float, protect: int, keep_order: bool, fuse_rest: bool) -> dict:
    return {"k": int(k), "keep_ratio": float(keep_ratio), "protect": int(protect),
            "keep_order": int(bool(keep_order)), "fuse_rest": int(bool(fuse_rest))}


def reference(x: np.ndarray, scores: np.ndarray, k: int = 0, keep_ratio: float = 1.0, protect: int = 0,
              keep_order: bool = True, fuse_rest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Numpy definition of TokenSelect; returns ``(y, indices)``."""
    b, n, _ = x.shape
    kk = kept_count(n, protect, k, keep_ratio)
    s = scores[:, protect:]
    order = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    if keep_order:
        order = np.sort(order, axis=1)
    idx = np.concatenate([np.broadcast_to(np.arange(protect), (b, protect)), order + protect], axis=1).astype(np.int64)
    y = np.take_along_axis(x, idx[:, :, None], axis=1)
    if fuse_rest:
        kept = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(kept, order, True, axis=1)
        w = np.where(kept, 0.0, s).astype(np.float64)
        den = np.maximum(w.sum(axis=1), 1e-12)[:, None, None]
        rest = (np.einsum("bn,bnc->bc", w, x[:, protect:].astype(np.float64))[:, None, :] / den).astype(x.dtype)
        y = np.concatenate([y, rest], axis=1)
    return y, idx


def make_function(k: int = 0, keep_ratio: float = 1.0, protect: int = 0, keep_order: bool = True,
                  fuse_rest: bool = False) -> ir.Function:
    """The standard-op body, specialised for one attribute set (see module docstring)."""
    attrs = _attrs(k, keep_ratio, protect, keep_order, fuse_rest)
    t = Body()
    x = ir.Value(name="x")
    scores = ir.Value(name="scores")
    shape = t.op("Shape", [x])
    ndim = t.dim(shape, 1)
    s = t.slice_tokens(scores, protect) if protect else scores
    if k > 0:
        kv = t.ints(k)
    else:  # max(1, ceil(ratio * (N - protect)))
        rest_n = t.op("Sub", [ndim, t.ints(protect)])
        prod = t.op("Mul", [t.op("Cast", [rest_n], {"to": ir.DataType.FLOAT}), t.const([keep_ratio], np.float32)])
        kv = t.op("Max", [t.op("Cast", [t.op("Ceil", [prod])], {"to": ir.DataType.INT64}), t.ints(1)])
        kv = t.op("Min", [kv, rest_n])
    _, idx = t.op_multi_out("TopK", [s, kv], {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)
    top = idx
    if keep_order:
        idx, _ = t.op_multi_out("TopK", [idx, kv], {"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2)
    if protect:  # prefix positions [B, p] built by broadcasting (keeps the batch dim inferable)
        idx = t.op("Add", [idx, t.ints(protect)])
        zero = t.op("Mul", [t.op("Slice", [idx, t.ints(0), t.ints(1), t.ints(1)]), t.const(0, np.int64)])
        pre = t.op("Add", [zero, t.const(np.arange(protect, dtype=np.int64)[None, :])])
        idx = t.op("Concat", [pre, idx], {"axis": 1})
    y = t.op("GatherND", [x, t.op("Unsqueeze", [idx, t.ints(2)])], {"batch_dims": 1})
    if fuse_rest:
        depth = t.op("Squeeze", [t.op("Sub", [ndim, t.ints(protect)])])
        hot = t.op("OneHot", [top, depth, t.const([0.0, 1.0], np.float32)], {"axis": -1})
        kept = t.op("ReduceMax", [hot, t.ints(1)], {"keepdims": 0})
        w = t.op("Mul", [t.op("Cast", [s], {"to": ir.DataType.FLOAT}), t.op("Sub", [t.const(1.0, np.float32), kept])])
        xs = t.slice_tokens(x, protect) if protect else x
        num = t.op("MatMul", [t.op("Unsqueeze", [w, t.ints(1)]), xs])
        den = t.op("Max", [t.op("ReduceSum", [w, t.ints(1)], {"keepdims": 1}), t.const(1e-12, np.float32)])
        rest = t.op("Div", [num, t.op("Unsqueeze", [den, t.ints(2)])])
        y = t.op("Concat", [y, rest], {"axis": 1})
    y.name, idx_out = "y", t.op("Identity", [idx])
    idx_out.name = "indices"
    return build_function(t, OP, overload_key(attrs), [x, scores], [y, idx_out], attrs)


def make_node(x: ir.Value, scores: ir.Value, *, k: int = 0, keep_ratio: float = 1.0, protect: int = 0,
              keep_order: bool = True, fuse_rest: bool = False, name: str | None = None) -> ir.Node:
    """A TokenSelect node (2 outputs) whose overload matches ``make_function`` with the same attributes."""
    attrs = _attrs(k, keep_ratio, protect, keep_order, fuse_rest)
    return ir.Node(DOMAIN, OP, [x, scores], node_attrs(attrs), overload=overload_key(attrs), num_outputs=2, name=name)


def _int(d) -> int:
    return d if isinstance(d, int) else 1


@flops_rule(OP)
def flops(node: ir.Node) -> int:
    """Selection is data movement; ``fuse_rest`` costs one weighted sum over the tokens (2·B·N·C)."""
    shape = node.inputs[0].shape
    if not node.attributes.get_int("fuse_rest", 0) or shape is None or len(shape) != 3:
        return 0
    b, n, c = (_int(d) for d in shape)
    return 2 * b * n * c
