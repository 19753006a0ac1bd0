"""After the reductions: the tokens put back where the stream ends (``restore``: a selection scatters its kept
tokens into the stream it reduced, a merge copies each merged token to every token it absorbed), and the graph's
declared output shapes kept. Each reduction leaves a level: :class:`Selected` or :class:`Merged`."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphprune._ir import infer_shapes
from graphprune.ops import Body
from graphprune.passes.base import GraphResult
from graphprune.passes.token_drop.dynamic import DynamicTokens


@dataclasses.dataclass(frozen=True)
class Selected:
    """A selection: the stream it reduced (``full``), the kept tokens' ``indices [B, k]``, and whether a fused rest
    token follows them (it has no position to go back to)."""

    full: ir.Value
    indices: ir.Value
    fused: bool = False


@dataclasses.dataclass(frozen=True)
class Merged:
    """A ToMe merge: ``members [B, N_out, N]``, the merge of one-hot positions (row j is non-zero at the input
    tokens of output j)."""

    members: ir.Value


Level = Selected | Merged


def finish(model: ir.Model, result: GraphResult, restored: bool, end: ir.Value | None, levels: list[Level],
            per_token: list[str], out_shapes: list, n: int | None, dyn: DynamicTokens | None) -> None:
    """After the reductions: restore the tokens, sort, infer shapes, keep the declared output shapes."""
    info = result.info
    if restored:
        restore(model.graph, end, levels)
        info["restored_outputs"] = per_token
    model.graph.sort()
    infer_shapes(model)
    for out, shape in zip(model.graph.outputs, out_shapes):  # keep the declared output shapes (batch names)
        if shape is not None:
            dims = list(shape)
            if out.name in per_token and not restored:
                dims[1] = n if n is not None else f"{dyn.symbol}_kept"
            out.shape = ir.Shape(dims)
    if per_token and not restored:  # per-token outputs now carry the reduced tokens: reported, part of the contract
        info["per_token_outputs"] = per_token


def per_token_outputs(model: ir.Model, n: int | None, dyn: DynamicTokens | None) -> list[str]:
    """Graph outputs with a token axis ``[B, N, ...]`` (static ``n``, or the dynamic token symbol)."""
    out = []
    for o in model.graph.outputs:
        if o.shape is None or len(o.shape) < 3:
            continue
        d = o.shape[1]
        if (n is not None and d == n) or (dyn is not None and isinstance(d, ir.SymbolicDim) and d.value == dyn.symbol):
            out.append(o.name)
    return out


def restore(graph: ir.Graph, end: ir.Value, levels: list[Level]) -> None:
    """Put the tokens back at ``end``, innermost reduction first: a selection scatters its kept tokens into the
    stream it reduced (dropped tokens keep the value they had when dropped); a merge copies each merged token
    back to every input token it absorbed (ToMe's unmerge; ``members [B, N_out, N]`` is the merge of one-hot
    positions: row j is non-zero at the inputs of output j)."""
    uses = list(end.uses())  # before the restore nodes read it
    t = Body()
    y = end
    for level in reversed(levels):
        if isinstance(level, Merged):
            src = t.op("ArgMax", [level.members], {"axis": 1, "keepdims": 0})  # [B, N]: the output holding each input
            target = t.op("Concat", [t.op("Shape", [src]), t.op("Shape", [y], {"start": 2, "end": 3})], {"axis": 0})
            y = t.op("GatherElements", [y, t.op("Expand", [t.op("Unsqueeze", [src, t.ints(2)]), target])], {"axis": 1})
            continue
        full, idx, fused = level.full, level.indices, level.fused
        if fused:  # the fused rest token has no position: it is dropped at the restore
            y = t.op("Slice", [y, t.ints(0), t.ints(-1), t.ints(1)])
        ix = t.op("Expand", [t.op("Unsqueeze", [idx, t.ints(2)]), t.op("Shape", [y])])
        y = t.op("ScatterElements", [full, ix, y], {"axis": 1})
    graph.insert_after(end.producer(), list(t.nodes))
    for user, i in uses:
        user.replace_input_with(i, y)
    is_output = False
    for j, out in enumerate(graph.outputs):
        if out is end:
            graph.outputs[j] = y
            is_output = True
    if is_output:  # the graph output keeps its name
        name, end.name = end.name, f"{end.name}_reduced"
        y.name = name
    else:
        y.name = f"{end.name or 'stream'}_restored"


__all__ = ["Level", "Merged", "Selected", "finish", "per_token_outputs", "restore"]
