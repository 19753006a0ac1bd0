"""``ai.graphprune.SparseAttention``: attention restricted to a sparsity pattern, at a cost that follows the pattern.

Inputs: ``Q``, ``K``, ``V`` [B, H, N, D] (one sequence length N, K/V with the same heads as Q); optional ``bias``,
float, rank 4, broadcastable to [B, H, N, N], either a key bias [B|1, H|1, 1, N] (padding mask) or a full one
[B|1, H|1, N, N]; optional ``layout`` ([H|1, nb, nb] 0/1, block_layout only). Output: [B, H, N, Dv].

Semantics: ``Softmax(Q·Kᵀ·scale + max(bias, -1e30) + M)·V`` with ``M`` 0 on the allowed (query, key) pairs and
-inf elsewhere. Patterns (attribute ``pattern``):
  1. ``sliding_window`` (``window`` w, ``causal``, ``num_global`` g): not causal, query i sees the ``min(w, N)``
     keys of the window around i, shifted inward at the borders (NATTEN clamping); causal, keys
     ``[i - w + 1, i]``. The first g tokens are global: they see every key (causal: every earlier key) and every
     query sees them. ``window >= N`` is dense attention.
  2. ``neighborhood_2d`` (``grid`` [h, w], ``kernel`` k, ``dilation`` d, ``num_global`` = prefix tokens): tokens
     after the prefix form a row-major h × w grid; each sees the k × k neighborhood of its dilation sub-grid,
     clamped at the borders (NATTEN). Prefix tokens are global. ``kernel >= max(h, w)`` (d = 1) is dense.
  3. ``block_topk`` (``block_size`` b, ``topk`` k, ``keep_diagonal``, ``keep_first``): Q and K are cut into blocks
     of b tokens (the last one may be shorter); a Q block sees the k K blocks with the largest
     scale·mean(Q block)·mean(K block) + the largest bias in the (Q block, K block) tile, so fully masked blocks rank
     last (ties: lower block first; the diagonal / first block are always kept when asked, and count towards k).
     The means include masked tokens. ``topk >= nb`` is dense. The first ``num_global`` queries (CLS) attend
     to every key; with ``keep_first`` (default) and ``num_global <= block_size`` every query also sees them.
     ``causal`` (needs ``keep_diagonal``): key blocks after the query block score -inf, and no query sees a key
     after it (a causal decoder without an N × N mask).
  4. ``block_layout`` (``block_size`` b, ``topk`` = most ones in a layout row, ``num_global``): the static 0/1
     ``layout`` input says which K blocks each Q block sees, per head; global queries see every key. An
     all-ones layout is dense.
  5. ``vertical_slash`` (``block_size`` b, ``vertical``, ``slash``, ``last_q``, ``num_global`` = sink tokens):
     causal; per head, the top key columns and the top block diagonals, estimated at run time from the attention
     of the last ``last_q`` queries (MInference). Definition and body: ``_vertical_slash``. ``bias`` must be
     ``none``.

Masked rows: the bias is clamped to >= -1e30, so a query whose allowed keys are all masked (-inf) gets the mean
of V over its allowed keys, never NaN. This equals what dense attention gives with HF's finite min mask; a dense
chain fed a -inf mask gives NaN there, and that NaN then leaks into every row of the next layer through 0·NaN.

The function body (``_sparse_body``) is specialised per attribute set, dtype and inputs (``overload``), including
``seq_len``: the sequence length is static (the bodies gather with index tables built for it). The body reshapes Q
to [B, H, seq_len, -1] first, so a run at another length fails (a reshape or MatMul shape error) instead of
attending to the wrong keys. ``SparseAttention.compute`` (numpy oracle and torch eager) accepts any N.
Float constants are ``CastLike``'d to Q's type; the bias floor is -1e30, or -65504 for float16.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphprune.errors import ConfigError
from graphprune.ops import _vertical_slash
from graphprune.ops._base import Attr, Body, OpDef, Port, register
from graphprune.ops._dims import Dim
from graphprune.ops._sparse_body import (
    CAUSAL_FIRST,
    FORCE,
    SparseBody,
    dynamic_topk_body,
    dynamic_window_body,
    gathered_body,
    routed_body,
)
from graphprune.ops._sparse_plan import (
    GatheredPlan,
    RoutedPlan,
    neighborhood_2d_plan,
    routed_plan,
    sliding_window_plan,
)

OP = "SparseAttention"
PATTERNS = ("sliding_window", "neighborhood_2d", "block_topk", "block_layout", "vertical_slash")
BIAS_KINDS = ("none", "key", "full")
#: Patterns whose body also follows a runtime N (the others are defined for one N: a grid, a block layout).
DYNAMIC_PATTERNS = ("sliding_window", "block_topk", "vertical_slash")

PATTERN_KEYS = {
    "sliding_window": ("window", "causal", "num_global", "block_size"),
    "neighborhood_2d": ("grid", "kernel", "dilation", "num_global", "block_size"),
    "block_topk": ("block_size", "topk", "keep_diagonal", "keep_first", "num_global", "causal"),
    "block_layout": ("block_size", "topk", "num_global"),
    "vertical_slash": _vertical_slash.KEYS,
}
_DEFAULTS = {"window": 256, "causal": 0, "num_global": 0, "kernel": 7, "dilation": 1, "block_size": 0, "topk": 8,
             "keep_diagonal": 1, "keep_first": 1, "vertical": 128, "slash": 4, "last_q": 64}
_OPTIONAL = tuple(dict.fromkeys(k for keys in PATTERN_KEYS.values() for k in keys))


@register
class SparseAttention(OpDef):
    name = OP
    snake = "sparse_attention"
    doc = (__doc__ or "").split("\n\n")[0]
    attributes = (
        Attr("pattern", str, "sliding_window", "attention pattern", choices=PATTERNS),
        Attr("seq_len", int, 0, "static N the body is built for (0: Q's static length)", min=0),
        Attr("scale", float, 0.0, "multiplies Q·Kᵀ (0: 1/sqrt(D))"),
        Attr("bias", str, "none", "none | key ([.., 1, N]) | full ([.., N, N])", choices=BIAS_KINDS),
        Attr("window", int, None, "keys per query (sliding_window)", min=1),
        Attr("causal", bool, None, "causal window (sliding_window); no key after the query (block_topk)"),
        Attr("num_global", int, None, "leading global tokens (block_*: global queries only)", min=0),
        Attr("grid", "ints", None, "token grid [h, w] (neighborhood_2d)", min=1),
        Attr("kernel", int, None, "neighborhood side (neighborhood_2d)", min=1),
        Attr("dilation", int, None, "neighborhood dilation (neighborhood_2d)", min=1),
        Attr("block_size", int, None, "query block (sliding_window), tile side (neighborhood_2d), block (block_*)",
             min=0),
        Attr("topk", int, None, "key blocks per query block (block_topk, block_layout)", min=1),
        Attr("keep_diagonal", bool, None, "always keep the diagonal block (block_topk)"),
        Attr("keep_first", bool, None, "always keep the first block (block_topk)"),
        Attr("vertical", int, None, "key columns kept per head (vertical_slash)", min=1),
        Attr("slash", int, None, "block diagonals kept per head, the local one included (vertical_slash)", min=1),
        Attr("last_q", int, None, "queries the pattern is estimated from (vertical_slash)", min=1),
    )
    inputs = (Port("Q", ("B", "H", "N", "D")), Port("K", ("B", "H", "N", "D")), Port("V", ("B", "H", "N", "Dv")),
              Port("attn_bias", None, optional=True, doc="rank 4, broadcastable to [B, H, N, N]"),
              Port("layout", None, "any", optional=True, doc="[H|1, nb, nb] 0/1 (block_layout)"))
    outputs = (Port("Y", ("B", "H", "N", "Dv")),)

    @classmethod
    def check(cls, a: dict) -> dict:
        pattern, seq_len = a["pattern"], a["seq_len"]
        for key in _OPTIONAL:
            if key not in PATTERN_KEYS[pattern]:
                a[key] = None
            elif a[key] is None:
                default = _vertical_slash.DEFAULTS[key] if pattern == "vertical_slash" and key in \
                    _vertical_slash.DEFAULTS else _DEFAULTS.get(key)
                a[key] = cls.attr(key).check(OP, default)
        if pattern == "vertical_slash" and a["bias"] != "none":
            raise ConfigError("bias: vertical_slash is causal by itself and takes no bias (a padding mask is not "
                              "supported)")
        if pattern == "neighborhood_2d":
            if a["grid"] is None or len(a["grid"]) != 2:
                raise ConfigError("grid: neighborhood_2d needs the token grid [h, w]")
        if pattern == "block_topk" and a["keep_diagonal"] + a["keep_first"] > a["topk"]:
            raise ConfigError(f"topk: {a['topk']} is fewer than the blocks always kept (keep_diagonal/keep_first)")
        if pattern == "block_topk" and a["causal"] and not a["keep_diagonal"]:
            raise ConfigError("keep_diagonal: a causal block_topk keeps the diagonal block (without it a query block "
                              "may see no key at all)")
        if seq_len:
            if a["num_global"] >= seq_len and pattern != "vertical_slash":  # sinks: min(num_global, N)
                raise ConfigError(f"num_global: {a['num_global']} leaves no tokens of the {seq_len} for the pattern")
            if pattern == "neighborhood_2d" and a["num_global"] + a["grid"][0] * a["grid"][1] != seq_len:
                raise ConfigError(f"grid: {a['grid']} plus {a['num_global']} prefix tokens != sequence length "
                                  f"{seq_len}")
        return a

    @classmethod
    def shape(cls, a: dict) -> list[tuple]:
        return [("B", "H", "N", "Dv")]

    @classmethod
    def constraints(cls, a: dict):
        if not a["seq_len"]:
            return []
        n = Dim.of("N")
        return [(n, Dim.of(a["seq_len"]), "the body is built for seq_len tokens"),
                (Dim.of(a["seq_len"]), n, "the body is built for seq_len tokens")]

    @classmethod
    def flops(cls, shapes, a: dict) -> int:
        """Executed FLOPs of the pattern (``attention_flops``) at the inputs' batch and heads."""
        b, h, n, d = shapes[0]
        dv = shapes[2][3]
        return attention_flops(at_length(a, n, d), b, h, d, dv)[0]

    @classmethod
    def compute(cls, xp, q, k, v, attn_bias=None, layout=None, **a):
        bias = attn_bias
        n, d = q.shape[2], q.shape[3]
        a = at_length(a, n, d)
        f64 = xp.float64
        allowed = _allowed(xp, a, q, k, layout, bias)
        s = (xp.astype(q, f64) @ xp.permute_dims(xp.astype(k, f64), (0, 1, 3, 2))) * a["scale"]
        if bias is not None:
            s = s + xp.maximum(xp.astype(bias, f64), xp.asarray(-1e30, dtype=f64))
        s = xp.where(allowed, s, xp.asarray(-math.inf, dtype=f64))
        s = s - xp.max(s, axis=-1, keepdims=True)
        p = xp.exp(s)
        p = p / xp.sum(p, axis=-1, keepdims=True)
        return (xp.astype(p @ xp.astype(v, f64), q.dtype),)

    @classmethod
    def tape(cls, inputs, dtype: ir.DataType) -> Body:
        return SparseBody(inputs[0], dtype)

    @classmethod
    def lower(cls, t: Body, inputs, a: dict, dtype: ir.DataType, static) -> list[ir.Value]:
        qs = static[0]
        n = a["seq_len"] or (qs[2] if qs is not None else None)
        d = qs[3] if qs is not None else None
        if not a["scale"] and not isinstance(d, int):
            raise ValueError("SparseAttention: without a scale attribute the body needs a static head size")
        if a["pattern"] == "vertical_slash":  # one body for every N (read at run time)
            return [_vertical_slash.body(t, dict(a, scale=a["scale"] or 1.0 / math.sqrt(d)), list(inputs))]
        if not isinstance(n, int):
            if a["pattern"] not in DYNAMIC_PATTERNS:
                raise ValueError(f"SparseAttention: pattern {a['pattern']} needs a static sequence length "
                                 f"(seq_len); {' and '.join(DYNAMIC_PATTERNS)} also run at a dynamic N")
            a = dict(a, scale=a["scale"] or 1.0 / math.sqrt(d))
            if a["pattern"] == "sliding_window":
                return [dynamic_window_body(t, a["window"], bool(a["causal"]), a["num_global"], effective_block(a),
                                            a["scale"], a["bias"], list(inputs))]
            return [dynamic_topk_body(t, a["block_size"] or 64, a["topk"], bool(a["keep_first"]),
                                      bool(a["keep_diagonal"]), a["num_global"], a["scale"], a["bias"], list(inputs),
                                      causal=bool(a["causal"]))]
        a = at_length(a, n, d)
        plan = _plan(a)
        ins = [x for x in inputs]
        if isinstance(plan, GatheredPlan):
            out = gathered_body(t, plan, a["scale"], a["bias"], ins)
        else:
            force = _force(a, plan) if a["pattern"] == "block_topk" else None
            out = routed_body(t, plan, a["scale"], a["bias"], force, a["pattern"] == "block_layout", ins,
                              causal=bool(a.get("causal")))
        return [out]


#: ``(columns, offsets, block)`` that vertical_slash keeps (``_vertical_slash.select``), for kernels.
vertical_slash_select = _vertical_slash.select


def _allowed(xp, a: dict, q, k, layout, bias):
    """[B|1, H|1, N, N] bool: the (query, key) pairs the pattern lets through (``a`` resolved at the length)."""
    if a["pattern"] in ("sliding_window", "neighborhood_2d"):
        return xp.asarray(_allowed_static(a)[None, None], device=_device(q))
    if a["pattern"] == "vertical_slash":
        return _vertical_slash.allowed(xp, a, q, k)
    allowed = _allowed_routed(xp, a, q, k, layout, bias)
    n = q.shape[2]
    rows = xp.asarray((np.arange(n) < a["num_global"])[None, None, :, None], device=_device(q))
    allowed = xp.logical_or(allowed, rows)
    if a.get("causal"):  # block_topk: no key after the query (global rows: every earlier key)
        allowed = xp.logical_and(allowed, xp.asarray(np.tril(np.ones((n, n), dtype=bool)), device=_device(q)))
    return allowed


def allowed_mask(q: np.ndarray, k: np.ndarray, attn_bias: np.ndarray | None = None,
                 layout: np.ndarray | None = None, **attrs) -> np.ndarray:
    """[B|1, H|1, N, N] bool: which keys each query sees under the pattern (``attrs`` as for ``normalize``; a
    routed or run-time pattern reads ``q``, ``k`` and the bias). For analyses, such as the share of the attention
    mass a pattern keeps."""
    from array_api_compat import numpy as xp

    a = at_length(SparseAttention.normalize(**attrs), q.shape[2], q.shape[3])
    return np.asarray(_allowed(xp, a, q, k, layout, attn_bias))


def _device(x):
    return getattr(x, "device", None) if not isinstance(x, np.ndarray) else None


def at_length(a: dict, n: int, d: int | None) -> dict:
    """The attributes with ``seq_len`` = n and the default scale resolved (checked again)."""
    out = dict(a)
    if out["seq_len"] and out["seq_len"] != n:
        raise ValueError(f"SparseAttention: built for seq_len {out['seq_len']}, got {n} tokens")
    out["seq_len"] = n
    if not out["scale"]:
        out["scale"] = 1.0 / math.sqrt(d)
    return SparseAttention.check(out)


def normalize(pattern: str, seq_len: int, scale: float, bias: str = "none", **params) -> dict:
    """The full static attribute set of a node: defaults filled in, only the pattern's keys kept, checked."""
    a = SparseAttention.normalize(pattern=pattern, seq_len=seq_len, scale=scale, bias=bias, **params)
    return {k: v for k, v in a.items() if v is not None}


def _plan(a: dict) -> GatheredPlan | RoutedPlan:
    n, p = a["seq_len"], a["pattern"]
    if p == "sliding_window":
        return sliding_window_plan(n, a["window"], bool(a["causal"]), a["num_global"], effective_block(a))
    if p == "neighborhood_2d":
        return neighborhood_2d_plan(n, tuple(a["grid"]), a["kernel"], a["dilation"], a["num_global"],
                                    effective_block(a))
    return routed_plan(n, a["block_size"] or 64, a["topk"], a["num_global"])


def _force(a: dict, plan: RoutedPlan) -> np.ndarray | None:
    """[nb, nb] added to the routing scores: +inf on the kept blocks; causal: -inf after the diagonal, and the
    first block only 1e30, so that the diagonal is always the first pick (the body masks it by a triangle)."""
    if not (a.get("keep_diagonal") or a.get("keep_first") or a.get("causal")):
        return None
    nb = plan.nb
    f = np.zeros((nb, nb), dtype=np.float32)
    if a.get("causal"):
        f[np.arange(nb)[None, :] > np.arange(nb)[:, None]] = -np.inf
    if a.get("keep_first"):
        f[:, 0] = CAUSAL_FIRST if a.get("causal") else FORCE
    if a.get("keep_diagonal"):
        f[np.arange(nb), np.arange(nb)] = FORCE
    return f


# ---------------------------------------------------------------- numpy reference (independent of the plans)


def _allowed_static(a: dict) -> np.ndarray:
    """[N, N] bool straight from the pattern's definition, one query row at a time."""
    n, g = a["seq_len"], a["num_global"]
    allowed = np.zeros((n, n), dtype=bool)
    j = np.arange(n)
    if a["pattern"] == "sliding_window":
        w, causal = a["window"], a["causal"]
        for i in range(n):
            if i < g:
                row = j <= i if causal else np.ones(n, dtype=bool)
            elif causal:
                row = ((j <= i) & (j > i - w)) | (j < g)
            else:
                s = min(max(i - w // 2, 0), max(n - w, 0))
                row = ((j >= s) & (j < s + w)) | (j < g)
            allowed[i] = row
        return allowed
    gh, gw = a["grid"]
    k, d = a["kernel"], a["dilation"]
    allowed[:g, :] = True
    allowed[:, :g] = True
    kr, kc = np.divmod(np.arange(gh * gw), gw)
    for qi in range(gh * gw):
        r, c = divmod(qi, gw)
        ok = (kr % d == r % d) & (kc % d == c % d)
        for pos, key, length in ((r, kr, gh), (c, kc, gw)):
            sub = len(range(pos % d, length, d))  # length of this query's dilation sub-grid along the axis
            ka = min(k, sub)
            start = min(max(pos // d - k // 2, 0), sub - ka)
            ok &= (key // d >= start) & (key // d < start + ka)
        allowed[g + qi, g:] = ok
    return allowed


def _allowed_routed(xp, a: dict, q, k, layout, bias):
    """[B, H, N, N] bool: each query block's chosen key blocks, expanded to tokens."""
    chosen, b = routed_blocks(xp, a, q, k, layout, bias)
    blk = xp.asarray(np.arange(q.shape[2]) // b, device=_device(q))
    return xp.take(xp.take(chosen, blk, axis=2), blk, axis=3)


def routed_blocks(xp, a: dict, q, k, layout, bias):
    """``(chosen, b)``: [B, H, nb, nb] bool, the key blocks each query block reads (block_topk / block_layout,
    ``a`` resolved at the length), and the block size. Global query rows are not included (they see every key).
    Kernels use this to route without an [N, N] tensor."""
    bsz, heads, n, _ = q.shape
    dev = _device(q)
    f64 = xp.float64
    b = max(1, min(a["block_size"] or 64, n))
    nb = -(-n // b)
    if a["pattern"] == "block_layout":
        lay = xp.asarray(layout, device=dev) > 0
        chosen = xp.broadcast_to(lay, (bsz, heads, nb, nb))
    else:
        kk = min(a["topk"], nb)
        pad = nb * b - n

        def block_means(x):  # [B, H, nb, D], the mean over each block's real tokens
            x = xp.astype(x, f64)
            x = xp.concat([x, xp.zeros((bsz, heads, pad, x.shape[3]), dtype=f64, device=dev)], axis=2)
            counts = np.minimum(b, n - np.arange(nb) * b).astype(np.float64)
            return xp.sum(xp.reshape(x, (bsz, heads, nb, b, x.shape[3])), axis=3) / xp.asarray(
                counts[:, None], device=dev)

        score = (block_means(q) @ xp.permute_dims(block_means(k), (0, 1, 3, 2))) * a["scale"]
        forced = np.zeros((nb, nb), dtype=bool)
        if a["keep_first"]:
            forced[:, 0] = True
        if a["keep_diagonal"]:
            forced[np.arange(nb), np.arange(nb)] = True
        if bias is not None:  # largest floored bias of each (query block, key block) tile
            floor = xp.asarray(-1e30, dtype=f64)
            fb = xp.broadcast_to(xp.maximum(xp.astype(bias, f64), floor), (bsz, heads, n, n))
            if pad:
                fb = xp.concat([fb, xp.full((bsz, heads, pad, n), -1e30, dtype=f64, device=dev)], axis=2)
                fb = xp.concat([fb, xp.full((bsz, heads, nb * b, pad), -1e30, dtype=f64, device=dev)], axis=3)
            tile_max = xp.max(xp.reshape(fb, (bsz, heads, nb, b, nb, b)), axis=(3, 5))
            if bias.shape[2] == 1:  # a key bias is the same for every query block (padded query rows aside)
                tile_max = xp.broadcast_to(tile_max[:, :, :1], tile_max.shape)
            score = score + tile_max
        if a.get("causal"):  # key blocks after the query block rank last (and are masked below)
            later = np.arange(nb)[None, :] > np.arange(nb)[:, None]
            score = xp.where(xp.asarray(later, device=dev), xp.asarray(-math.inf, dtype=f64), score)
        score = xp.where(xp.asarray(forced, device=dev), xp.asarray(math.inf, dtype=f64), score)
        order = xp.argsort(score, axis=-1, descending=True, stable=True)[..., :kk]
        chosen = xp.any(order[..., :, None] == xp.arange(nb, device=dev), axis=-2)
    return chosen, b


# ---------------------------------------------------------------- the node, its body, its cost


def reference(q, k, v, bias=None, layout=None, **attrs) -> np.ndarray:
    """Numpy oracle: dense attention restricted to the pattern's allowed set (float64 accumulation)."""
    return SparseAttention.reference(q, k, v, bias, layout, **attrs)[0]


def make_function(attrs: dict, layout_input: bool = False, opset: int = 18,
                  dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Function:
    """The standard-op body for one attribute set (``normalize``); ``opset`` (>= 18) must equal the model's."""
    if opset < 18:
        raise ValueError(f"the SparseAttention body needs opset >= 18, the model imports {opset}")
    present = (True, True, True, attrs.get("bias", "none") != "none" or layout_input, layout_input)
    return SparseAttention.make_function(dtype=dtype, present=present, opset=opset, **attrs)


def make_node(q: ir.Value, k: ir.Value, v: ir.Value, attrs: dict, bias: ir.Value | None = None,
              layout: ir.Value | None = None, name: str | None = None, opset: int = 18) -> tuple[ir.Node, ir.Function]:
    """A SparseAttention node and its function body (register the body with ``add_function``)."""
    if opset < 18:
        raise ValueError(f"the SparseAttention body needs opset >= 18, the model imports {opset}")
    node = SparseAttention.make_node(q, k, v, bias, layout, name=name, **attrs)
    return node, SparseAttention.function_for(node, opset=opset)


def attrs_of(node: ir.Node) -> dict:
    """A node's attributes (the pattern's keys only)."""
    return {k: v for k, v in SparseAttention.attrs_of(node).items() if v is not None}


def bias_kind(bias: ir.Value | None, seq_len: int) -> str:
    """``none`` / ``key`` / ``full`` from a bias value's static shape (rank 4 required)."""
    if bias is None:
        return "none"
    shape = bias.shape
    if shape is None or len(shape) != 4:
        raise ValueError(f"bias {bias.name!r} must have rank 4, has shape {shape}")
    if shape[2] == 1:
        return "key"
    if shape[2] == seq_len:
        return "full"
    raise ValueError(f"bias {bias.name!r} query dim {shape[2]} is neither 1 nor {seq_len}")


def scores_per_head(attrs: dict) -> int:
    """Score entries (q·k products) the body computes per (batch, head)."""
    if attrs["pattern"] == "vertical_slash":
        return _vertical_slash.scores_per_head(attrs, attrs["seq_len"])
    return _plan(attrs).scores_per_head()


def effective_block(attrs: dict) -> int:
    """The block size the body uses: query block (sliding_window), tile side (neighborhood_2d), block (block_*)."""
    a = attrs
    if a["pattern"] == "sliding_window":
        return a["block_size"] or min(128, max(16, a["window"]))
    if a["pattern"] == "neighborhood_2d":
        return a["block_size"] or max(2, (a["kernel"] + 1) // 2)
    if a["pattern"] == "vertical_slash":
        return _vertical_slash.geometry(a, a["seq_len"])[0]
    return _plan(a).block


def attention_flops(attrs: dict, batch: int, heads: int, head_dim: int, v_dim: int) -> tuple[int, int]:
    """(executed, dense) FLOPs of the attention core: 2·(D+Dv) per score plus 6 for scale/bias/softmax."""
    n = attrs["seq_len"]
    per = 2 * (head_dim + v_dim) + 6
    executed = scores_per_head(attrs) * per
    if attrs["pattern"] == "block_topk":
        plan = _plan(attrs)
        executed += 2 * plan.nb * plan.nb * head_dim + 2 * n * head_dim  # routing
    return batch * heads * executed, batch * heads * n * n * per
