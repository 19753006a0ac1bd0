"""Find attention blocks; fold every spelling to one :class:`AttentionBlock` record. Changes nothing.

Spellings matched (op-type strings live here, not in passes):
  1. ``MatMul(q, kᵀ) → (Mul|Div by scalar)? → (Add bias/mask)? → Softmax → (Where(IsNaN) guard | Cast)? → MatMul(·, v)``:
     dynamo opset-18 and TorchScript exports. The scale may also sit on q and kᵀ separately (√scale each, as
     torch's SDPA decomposition writes it). kᵀ is ``Transpose(k, perm=(..., -1, -2))`` or HF's
     ``Reshape → Transpose(0, 2, 1) → Reshape``; when neither, ``k`` is ``None`` and only ``k_transposed`` is set.
  2. The standard ``Attention`` op (opset ≥ 23), 4-D [B, H, N, D] inputs, or 3-D with ``q_num_heads``.
  3. ``com.microsoft`` ``Attention`` (packed QKV projection inside) and ``MultiHeadAttention`` ([B, N, C] inputs).

  In spelling 1 both products may be ``Einsum`` ops (``…id,…jd->…ij`` and ``…ij,…jd->…id``, the 5-D
  ``[B, G, H, T, D]`` core torchvision's MaxViT exports; ``k`` is then the einsum's input itself), and the logits
  may also get Swin's shifted-window mask over a 5-D view,
  ``Reshape(Add(Reshape(s → [B, nW, H, T, T]), m) → [B·nW, H, T, T])`` with ``m`` from constants
  (``window_mask``; the three nodes are part of ``nodes``).

Facts read through the exporter's spellings: ``kv_heads`` counts the distinct K/V heads (a ``repeat_kv``
Expand/Reshape to the query heads is traced back with ``_index_trace``; ``core_kv_heads`` is what the matmuls see),
``causal`` and ``prefix_tokens`` come from ``_block_facts``. A Softmax or Attention node that matches no spelling
is a :class:`NoMatch` with the reason (``match_attention`` / ``unmatched_attention``; ``inspect --explain``).

Besides the core, each record carries the residual stream the block lives on when the graph shows it:
the value entering the qkv projection (``attn_input``), the output projection, the residual ``Add`` and, for a
post-norm block, the ``LayerNormalization`` right after it (``post_norm``). Between the output projection and the
residual ``Add`` the walk passes data-movement ops (a window reverse), a bias ``Add``, inference ``Dropout`` and a
layer-scale ``Mul`` by a ``[C]`` constant (DINOv2 / CaiT; ``layer_scale``).

Window / grid attention (``analysis._windows``: how it is recognised): when data-movement ops between the stream
and the qkv projection rearrange tokens, the record says how:
  * ``partition``: ``"window"`` (Swin, MaxViT block attention), ``"grid"`` (MaxViT grid attention), ``"other"``
    (tokens rearranged in a way not described; ``partition_note`` says what did not match), ``None`` (none);
  * ``window`` (rows, cols of a window / grid group), ``tokens_per_window`` (= ``tokens``, the core's query
    length), ``windows`` per image, ``dilation`` (step between a window's tokens on the map: (1, 1) for windows),
    ``shifted`` / ``shift`` (window starts offset, a rolled map), ``spatial`` (the H × W token map), ``padded``
    (a ``Pad`` to a multiple of the window comes first; ``spatial`` is then the padded map);
  * ``rel_pos_bias``: the logits get a constant per-head ``[.., H, T, T]`` bias (``mask`` holds it);
  * ``partition_input`` (the stream value, ``[B, L, C]`` or ``[B, H, W, C]``), ``partition_nodes`` (stream →
    projection input) and ``reverse_nodes`` (output projection → residual Add; checked to put every token back,
    else the partition is ``"other"``).
When the stream itself is partitioned (torchvision MaxViT: the residual Adds run on ``[B, G, T, C]`` and the
reverse follows the MLP), the chain is taken from the LayerNorm's input, ``residual_in`` is the partitioned stream,
``reverse_nodes`` stays empty (not checked; ``partition_note`` says so), and a grid taken from the previous layer's
window layout is described on the image through that layer's token map. A core over a rank-5 q that matches none
of this is ``"other"``.
Passes that cannot handle windows refuse a block whose ``partition`` is set (``partition_summary()`` is the
text for the reason).
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from graphprune._ir import const_value, dim
from graphprune.analysis import _block_facts, _index_trace, _windows

MS = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class NoMatch:
    """A failed match and why (``onnxscript``'s ``MatchResult.fail`` idea): falsy, carries the node and the reason."""

    reason: str
    node: ir.Node | None = None

    def __bool__(self) -> bool:
        return False

    def describe(self) -> dict:
        n = self.node
        return {"node": n.name if n is not None else None, "op": n.op_type if n is not None else None,
                "reason": self.reason}


@dataclasses.dataclass
class AttentionBlock:
    """One attention core found in a graph (graph order gives ``index``)."""

    index: int
    kind: str  # "matmul_softmax" | "attention_op" | "ms_attention" | "ms_mha"
    nodes: list[ir.Node]  # the core nodes, q·kᵀ … ·v (or the single fused node)
    q: ir.Value | None
    k: ir.Value | None  # [B, H, N, D] when recoverable
    v: ir.Value | None
    output: ir.Value  # attention output in the core's layout, before heads are merged
    layout: str = "BHND"  # "BHND" | "BNC" (MultiHeadAttention) | "packed" (ms Attention)
    k_transposed: ir.Value | None = None  # [B, H, D, N] input of the q·kᵀ MatMul
    probs: ir.Value | None = None  # softmax output; None for fused ops
    logits: ir.Value | None = None  # softmax input (after scale and mask)
    mask: ir.Value | None = None  # additive bias / mask input, if any
    scale: float | None = None
    heads: int | None = None
    kv_heads: int | None = None  # distinct K/V heads (a repeat_kv expansion to the query heads is seen through)
    head_dim: int | None = None
    tokens: int | None = None  # static query length, when known
    token_axis: int = 1  # token axis of the residual stream [B, N, C]
    prefix_tokens: int = 0  # CLS / register / distillation tokens before the patch tokens
    causal: bool = False
    attn_input: ir.Value | None = None  # residual-stream value feeding the q/k/v projections
    out_proj: ir.Node | None = None  # output projection (MatMul/Gemm with weight initializer)
    residual_add: ir.Node | None = None  # the Add that puts the block's output back on the stream
    residual_in: ir.Value | None = None  # the stream value the residual Add adds to
    post_norm: ir.Node | None = None  # a standard LayerNormalization that is the residual Add's only user (post-norm)
    layer_scale: ir.Node | None = None  # per-channel Mul (γ [C]) between the output projection and the residual Add
    # -- window / grid attention (Swin, MaxViT): the core sees [B·windows, H, T, D]; ``tokens`` is T
    partition: str | None = None  # "window" | "grid" | "other" (tokens rearranged in a way not described); None: none
    window: tuple[int, int] | None = None  # rows × cols of tokens in one window (grid: one group)
    windows: int | None = None  # windows (grid: groups) per image
    tokens_per_window: int | None = None  # = window[0] · window[1] = T
    dilation: tuple[int, int] | None = None  # step between a window's tokens on the map: (1, 1), grid (H/gh, W/gw)
    shifted: bool = False  # windows start at an offset (Swin's rolled map)
    shift: tuple[int, int] = (0, 0)  # that offset (rows, cols)
    spatial: tuple[int, int] | None = None  # the H × W token map the windows tile (padded, when ``padded``)
    padded: bool = False  # the map is padded to a multiple of the window first (a Pad node in partition_nodes)
    rel_pos_bias: bool = False  # the logits get a constant per-head bias [1|·, H, T, T] (relative positions)
    window_mask: ir.Value | None = None  # Swin's shift mask, added over a [B, windows, H, T, T] view of the logits
    partition_input: ir.Value | None = None  # stream-side value the partition starts from ([B, L, C] or [B, H, W, C])
    partition_nodes: list[ir.Node] = dataclasses.field(default_factory=list)  # stream → projection input
    reverse_nodes: list[ir.Node] = dataclasses.field(default_factory=list)  # output projection → residual Add
    partition_note: str | None = None  # for "other": what did not match; else a note (e.g. reverse not checked)

    @property
    def core_kv_heads(self) -> int | None:
        """Heads of the k/v operands as the core multiplies them: ``kv_heads``, or the query heads when the graph
        expands k/v to them first (a ``repeat_kv`` Expand/Reshape before the matmuls)."""
        v_heads = dim(self.v, -3) if self.kind == "matmul_softmax" and self.v is not None else None
        return v_heads if v_heads is not None and (self.v.shape is not None and len(self.v.shape) >= 4) else self.kv_heads

    @property
    def residual_out(self) -> ir.Value | None:
        return self.residual_add.outputs[0] if self.residual_add is not None else None

    def describe(self) -> dict:
        """JSON-ready summary, as ``graphprune inspect --json`` prints it."""
        return {
            "index": self.index,
            "kind": self.kind,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "tokens": self.tokens,
            "kv_heads": self.kv_heads,
            "prefix_tokens": self.prefix_tokens,
            "has_probs": self.probs is not None,
            "has_mask": self.mask is not None,
            "causal": self.causal,
            "layer_scale": self.layer_scale is not None,
            "partition": self.partition,
            "window": list(self.window) if self.window else None,
            "windows": self.windows,
            "tokens_per_window": self.tokens_per_window,
            "dilation": list(self.dilation) if self.dilation else None,
            "shifted": self.shifted,
            "padded": self.padded,
            "rel_pos_bias": self.rel_pos_bias,
            "nodes": [n.name for n in self.nodes],
        }

    def partition_summary(self) -> str | None:
        """``windowed attention (7×7 windows)``, ``grid attention (7×7 groups, dilation 8×8)``, or None."""
        if self.partition is None:
            return None
        if self.partition == "other" or self.window is None:
            return f"tokens are rearranged before the attention ({self.partition_note or 'not a window partition'})"
        size = f"{self.window[0]}×{self.window[1]}"
        if self.partition == "grid":
            return f"grid attention ({size} groups, dilation {self.dilation[0]}×{self.dilation[1]})"
        return f"{'shifted ' if self.shifted else ''}windowed attention ({size} windows)"


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_value(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def _producer(value: ir.Value | None, op: str, domain: str = "") -> ir.Node | None:
    if value is None:
        return None
    node = value.producer()
    if node is not None and node.op_type == op and node.domain == domain:
        return node
    return None


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """``Mul(x, c)`` / ``Div(x, c)`` by a scalar constant → (x, factor); else (value, 1)."""
    for op in ("Mul", "Div"):
        node = _producer(value, op)
        if node is None:
            continue
        for i in (0, 1):
            c = _scalar(node.inputs[1 - i]) if (op == "Mul" or i == 0) else None
            if c is not None and node.inputs[i] is not None:
                return node.inputs[i], (c if op == "Mul" else 1.0 / c)
    return value, 1.0


def _untranspose_k(kt: ir.Value) -> ir.Value | None:
    """Recover k [B, H, N, D] from kᵀ [B, H, D, N] when kᵀ is a transpose of it."""
    tr = _producer(kt, "Transpose")
    if tr is not None:
        perm = list(tr.attributes.get_ints("perm", []))
        n = len(perm)
        if n >= 2 and perm == list(range(n - 2)) + [n - 1, n - 2]:
            return tr.inputs[0]
    # HF / SDPA decomposition: Reshape([B*H, N, D]) → Transpose(0, 2, 1) → Reshape([B, H, D, N]).
    r2 = _producer(kt, "Reshape")
    tr = _producer(r2.inputs[0], "Transpose") if r2 is not None else None
    r1 = _producer(tr.inputs[0], "Reshape") if tr is not None else None
    if r1 is not None and list(tr.attributes.get_ints("perm", [])) == [0, 2, 1]:
        k = r1.inputs[0]
        # only a [B, H, N, D] source is k itself; GQA exports reshape a [B, kv_heads, rep, N, D] expansion here
        if k is not None and k.shape is not None and len(k.shape) == 4:
            return k
    return None


def _single_user(value: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Follow the softmax output through guard nodes (IsNaN/Where, Cast, Dropout, Identity) to its consumer."""
    passed: list[ir.Node] = []
    cur = value
    while True:
        users = [u for u, _ in cur.uses()]
        isnan = [u for u in users if u.op_type == "IsNaN"]
        where = [u for u in users if u.op_type == "Where"]
        if isnan and len(where) == 1 and len(users) == 2:
            passed += [isnan[0], where[0]]
            cur = where[0].outputs[0]
            continue
        if len(users) == 1 and users[0].op_type in ("Cast", "Dropout", "Identity"):
            passed.append(users[0])
            cur = users[0].outputs[0]
            continue
        return (users[0] if len(users) == 1 else None), passed


def _match_softmax(sm: ir.Node) -> AttentionBlock | NoMatch:
    """The attention core around ``sm`` (spelling 1), or why there is none."""
    axis = sm.attributes.get_int("axis", -1)
    logits = sm.inputs[0]
    rank = len(logits.shape) if logits.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return NoMatch("the softmax is not over the last axis (the keys)", sm)
    core = [sm]
    mask = None
    cur = logits
    win = _window_mask(cur)
    if win is not None:
        cur, window_mask, win_nodes = win
        core += win_nodes
    add = _producer(cur, "Add")
    if add is not None:
        # The branch that leads back to a MatMul (possibly via a scalar Mul/Div) is the q·kᵀ side.
        for i in (0, 1):
            inner, _ = _strip_scale(add.inputs[i])
            if _producer(inner, "MatMul") is not None or _einsum(inner, "qk") is not None:
                mask, cur = add.inputs[1 - i], add.inputs[i]
                core.append(add)
                break
        else:
            return NoMatch(f"the softmax input is an Add {add.name!r} of which no side comes from a q·kᵀ MatMul", sm)
    scale = 1.0
    inner, factor = _strip_scale(cur)
    if inner is not cur:
        core.append(cur.producer())
        scale *= factor
    qk = _producer(inner, "MatMul") or _einsum(inner, "qk")
    if qk is None:
        p = inner.producer()
        return NoMatch(f"the softmax input is not a q·kᵀ MatMul or Einsum (it comes from "
                       f"{'a graph input' if p is None else p.op_type + ' ' + repr(p.name)})", sm)
    core.append(qk)
    q, fq = _strip_scale(qk.inputs[0])
    kt, fk = _strip_scale(qk.inputs[1])
    scale *= fq * fk
    pv, guards = _single_user(sm.outputs[0])
    if pv is None or pv.op_type != qk.op_type or pv.inputs[0] is not (guards[-1].outputs[0] if guards else sm.outputs[0]):
        users = [u.op_type for u, _ in (guards[-1].outputs[0] if guards else sm.outputs[0]).uses()]
        return NoMatch(f"the probabilities are not multiplied by v in one {qk.op_type} (their users: "
                       f"{', '.join(users) or 'none'})", sm)
    if pv.op_type == "Einsum" and _einsum(pv.outputs[0], "pv") is None:
        return NoMatch("the probabilities · v Einsum is not '…ij,…jd->…id'", sm)
    core += guards + [pv]
    v = pv.inputs[1]
    out = pv.outputs[0]
    rank = len(q.shape) if q.shape is not None else 0
    heads = dim(q, -3) if rank >= 4 else None
    kv_heads = dim(v, -3) if rank >= 4 else None
    if kv_heads:  # grouped-query attention expanded to the query heads (``repeat_kv``): the distinct heads of v
        kv_heads = _index_trace.distinct_along(v, -3) or kv_heads
    head_dim = dim(q, -1)
    return AttentionBlock(
        index=-1,
        kind="matmul_softmax",
        nodes=list(reversed(core[: len(core) - len(guards) - 1])) + guards + [pv],
        q=q,
        k=kt if qk.op_type == "Einsum" else _untranspose_k(kt),  # einsum takes k itself
        v=v,
        output=out,
        k_transposed=None if qk.op_type == "Einsum" else kt,
        probs=sm.outputs[0],
        logits=logits,
        mask=mask,
        scale=scale,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        tokens=dim(q, -2),
        window_mask=win[1] if win is not None else None,
    )


def _einsum(value: ir.Value, role: str) -> ir.Node | None:
    """The ``Einsum`` producing ``value`` when it is q·kᵀ (``role`` "qk": ``…id,…jd->…ij``) or probs·v ("pv":
    ``…ij,…jd->…id``) with the same batch letters everywhere (torchvision MaxViT: ``BGHID,BGHJD->BGHIJ``)."""
    node = _producer(value, "Einsum")
    eq = node.attributes.get_string("equation", "").replace(" ", "") if node is not None else ""
    if "->" not in eq or eq.count(",") != 1 or "." in eq:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if not (len(a) == len(b) == len(out) >= 3) or not a[:-2] == b[:-2] == out[:-2]:
        return None
    i, x = a[-2:]
    if role == "qk":
        j, d = b[-2:]
        ok = d == x and out[-2:] == i + j
    else:
        j, d = b[-2:]
        ok = j == x and out[-2:] == i + d
    return node if ok and len(set(a[-2:] + b[-2:])) == 3 else None


def _window_mask(logits: ir.Value) -> tuple[ir.Value, ir.Value, list[ir.Node]] | None:
    """Swin's shifted-window mask: ``Reshape(Add(Reshape(x → [B, nW, H, T, T]), m) → [B·nW, H, T, T])`` with ``m``
    computed from constants → (x, m, [outer Reshape, Add, inner Reshape])."""
    outer = _producer(logits, "Reshape")
    add = _producer(outer.inputs[0], "Add") if outer is not None else None
    if add is None:
        return None
    for i in (0, 1):
        inner = _producer(add.inputs[i], "Reshape")
        m = add.inputs[1 - i]
        if inner is None or not _const_derived(m):
            continue
        x, view = inner.inputs[0], inner.outputs[0]
        shapes = [v.shape for v in (x, view, logits)]
        if any(sh is None for sh in shapes) or len(shapes[0]) != 4 or len(shapes[1]) != 5 or len(shapes[2]) != 4:
            continue
        if list(shapes[0])[1:] == list(shapes[1])[2:] == list(shapes[2])[1:]:
            return x, m, [outer, add, inner]
    return None


def _const_derived(value: ir.Value | None, budget: int = 256) -> bool:
    """True when ``value`` is a constant or computed from constants only (no graph input): a mask or bias built in
    the forward (torchvision's Swin computes its shift mask there)."""
    if value is None:
        return False
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen or const_value(v) is not None:
            continue
        seen.add(id(v))
        prod = v.producer()
        if prod is None or len(seen) > budget:
            return False
        stack.extend(x for x in prod.inputs if x is not None)
    return True


def _match_attention_op(node: ir.Node) -> AttentionBlock:
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    qh = node.attributes.get_int("q_num_heads", 0) or None
    kvh = node.attributes.get_int("kv_num_heads", 0) or None
    rank = len(q.shape) if q.shape is not None else 4
    if rank == 4:
        heads, kv_heads, head_dim, tokens = dim(q, 1), dim(k, 1), dim(q, 3), dim(q, 2)
    else:  # [B, N, H*D]
        heads, kv_heads = qh, kvh
        hidden = dim(q, 2)
        head_dim = hidden // heads if (hidden and heads) else None
        tokens = dim(q, 1)
    scale = node.attributes.get_float("scale", 0.0) or (1.0 / math.sqrt(head_dim) if head_dim else None)
    return AttentionBlock(
        index=-1,
        kind="attention_op",
        nodes=[node],
        q=q,
        k=k,
        v=v,
        output=node.outputs[0],
        layout="BHND" if rank == 4 else "BNC",
        mask=mask,
        scale=scale,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        tokens=tokens,
        causal=bool(node.attributes.get_int("is_causal", 0)),
    )


def _match_ms(node: ir.Node) -> AttentionBlock:
    heads = node.attributes.get_int("num_heads", 0) or None
    scale = node.attributes.get_float("scale", 0.0) or None
    if node.op_type == "Attention":  # input [B, N, C], packed weights [C, 3C]
        x = node.inputs[0]
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        hidden = (w.shape[1] // 3) if w is not None else None
        head_dim = hidden // heads if (hidden and heads) else None
        blk = AttentionBlock(
            index=-1, kind="ms_attention", nodes=[node], q=None, k=None, v=None, output=node.outputs[0],
            layout="packed", heads=heads, head_dim=head_dim, tokens=dim(x, 1), scale=scale, attn_input=x,
            causal=bool(node.attributes.get_int("unidirectional", 0)),
        )
        return blk
    q, k, v = (node.inputs[i] if len(node.inputs) > i else None for i in range(3))
    hidden = dim(q, 2)
    head_dim = hidden // heads if (hidden and heads) else None
    return AttentionBlock(
        index=-1, kind="ms_mha", nodes=[node], q=q, k=k, v=v, output=node.outputs[0], layout="BNC",
        heads=heads, head_dim=head_dim, tokens=dim(q, 1), scale=scale,
        mask=node.inputs[4] if len(node.inputs) > 4 else None,
    )


_PASS_THROUGH = {"Transpose", "Reshape", "Gather", "Split", "Squeeze", "Unsqueeze", "Slice", "Mul", "Add", "Div"}


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and const_value(value) is not None


def _projection_input(value: ir.Value | None, limit: int = 8) -> ir.Value | None:
    """Walk back from q/k/v through reshapes, head splits, bias and scale to the projection's input."""
    cur = value
    for _ in range(limit):
        node = cur.producer() if cur is not None else None
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm") and _is_weight(node.inputs[1]):
            return node.inputs[0]
        if node.op_type not in _PASS_THROUGH:
            return None
        # follow the non-constant data input
        data = [i for i in node.inputs[:2] if i is not None and const_value(i) is None]
        if len(data) != 1:
            return None
        cur = data[0]
    return None


def _post_norm(add: ir.Node) -> ir.Node | None:
    """The standard ``LayerNormalization`` reading the residual ``Add`` as its only user (BERT-style post-norm)."""
    users = [u for u, _ in add.outputs[0].uses()]
    if len(users) == 1 and users[0].op_type == "LayerNormalization" and users[0].domain == "":
        return users[0]
    return None


def _attach_stream(blk: AttentionBlock, known: dict) -> None:
    """Find the projection input, output projection and residual Add around a core (through a window reverse and
    a layer-scale Mul), and the window partition when there is one."""
    src = blk.q if blk.q is not None else None
    if blk.attn_input is None and src is not None:
        blk.attn_input = _projection_input(src)
    cur = blk.output
    for _ in range(6):  # core output → (Transpose | Reshape)* → output projection
        users = [u for u, _ in cur.uses()]
        if len(users) != 1:
            return
        node = users[0]
        if node.op_type in ("MatMul", "Gemm") and _is_weight(node.inputs[1]):
            blk.out_proj = node
            break
        if node.op_type not in ("Transpose", "Reshape", "Add"):
            return
        cur = node.outputs[0]
    else:
        return
    part = _windows.describe(blk.attn_input, blk.tokens, known) if blk.attn_input is not None else None
    norm = blk.attn_input.producer() if blk.attn_input is not None else None
    stream_level = part is None and norm is not None and norm.op_type == "LayerNormalization"
    if stream_level:  # torchvision MaxViT: the stream itself is partitioned, the residual runs in window layout
        part = _windows.describe(norm.inputs[0], blk.tokens, known)
        if part is not None and part.kind == "other":  # only a described partition counts here (not a layout change)
            part = None
        if part is not None:
            known[id(norm.inputs[0])] = (part.tokmap.reshape(-1), part.spatial)
            part.reason = "the stream itself is partitioned; the reverse follows the MLP and is not checked"
    if part is None and blk.q is not None and blk.q.shape is not None and len(blk.q.shape) > 4:
        part = _windows.Partition("other", blk.attn_input, [], reason="attention over groups of tokens (rank-5 q)")
    region = _windows.forward_region(blk.out_proj.outputs[0])
    if region is None:
        _set_partition(blk, part, [])
        return
    nodes, exit_ = region
    users = [u for u, _ in exit_.uses() if u.op_type != "Shape"]
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" and users[0].domain == "" else None
    other = None if add is None else (add.inputs[1] if add.inputs[0] is exit_ else add.inputs[0])
    moves = [n for n in nodes if _windows.is_move(n)]
    if part is not None and part.kind != "other" and not stream_level and not (add is not None and _windows.reverse_ok(
            part, blk.out_proj.outputs[0], nodes, exit_)):
        part.kind, part.reason = "other", "the window reverse does not put every token back"
    _set_partition(blk, part, moves)
    if add is None or other is None or const_value(other) is not None:
        return
    blk.residual_add, blk.residual_in = add, other
    blk.layer_scale = next((n for n in nodes if n.op_type == "Mul" and any(
        (c := const_value(v)) is not None and c.size > 1 for v in n.inputs)), None)
    blk.post_norm = _post_norm(add)


def _set_partition(blk: AttentionBlock, part: _windows.Partition | None, reverse: list[ir.Node]) -> None:
    if blk.mask is not None and _const_derived(blk.mask) and blk.mask.shape is not None and len(blk.mask.shape) >= 3:
        h = blk.mask.shape[-3]
        blk.rel_pos_bias = isinstance(h, int) and h > 1 and h == blk.heads
    if part is None:
        if blk.window_mask is not None:
            blk.partition, blk.partition_note = "other", "a window mask without a window partition"
        return
    blk.partition, blk.partition_input, blk.partition_nodes = part.kind, part.source, part.nodes
    blk.reverse_nodes, blk.partition_note = reverse, part.reason
    if part.kind == "other":
        return
    blk.window, blk.windows, blk.tokens_per_window = part.window, part.windows, part.tokens_per_window
    blk.padded = part.pad is not None
    blk.dilation, blk.shift, blk.spatial = part.dilation, part.shift, part.spatial
    blk.shifted = part.shift != (0, 0)


def not_plain_causal(mask: ir.Value, model: ir.Model | ir.Graph) -> str | None:
    """``None`` when an attention ``mask`` is exactly the causal one whatever the inputs (a pattern that is causal
    by itself may drop it), else why not (a padding input, a position bias). See ``_block_facts``."""
    return _block_facts.not_plain_causal(mask, model.graph if isinstance(model, ir.Model) else model)


def find_attention_blocks(model: ir.Model | ir.Graph) -> list[AttentionBlock]:
    """All attention cores of the main graph, in graph order, with stream facts attached."""
    return match_attention(model)[0]


def unmatched_attention(model: ir.Model | ir.Graph) -> list[NoMatch]:
    """Every Softmax / Attention node that did not become an :class:`AttentionBlock`, with the reason."""
    return match_attention(model)[1]


def match_attention(model: ir.Model | ir.Graph) -> tuple[list[AttentionBlock], list[NoMatch]]:
    """(attention blocks in graph order with stream facts attached, the Softmax / Attention nodes that matched no
    spelling and why)."""
    graph = model.graph if isinstance(model, ir.Model) else model
    blocks: list[AttentionBlock] = []
    misses: list[NoMatch] = []
    known: dict = {}  # partitioned stream values (window layout) → their token map on the image
    for node in graph:
        blk = None
        if node.domain == "" and node.op_type == "Softmax":
            blk = _match_softmax(node)
        elif node.domain == "" and node.op_type == "Attention":
            blk = _match_attention_op(node)
        elif node.domain == MS and node.op_type in ("Attention", "MultiHeadAttention"):
            blk = _match_ms(node)
        if isinstance(blk, AttentionBlock):
            blk.index = len(blocks)
            _attach_stream(blk, known)
            blocks.append(blk)
        elif isinstance(blk, NoMatch):
            misses.append(blk)
    found = _block_facts.prefix_concat(graph)
    prefixed = _block_facts.prefixed_stream(found[0]) if found is not None else set()
    causal: dict[int, bool] = {}
    cache: dict = {}
    for blk in blocks:
        if found is not None:  # only the blocks whose stream descends from the prefix Concat
            blk.prefix_tokens = found[1] if _block_facts.reads_prefixed(blk.attn_input, blk.q, prefixed) else 0
        if blk.kind == "matmul_softmax" and blk.mask is not None:
            if id(blk.mask) not in causal:
                causal[id(blk.mask)] = _block_facts.is_causal_mask(blk.mask, graph, cache)
            blk.causal = causal[id(blk.mask)]
    return blocks, misses
