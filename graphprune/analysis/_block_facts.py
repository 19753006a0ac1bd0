"""Facts about attention blocks read off the graph around the core (for :mod:`graphprune.analysis.attention`).
Changes nothing.

  * prefix tokens (CLS / register / distillation): a token-axis ``Concat`` of a learned ``[1|B, p, C]`` tensor in
    front of the tokens; only the blocks whose stream still carries it (reached through ops that keep the stream's
    shape) have them, so a decoder fed with a vision tower's features (LLaVA: ``[:, 1:]`` drops the CLS) has none;
  * causal masks: the additive mask's computation is evaluated in numpy (the index-tracing interpreter's
    ``eval_shape``) with a padding mask that masks nothing; the mask is causal when it blocks exactly the keys after
    each query (exporters combine the causal and padding masks before adding them).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value, dim
from graphprune.analysis import _index_trace


def detect_prefix_tokens(graph: ir.Graph) -> int:
    """Number of prefix (CLS/register) tokens: a token-axis Concat of a learned [1|B, p, C] tensor with patch tokens.

    Returns 0 when the graph shows no such Concat (e.g. BERT, where [CLS] is an ordinary input token).
    """
    found = prefix_concat(graph)
    return found[1] if found is not None else 0


def prefix_concat(graph: ir.Graph) -> tuple[ir.Node, int] | None:
    for node in graph:
        if node.op_type != "Concat" or len(node.inputs) < 2:
            continue
        out = node.outputs[0]
        if out.shape is None or len(out.shape) != 3 or node.attributes.get_int("axis", 0) not in (1, -2):
            continue
        first = node.inputs[0]
        root = first
        for _ in range(3):  # Expand(cls_token, [B, 1, C]) or Tile or the parameter itself
            prod = root.producer() if root is not None else None
            if prod is None or prod.op_type not in ("Expand", "Tile", "Cast"):
                break
            root = prod.inputs[0]
        if root is not None and root.const_value is not None:
            p = dim(first, 1)
            if p is not None and p < (dim(out, 1) or 1 << 30):
                return node, p
    return None


def reads_prefixed(attn_input: ir.Value | None, q: ir.Value | None, prefixed: set[int], limit: int = 24) -> bool:
    """Whether a block's stream carries the prefix: its ``attn_input`` is in ``prefixed``; without one (a rotary
    q the projection walk does not pass), q's data path back to where the token count changes."""
    if attn_input is not None:
        return id(attn_input) in prefixed
    cur = q
    tokens = q.shape[-2] if q is not None and q.shape is not None and len(q.shape) >= 2 else None
    for _ in range(limit):
        if cur is None or id(cur) in prefixed:
            return cur is not None
        if cur.shape is not None and len(cur.shape) == 3 and tokens is not None and cur.shape[1] != tokens:
            return False
        p = cur.producer()
        cur = next((x for x in p.inputs if x is not None and const_value(x) is None), None) if p is not None else None
    return False


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def prefixed_stream(concat: ir.Node) -> set[int]:
    """Values that still carry the prefix tokens the ``concat`` put in front: its output and every value reached
    from it through ops whose output has the shape of their input (norms, residual Adds, projections, attention).
    A token Slice (LLaVA's ``[:, 1:]`` after the vision tower) or a merge into another sequence changes the shape
    and ends the walk, so a decoder fed with the vision features has no prefix of its own."""
    start = concat.outputs[0]
    seen, stack = {id(start)}, [start]
    while stack:
        v = stack.pop()
        for user, _ in v.uses():
            for o in user.outputs:
                if id(o) not in seen and _same_shape(o, v):
                    seen.add(id(o))
                    stack.append(o)
    return seen


_MASK_LEN = 7  # symbolic dims (batch, sequence) when a mask is evaluated for the causal fact
_MASKED = -1e4  # an additive mask entry at or below this blocks the key


def is_causal_mask(mask: ir.Value | None, graph: ir.Graph, cache: dict | None = None) -> bool:
    """True when the additive ``mask`` blocks exactly the keys after each query, whatever the padding mask.

    The mask's computation is evaluated in numpy (``_index_trace.eval_shape``: comparisons of ``Range``s, ``Trilu``,
    ``Where``, casts; symbolic dims as ``_MASK_LEN``) with every integer or bool graph input set to ones (a padding
    mask that masks nothing: exporters combine it with the causal mask by an and, so it can only add blocked keys).
    A mask that reads a float input, or whose computation cannot be evaluated, is not causal here."""
    if mask is None:
        return False
    try:
        return _blocks_later_keys(_evaluate(mask, _ones(graph), cache))
    except _EVAL_ERRORS:
        return False


_EVAL_ERRORS = (_index_trace.TraceStop, ValueError, TypeError, IndexError, OverflowError)


def _evaluate(mask: ir.Value, env: dict, cache: dict | None = None) -> np.ndarray:
    return np.asarray(_index_trace.eval_shape(mask, env, _MASK_LEN, limit=256, cache=cache), dtype=np.float64)


def _blocks_later_keys(m: np.ndarray) -> bool:
    """Does the evaluated mask block exactly the keys after each query?"""
    if m.ndim < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
        return False
    upper = np.triu(np.ones(m.shape[-2:], dtype=bool), 1)
    blocked = m <= _MASKED
    return bool(blocked[..., upper].all() and not blocked[..., ~upper].any())


def _ones(graph: ir.Graph) -> dict[ir.Value, np.ndarray]:
    """Every integer or bool graph input of a static (or ``_MASK_LEN``-filled) shape, set to ones."""
    env = {}
    for v in graph.inputs:
        shape = _index_trace.static_shape(v, _MASK_LEN)
        if shape is not None and (v.dtype is not None and v.dtype.is_integer() or v.dtype == ir.DataType.BOOL):
            env[v] = np.ones(shape, dtype=v.dtype.numpy())
    return env


def not_plain_causal(mask: ir.Value, graph: ir.Graph) -> str | None:
    """``None`` when the additive ``mask`` is exactly the causal one (keys after each query blocked, 0 elsewhere)
    whatever the inputs' values; else why not, in a few words (a padding input, a position bias such as ALiBi).

    Evaluated as in :func:`is_causal_mask` with the integer or bool inputs at ones, then with each in turn at
    zeros: an input whose values change the mask is read by it (a padding mask; ``input_ids`` only lends its
    shape)."""
    env = _ones(graph)
    try:
        base = _evaluate(mask, env)
        for v in env:
            if not np.array_equal(_evaluate(mask, env | {v: np.zeros_like(env[v])}), base):
                return f"it reads input {v.name!r} (padding)"
    except _EVAL_ERRORS:
        return "it cannot be evaluated"
    if not _blocks_later_keys(base):
        return "it is not the causal mask"
    if np.any(base[..., ~np.triu(np.ones(base.shape[-2:], dtype=bool), 1)] != 0):
        return "it adds values besides blocking later keys (a position bias such as ALiBi)"
    return None
