"""``ai.graphprune::TokenSelect``: keep the highest-scoring tokens of a ``[B, N, C]`` sequence (EViT / FasterVLM).

Semantics (``TokenSelect.compute`` is the definition):
  * the first ``protect`` tokens (CLS, registers, distillation token) are always kept, first, in order;
  * of the other ``M = N - protect`` tokens the ``k`` with the highest ``scores`` are kept
    (``k = 0`` means ``max(1, min(M, ceil(keep_ratio · M)))``, with ``keep_ratio`` read as the nearest fraction
    of denominator <= 10000, so the count is exact integer arithmetic and follows the runtime ``N``);
    ties go to the lower index (ONNX ``TopK`` order);
  * ``keep_order=1`` keeps them in their original order, ``0`` in descending score order;
  * ``fuse_rest=1`` appends one token: the score-weighted mean of the dropped tokens (EViT's fused token;
    zero when nothing is dropped or the dropped weights sum to 0).

Inputs:  ``x [B, N, C]``, ``scores [B, N]`` (the prefix entries are ignored).
Outputs: ``y [B, protect + k + fuse_rest, C]``, ``indices [B, protect + k]`` (int64, positions in ``x``).

Body: Slice → TopK → (TopK ascending on the indices for ``keep_order``) → ``GatherND(batch_dims=1)`` of whole
token rows. ``fuse_rest`` builds the kept mask with ``OneHot`` + ``ReduceMax`` and a ``[B, 1, N] @ [B, N, C]``
MatMul: scatter-free.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx_ir as ir

from graphprune.ops._base import Attr, Body, OpDef, Port, register
from graphprune.ops._dims import Dim, cdiv, dmax, dmin

OP = "TokenSelect"
RATIO_DENOMINATOR = 10000


def ratio_fraction(keep_ratio: float) -> tuple[int, int]:
    """``keep_ratio`` as ``(num, den)`` (read through float32, as an ONNX attribute stores it)."""
    f = Fraction(float(np.float32(keep_ratio))).limit_denominator(RATIO_DENOMINATOR)
    return f.numerator, f.denominator


def _float_dtype_tiny(dtype: ir.DataType) -> float:
    """Smallest positive normal of the data type (guards the fused token's division)."""
    return 6.1035156e-05 if dtype == ir.DataType.FLOAT16 else 1e-12


@register
class TokenSelect(OpDef):
    name = OP
    snake = "token_select"
    doc = __doc__ or ""
    attributes = (
        Attr("k", int, 0, "kept non-prefix tokens (0: use keep_ratio)", min=0),
        Attr("keep_ratio", float, 1.0, "fraction of the non-prefix tokens kept, used when k == 0", min=0.0, max=1.0),
        Attr("protect", int, 0, "prefix tokens always kept", min=0),
        Attr("keep_order", bool, True, "restore the original token order"),
        Attr("fuse_rest", bool, False, "append the score-weighted mean of the dropped tokens"),
    )
    inputs = (Port("x", ("B", "N", "C")), Port("scores", ("B", "N")))
    outputs = (Port("y", ("B", "N_out", "C")), Port("indices", ("B", "N_keep"), "int64"))

    @classmethod
    def check(cls, a: dict) -> dict:
        if a["k"] == 0 and a["keep_ratio"] <= 0:
            raise ValueError("TokenSelect: keep_ratio must be > 0 when k == 0")
        return a

    @classmethod
    def kept(cls, n, a: dict) -> Dim:
        """Kept non-prefix tokens for ``n`` input tokens (a shape expression)."""
        m = Dim.of(n) - a["protect"]
        if a["k"] > 0:
            return dmin(a["k"], m)
        num, den = ratio_fraction(a["keep_ratio"])
        return dmax(1, dmin(m, cdiv(m * num, den)))

    @classmethod
    def shape(cls, a: dict) -> list[tuple]:
        keep = a["protect"] + cls.kept("N", a)
        return [("B", keep + a["fuse_rest"], "C"), ("B", keep)]

    @classmethod
    def constraints(cls, a: dict):
        return [(Dim.of("N"), Dim.of(a["protect"] + 1), "needs a token after the protected prefix")]

    @classmethod
    def flops(cls, shapes, a: dict) -> int:
        """Selection is data movement; ``fuse_rest`` costs one weighted sum over the tokens (2·B·N·C)."""
        b, n, c = shapes[0]
        return 2 * b * n * c if a["fuse_rest"] else 0

    @classmethod
    def compute(cls, xp, x, scores, **a):
        b, n, c = x.shape
        p = a["protect"]
        kk = cls.kept(n, a).static
        s = scores[:, p:]
        order = xp.argsort(s, axis=1, descending=True, stable=True)[:, :kk]
        top = order
        if a["keep_order"]:
            order = xp.sort(order, axis=1)
        pre = xp.broadcast_to(xp.arange(p, dtype=xp.int64)[None, :], (b, p))
        idx = xp.concat([pre, xp.astype(order, xp.int64) + p], axis=1)
        y = xp.take_along_axis(x, xp.broadcast_to(idx[:, :, None], (b, idx.shape[1], c)), axis=1)
        if a["fuse_rest"]:
            m = n - p
            kept = xp.any(top[:, :, None] == xp.arange(m)[None, None, :], axis=1)
            w = xp.where(kept, xp.zeros_like(s, dtype=xp.float64), xp.astype(s, xp.float64))
            xs = xp.astype(x[:, p:], xp.float64)
            den = xp.maximum(xp.sum(w, axis=1), xp.asarray(1e-12, dtype=xp.float64))
            rest = xp.sum(w[:, :, None] * xs, axis=1) / den[:, None]
            y = xp.concat([y, xp.astype(rest[:, None, :], x.dtype)], axis=1)
        return y, idx

    @classmethod
    def lower(cls, t: Body, inputs, a: dict, dtype: ir.DataType, static) -> list[ir.Value]:
        x, scores = inputs
        p = a["protect"]
        env = t.dims(cls, inputs, static)
        kv = t.value(t.count(cls.kept("N", a), env))
        s = t.slice_tokens(scores, p) if p else scores
        _, idx = t.op_multi_out("TopK", [t.rank(s), kv], {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)
        top = idx
        if a["keep_order"]:
            idx, _ = t.op_multi_out("TopK", [idx, kv], {"axis": 1, "largest": 0, "sorted": 1}, num_outputs=2)
        if p:  # prefix positions [B, p] built by broadcasting (keeps the batch dim inferable)
            idx = t.op("Add", [idx, t.ints(p)])
            zero = t.op("Mul", [t.slice(idx, 0, 1, 1), t.const(0, np.int64)])
            pre = t.op("Add", [zero, t.const(np.arange(p, dtype=np.int64)[None, :])])
            idx = t.op("Concat", [pre, idx], {"axis": 1})
        y = t.op("GatherND", [x, t.op("Unsqueeze", [idx, t.ints(2)])], {"batch_dims": 1})
        if a["fuse_rest"]:
            depth = t.scalar(t.count(Dim.of("N") - p, env))
            hot = t.one_hot(top, depth, [0.0, 1.0], axis=-1)
            kept = t.op("ReduceMax", [hot, t.ints(1)], {"keepdims": 0})
            w = t.op("Mul", [t.op("CastLike", [s, x]), t.op("Sub", [t.lit(1.0, x), kept])])
            xs = t.slice_tokens(x, p) if p else x
            num = t.op("MatMul", [t.op("Unsqueeze", [w, t.ints(1)]), xs])
            den = t.op("Max", [t.op("ReduceSum", [w, t.ints(1)], {"keepdims": 1}), t.lit(_float_dtype_tiny(dtype), x)])
            rest = t.op("Div", [num, t.op("Unsqueeze", [den, t.ints(2)])])
            y = t.op("Concat", [y, rest], {"axis": 1})
        return [y, idx]


def kept_count(n: int, protect: int, k: int = 0, keep_ratio: float = 1.0) -> int:
    """Number of kept non-prefix tokens for ``n`` input tokens (the op's shape rule, evaluated)."""
    return TokenSelect.kept(n, TokenSelect.normalize(k=k, keep_ratio=keep_ratio, protect=protect)).static


def reference(x: np.ndarray, scores: np.ndarray, **attrs) -> tuple[np.ndarray, np.ndarray]:
    """Numpy oracle; returns ``(y, indices)``."""
    return TokenSelect.reference(x, scores, **attrs)


make_node = TokenSelect.make_node
make_function = TokenSelect.make_function
