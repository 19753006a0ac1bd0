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
  4. ``block_layout`` (``block_size`` b, ``topk`` = most ones in a layout row, ``num_global``): the static 0/1
     ``layout`` input says which K blocks each Q block sees, per head; global queries see every key. An
     all-ones layout is dense.

Masked rows: the bias is clamped to >= -1e30, so a query whose allowed keys are all masked (-inf) gets the mean
of V over its allowed keys, never NaN. This equals what dense attention gives with HF's finite min mask; a dense
chain fed a -inf mask gives NaN there, and that NaN then leaks into every row of the next layer through 0·NaN.

The function body (``_sparse_body``) is specialised per attribute set (``overload``), including ``seq_len``: it
reshapes Q to [B, H, seq_len, -1] first, so a run at another length fails (a reshape or MatMul shape error)
instead of attending to the wrong keys.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphprune.errors import ConfigError
from graphprune.ops._base import DOMAIN, OpSchema, flops_rule, overload_key
from graphprune.ops._sparse_body import FORCE, gathered_body, routed_body
from graphprune.ops._sparse_plan import (
    GatheredPlan,
    RoutedPlan,
    neighborhood_2d_plan,
    routed_plan,
    sliding_window_plan,
)

OP = "SparseAttention"
PATTERNS = ("sliding_window", "neighborhood_2d", "block_topk", "block_layout")
BIAS_KINDS = ("none", "key", "full")

SCHEMA = OpSchema(
    name=OP,
    inputs=("Q", "K", "V", "bias?", "layout?"),
    outputs=("Y",),
    attributes={
        "pattern": "sliding_window | neighborhood_2d | block_topk | block_layout",
        "scale": "float, multiplies Q·Kᵀ",
        "seq_len": "int, static N the body is built for",
        "bias": "none | key ([.., 1, N]) | full ([.., N, N])",
        "window": "int (sliding_window)", "causal": "0/1 (sliding_window)",
        "num_global": "int: leading global tokens (block_*: global queries only)",
        "grid": "[h, w] (neighborhood_2d)", "kernel": "int (neighborhood_2d)", "dilation": "int (neighborhood_2d)",
        "block_size": "query block (sliding_window), tile side (neighborhood_2d), block (block_*)",
        "topk": "int (block_topk, block_layout)", "keep_diagonal": "0/1 (block_topk)", "keep_first": "0/1 (block_topk)",
    },
    shape_rule="Y = [B, H, N, Dv] with B, H, N from Q and Dv from V",
    doc=__doc__.split("\n\n")[0],
)

PATTERN_KEYS = {
    "sliding_window": ("window", "causal", "num_global", "block_size"),
    "neighborhood_2d": ("grid", "kernel", "dilation", "num_global", "block_size"),
    "block_topk": ("block_size", "topk", "keep_diagonal", "keep_first", "num_global"),
    "block_layout": ("block_size", "topk", "num_global"),
}
_DEFAULTS = {"window": 256, "causal": 0, "num_global": 0, "kernel": 7, "dilation": 1, "block_size": 0, "topk": 8,
             "keep_diagonal": 1, "keep_first": 1}


def normalize(pattern: str, seq_len: int, scale: float, bias: str = "none", **params) -> dict:
    """The full static attribute set of a node: defaults filled in, only the pattern's keys kept, checked."""
    if pattern not in PATTERNS:
        raise ConfigError(f"pattern: {pattern!r} is not one of {', '.join(PATTERNS)}")
    if bias not in BIAS_KINDS:
        raise ValueError(f"bias kind {bias!r}")
    out: dict = {"pattern": pattern, "seq_len": int(seq_len), "scale": float(scale), "bias": bias}
    for key in PATTERN_KEYS[pattern]:
        val = params.get(key)
        out[key] = _DEFAULTS.get(key) if val is None else val
    for key in ("window", "kernel", "dilation", "topk"):
        if key in out and int(out[key]) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {out[key]}")
    for key in ("num_global", "block_size"):
        if key in out and int(out[key]) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {out[key]}")
    if out["num_global"] >= seq_len:
        raise ConfigError(f"num_global: {out['num_global']} leaves no tokens of the {seq_len} for the pattern")
    if pattern == "neighborhood_2d":
        grid = out.get("grid")
        if grid is None:
            raise ConfigError("grid: neighborhood_2d needs the token grid [h, w]")
        out["grid"] = [int(grid[0]), int(grid[1])]
        if out["num_global"] + out["grid"][0] * out["grid"][1] != seq_len:
            raise ConfigError(f"grid: {out['grid']} plus {out['num_global']} prefix tokens != sequence length {seq_len}")
    for key in ("causal", "keep_diagonal", "keep_first"):
        if key in out:
            out[key] = int(bool(out[key]))
    for key in ("window", "kernel", "dilation", "topk", "num_global", "block_size"):
        if key in out:
            out[key] = int(out[key])
    if pattern == "block_topk" and out["keep_diagonal"] + out["keep_first"] > out["topk"]:
        raise ConfigError(f"topk: {out['topk']} is fewer than the blocks always kept (keep_diagonal/keep_first)")
    return out


def _plan(a: dict) -> GatheredPlan | RoutedPlan:
    n, p = a["seq_len"], a["pattern"]
    if p == "sliding_window":
        return sliding_window_plan(n, a["window"], bool(a["causal"]), a["num_global"], effective_block(a))
    if p == "neighborhood_2d":
        return neighborhood_2d_plan(n, tuple(a["grid"]), a["kernel"], a["dilation"], a["num_global"],
                                    effective_block(a))
    return routed_plan(n, a["block_size"] or 64, a["topk"], a["num_global"])


def _force(a: dict, plan: RoutedPlan) -> np.ndarray | None:
    if not (a.get("keep_diagonal") or a.get("keep_first")):
        return None
    f = np.zeros((plan.nb, plan.nb), dtype=np.float32)
    if a.get("keep_first"):
        f[:, 0] = FORCE
    if a.get("keep_diagonal"):
        f[np.arange(plan.nb), np.arange(plan.nb)] = FORCE
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


def _allowed_routed(a: dict, q: np.ndarray, k: np.ndarray, layout: np.ndarray | None,
                    bias: np.ndarray | None) -> np.ndarray:
    """[B, H, N, N] bool: each query block's chosen key blocks, expanded to tokens."""
    bsz, heads, n, _ = q.shape
    b = max(1, min(a["block_size"] or 64, n))
    nb = -(-n // b)
    blk = np.arange(n) // b
    if a["pattern"] == "block_layout":
        lay = np.broadcast_to(np.asarray(layout) > 0, (heads, nb, nb))
        chosen = np.broadcast_to(lay, (bsz, heads, nb, nb))
    else:
        kk = min(a["topk"], nb)
        qm = np.stack([q[:, :, blk == t].mean(axis=2) for t in range(nb)], axis=2)
        km = np.stack([k[:, :, blk == t].mean(axis=2) for t in range(nb)], axis=2)
        score = (qm @ np.swapaxes(km, -1, -2)).astype(np.float64) * a["scale"]
        forced = np.zeros((nb, nb), dtype=bool)
        if a["keep_first"]:
            forced[:, 0] = True
        if a["keep_diagonal"]:
            forced[np.arange(nb), np.arange(nb)] = True
        if bias is not None:  # largest floored bias of each (query block, key block) tile
            fb = np.broadcast_to(np.maximum(bias, -1e30), (bsz, heads, n, n))
            pad = nb * b - n
            fb = np.pad(fb, ((0, 0), (0, 0), (0, pad), (0, pad)), constant_values=-1e30)
            tile_max = fb.reshape(bsz, heads, nb, b, nb, b).max(axis=(3, 5))
            if bias.shape[2] == 1:  # a key bias is the same for every query block (padded query rows aside)
                tile_max = np.broadcast_to(tile_max[:, :, :1], tile_max.shape)
            score = score + tile_max
        score = np.where(forced, np.inf, score)
        order = np.argsort(-score, axis=-1, kind="stable")[..., :kk]
        chosen = np.zeros((bsz, heads, nb, nb), dtype=bool)
        np.put_along_axis(chosen, order, True, axis=-1)
    return chosen[:, :, blk][:, :, :, blk]


def reference(q, k, v, bias=None, layout=None, **attrs) -> np.ndarray:
    """Dense attention restricted to the pattern's allowed set, in numpy (float64 accumulation)."""
    n = q.shape[2]
    a = normalize(seq_len=n, **({"scale": 1.0 / math.sqrt(q.shape[-1])} | attrs))
    if a["pattern"] in ("sliding_window", "neighborhood_2d"):
        allowed = _allowed_static(a)[None, None]
    else:
        allowed = _allowed_routed(a, q, k, layout, bias).copy()
        allowed[:, :, : a["num_global"]] = True
    s = (q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2)) * a["scale"]
    if bias is not None:
        s = s + np.maximum(bias.astype(np.float64), -1e30)
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v.astype(np.float64)).astype(np.float32)


# ---------------------------------------------------------------- ONNX function and node


def make_function(attrs: dict, layout_input: bool = False, opset: int = 18) -> ir.Function:
    """The standard-op body for one normalized attribute set (``normalize``).

    ``opset`` (>= 18) is the default-domain opset the body imports; it must equal the model's (ONNX checker).
    """
    if opset < 18:
        raise ValueError(f"the SparseAttention body needs opset >= 18, the model imports {opset}")
    a = attrs
    names = ["Q", "K", "V"] + (["bias"] if a["bias"] != "none" or layout_input else []) + (["layout"] if layout_input else [])
    inputs = [ir.Value(name=nm) for nm in names]
    plan = _plan(a)
    if isinstance(plan, GatheredPlan):
        body, out = gathered_body(plan, a["scale"], a["bias"], inputs)
    else:
        force = _force(a, plan) if a["pattern"] == "block_topk" else None
        body, out = routed_body(plan, a["scale"], a["bias"], force, a["pattern"] == "block_layout", inputs)
    out.name = "Y"
    graph = ir.Graph(inputs, [out], nodes=body.nodes, opset_imports={"": opset}, name=OP)
    return ir.Function(DOMAIN, OP, _overload(a), graph=graph, attributes=_node_attrs(a))


def _overload(a: dict) -> str:
    return f"{a['pattern']}_{overload_key(a)}"


def _node_attrs(a: dict) -> list[ir.Attr]:
    return [ir.convenience.convert_attribute(k, v) for k, v in sorted(a.items())]


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


def make_node(q: ir.Value, k: ir.Value, v: ir.Value, attrs: dict, bias: ir.Value | None = None,
              layout: ir.Value | None = None, name: str | None = None, opset: int = 18) -> tuple[ir.Node, ir.Function]:
    """A SparseAttention node and its function body (register the body with ``add_function``)."""
    inputs = [q, k, v] + ([bias] if bias is not None or layout is not None else []) + ([layout] if layout is not None else [])
    fn = make_function(attrs, layout_input=layout is not None, opset=opset)
    node = ir.Node(DOMAIN, OP, inputs, _node_attrs(attrs), overload=fn.overload, name=name, num_outputs=1)
    return node, fn


def attrs_of(node: ir.Node) -> dict:
    out = {}
    for key, attr in node.attributes.items():
        val = attr.value
        out[key] = list(val) if isinstance(val, (tuple, list)) or (hasattr(val, "__iter__") and not isinstance(val, str)) else val
    return out


def scores_per_head(attrs: dict) -> int:
    """Score entries (q·k products) the body computes per (batch, head)."""
    return _plan(attrs).scores_per_head()


def effective_block(attrs: dict) -> int:
    """The block size the body uses: query block (sliding_window), tile side (neighborhood_2d), block (block_*)."""
    a = attrs
    if a["pattern"] == "sliding_window":
        return a["block_size"] or min(128, max(16, a["window"]))
    if a["pattern"] == "neighborhood_2d":
        return a["block_size"] or max(2, (a["kernel"] + 1) // 2)
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


@flops_rule(OP)
def flops(node: ir.Node) -> int:
    """Executed FLOPs of a SparseAttention node (symbolic batch counts as 1)."""
    q, v = node.inputs[0], node.inputs[2]
    dims = [d if isinstance(d, int) else 1 for d in (q.shape or [1, 1, 1, 1])]
    dv = v.shape[-1] if v.shape is not None and isinstance(v.shape[-1], int) else dims[-1]
    return attention_flops(attrs_of(node), dims[0], dims[1], dims[-1], dv)[0]
