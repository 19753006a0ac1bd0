"""Facts about the residual stream around attention blocks, for the token passes and the torch front-end. Changes
nothing.

  * :func:`stream_point`: the stream value a token reduction after block ``i`` goes on, and the node after which it
    is inserted (``placement`` ``"attention"``: after the attention's residual ``Add``, or its post-norm;
    ``"block"``: the next block's input);
  * :func:`stream_end`: the stream after the last block's MLP, where dropped tokens are put back;
  * :func:`positional_reads`: Gathers downstream of a stream value that read token rows at positions computed
    before it (wrong once tokens are dropped);
  * :func:`reads_input`: whether a value is computed from the data of a graph input (not only its shape).
A fact that does not exist is a :class:`~graphprune.analysis.attention.NoMatch` carrying the reason; the passes turn
it into their skip reason.
"""

from __future__ import annotations

import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis.attention import AttentionBlock, NoMatch
from graphprune.analysis.tokens import downstream_nodes, is_gather, is_shape, is_stream_add, same_op

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def stream_point(blocks: list[AttentionBlock], blk: AttentionBlock, placement: str) -> tuple[ir.Value, ir.Node] | NoMatch:
    """(stream value to reduce, node after which to insert), or why there is none."""
    win = next((b for b in [blk, *blocks] if b.partition is not None), None)  # windows: counts are per window
    if win is not None:
        where = "" if win is blk else f" in block {win.index}"
        return NoMatch(f"block {blk.index}: {win.partition_summary()}{where}; token dropping across windows is not "
                       "supported")
    if blk.residual_add is None:
        return NoMatch(f"block {blk.index}: no residual Add found after the attention output")
    if placement == "block":
        if blk.index + 1 >= len(blocks) or blocks[blk.index + 1].residual_in is None:
            return NoMatch(f"block {blk.index}: no following block; placement 'block' needs one")
        val = blocks[blk.index + 1].residual_in
        prod = val.producer()
        if prod is None:
            return NoMatch(f"block {blk.index}: block boundary value has no producer")
        return val, prod
    if blk.post_norm is not None:  # post-norm: reduce after the LayerNorm
        return blk.post_norm.outputs[0], blk.post_norm
    return blk.residual_add.outputs[0], blk.residual_add


def stream_end(blk: AttentionBlock) -> ir.Value | NoMatch:
    """The residual stream after the last block's MLP (where ``restore`` puts the dropped tokens back): the MLP's
    residual ``Add`` (of the stream after attention and the MLP's output), or the LayerNorm on it (post-norm)."""
    if blk.residual_add is None:
        return NoMatch(f"restore: block {blk.index} has no residual Add after the attention; cannot find the end of "
                       "the residual stream")
    s = blk.post_norm.outputs[0] if blk.post_norm is not None else blk.residual_add.outputs[0]
    adds = [u for u, _ in s.uses() if is_stream_add(u)]
    if len(adds) != 1:
        return NoMatch(f"restore: block {blk.index}: no single MLP residual Add after the attention; cannot find the "
                       "end of the residual stream")
    end = adds[0].outputs[0]
    if blk.post_norm is not None:
        users = end.uses()
        if len(users) == 1 and same_op(users[0][0], blk.post_norm):
            end = users[0][0].outputs[0]
    return end


def positional_reads(stream: ir.Value) -> list[ir.Node]:
    """Gathers downstream of ``stream`` that read token rows at positions computed before it (CLIP's text pooling
    takes the row at ``input_ids.argmax(-1)``): positions in the full sequence, wrong once tokens are dropped."""
    nodes = downstream_nodes(stream)
    down = {id(n) for n in nodes}
    out = []
    for n in nodes:
        if not is_gather(n):
            continue
        data, idx = n.inputs[0], n.inputs[1]
        prod = idx.producer() if idx is not None else None
        data_prod = data.producer() if data is not None else None
        if (idx is None or const_value(idx) is not None or (prod is not None and id(prod) in down)
                or data_prod is None or id(data_prod) not in down or data.dtype not in _FLOATS):
            continue
        out.append(n)
    return out


def reads_input(v: ir.Value, inputs, depth: int = 32) -> bool:
    """Is ``v`` computed from the data of a graph input (not just its shape)?"""
    stack, seen = [(v, 0)], set()
    while stack:
        x, d = stack.pop()
        if any(x is i for i in inputs):
            return True
        p = x.producer()
        if p is None or id(p) in seen or d >= depth or is_shape(p):
            continue
        seen.add(id(p))
        stack.extend((i, d + 1) for i in p.inputs if i is not None)
    return False


__all__ = ["positional_reads", "reads_input", "stream_end", "stream_point"]
