"""Residual blocks as removable units, for depth pruning (``passes.depth_prune``). Changes nothing.

A transformer block puts two residual branches on the stream, attention then MLP:

  * pre-norm:  ``mid = in + attn(norm(in))``, ``out = mid + mlp(norm(mid))``;
  * post-norm: ``mid = norm(in + attn(in))``, ``out = norm(mid + mlp(mid))`` (BERT, MiniLM).

:func:`residual_blocks` reads them off the attention blocks ``analysis.attention`` finds: ``stream_in`` is the value
the attention's residual ``Add`` adds to, ``mid`` the stream after attention (the Add, or its post-norm), ``out``
the stream after the MLP: the single residual ``Add`` among ``mid``'s users (another computed tensor added to it),
and for post-norm the normalization of the same op right after it. Each branch is a :class:`Branch`: its residual
``Add``, the stream value it adds to (``stream``) and the value that carries the sum on (``out``: the Add itself).

Removing a unit is rewiring one value to another (the pass does it): a whole block, ``out`` → ``stream_in``; the
attention branch, its Add's output → ``stream_in`` (a post-norm block keeps its norm: ``mid = norm(in)``); the MLP
branch, its Add's output → ``mid``. That is exact only when nothing outside the unit reads a value computed inside
it (a KV cache's ``present`` outputs, a graph output of hidden states): ``interior`` finds the unit's nodes
(between its input and its output) and ``outside_reads`` names such a read. Side inputs that do not depend on the
stream (masks, rotary tables, position biases shared by every block) are not part of a unit.

A block whose shape is not this (parallel attention and MLP, no MLP residual, a partitioned stream, a decoder layer
whose second branch is a cross-attention) is a
:class:`~graphprune.analysis.attention.NoMatch` with the reason.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Collection

import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock, NoMatch, find_attention_blocks
from graphprune.analysis.tokens import is_stream_add, same_op


@dataclasses.dataclass
class Branch:
    """One residual branch: ``out = add(stream, branch)`` (``add`` is the residual Add node)."""

    kind: str  # "attention" | "mlp"
    add: ir.Node
    stream: ir.Value  # the stream value the branch is added to
    out: ir.Value  # the Add's output (replaced by ``stream`` when the branch is removed)


@dataclasses.dataclass
class ResidualBlock:
    """A transformer block as removable units; ``index`` is its attention block's index."""

    index: int
    stream_in: ir.Value
    mid: ir.Value  # stream after the attention branch (post-norm: after its norm)
    out: ir.Value  # stream after the MLP branch (post-norm: after its norm)
    attention: Branch
    mlp: Branch
    post_norm: bool

    def unit(self, kind: str) -> tuple[ir.Value, ir.Value]:
        """(the value removing ``kind`` replaces, the value replacing it); ``kind``: block | attention | mlp."""
        if kind == "block":
            return self.out, self.stream_in
        br = self.attention if kind == "attention" else self.mlp
        return br.out, br.stream


def _mlp_add(mid: ir.Value) -> ir.Node | None:
    adds = [u for u, _ in mid.uses() if is_stream_add(u)]
    return adds[0] if len(adds) == 1 else None


def residual_block(blk: AttentionBlock, others: list[AttentionBlock] = ()) -> ResidualBlock | NoMatch:
    """The block around attention block ``blk``, or why it is not a pair of residual branches. ``others``: the
    model's other attention blocks; a branch that contains one of them (a decoder layer's cross-attention after its
    self-attention) is not an MLP."""
    where = f"block {blk.index}"
    if blk.partition is not None:
        return NoMatch(f"{where}: {blk.partition_summary()}; the stream is rearranged around the attention")
    if blk.residual_add is None or blk.residual_in is None:
        return NoMatch(f"{where}: no residual Add found after the attention output")
    attn_add = blk.residual_add
    mid = blk.post_norm.outputs[0] if blk.post_norm is not None else attn_add.outputs[0]
    mlp_add = _mlp_add(mid)
    if mlp_add is None:
        return NoMatch(f"{where}: no single MLP residual Add on the stream after the attention (parallel attention "
                       "and MLP, or no MLP)", attn_add)
    branch = next((x for x in mlp_add.inputs if x is not mid), None)
    inside = interior(mid, mlp_add.outputs[0])
    if branch is None or branch.producer() is None or not any(n is branch.producer() for n in inside):
        return NoMatch(f"{where}: the Add after the attention does not add a branch computed from the stream after "
                       "the attention (parallel attention and MLP: both read the same input)", mlp_add)
    prev = blk.residual_in.producer()
    after = next((b for b in others if b is not blk and prev is not None
                  and (prev is b.residual_add or prev is b.post_norm)), None)
    if after is not None:
        return NoMatch(f"{where}: its stream comes straight from block {after.index}'s attention (a decoder layer's "
                       "cross-attention: three branches, not supported)", attn_add)
    cores = {id(n) for b in others if b is not blk for n in b.nodes}
    if any(id(n) in cores for n in inside):
        return NoMatch(f"{where}: the next residual branch holds another attention (a decoder layer with "
                       "cross-attention: three branches, not supported)", mlp_add)
    attn_inside = {id(n) for n in interior(blk.residual_in, attn_add.outputs[0])}
    if not all(id(n) in attn_inside for n in blk.nodes):
        return NoMatch(f"{where}: the attention is not computed from the stream its residual Add adds to (parallel "
                       "attention and MLP, or a branch of another shape)", attn_add)
    out = mlp_add.outputs[0]
    if blk.post_norm is not None:
        users = out.uses()
        if len(users) != 1 or not same_op(users[0][0], blk.post_norm):
            return NoMatch(f"{where}: post-norm attention but no norm of the same kind after the MLP residual Add",
                           mlp_add)
        out = users[0][0].outputs[0]
    return ResidualBlock(blk.index, blk.residual_in, mid, out,
                         Branch("attention", attn_add, blk.residual_in, attn_add.outputs[0]),
                         Branch("mlp", mlp_add, mid, mlp_add.outputs[0]), blk.post_norm is not None)


def residual_blocks(model: ir.Model, blocks: list[AttentionBlock] | None = None) -> list[ResidualBlock | NoMatch]:
    """One entry per attention block, in order: the block, or why it is not removable as such."""
    blocks = find_attention_blocks(model) if blocks is None else blocks
    return [residual_block(b, blocks) for b in blocks]


def interior(start: ir.Value, end: ir.Value) -> list[ir.Node]:
    """The nodes that compute ``end`` from ``start`` (on a path from one to the other), in graph order."""
    prod = end.producer()
    if prod is None or end is start:
        return []
    seen: dict[int, ir.Node] = {}
    stack = [prod]
    while stack:  # everything ``end`` is computed from, stopping at ``start``
        n = stack.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        for x in n.inputs:
            if x is None or x is start:
                continue
            p = x.producer()
            if p is not None and p.graph is n.graph:
                stack.append(p)
    graph = prod.graph
    order = [n for n in graph if id(n) in seen]
    reads: set[int] = set()
    for n in order:  # graph order is topological: a node reads ``start`` when an input is it or is read from it
        if any(x is start or (x is not None and x.producer() is not None and id(x.producer()) in reads)
               for x in n.inputs):
            reads.add(id(n))
    return [n for n in order if id(n) in reads]


def outside_reads(nodes: list[ir.Node], end: ir.Value, graph: ir.Graph, allowed: Collection[int] = ()) -> str | None:
    """A value computed by ``nodes`` (other than ``end`` and the values whose ids are in ``allowed``) that something
    else reads, named; ``None`` if none."""
    inside = {id(n) for n in nodes}
    outputs = {id(v) for v in graph.outputs}
    for n in nodes:
        for v in n.outputs:
            if v is end or id(v) in allowed:
                continue
            if id(v) in outputs:
                return f"graph output {v.name!r}"
            for user, _ in v.uses():
                if id(user) not in inside:
                    return f"{v.name!r} (read by {user.op_type} {user.name!r})"
    return None


#: Graph output / input names of a KV cache as exporters write them: ``present.3.key``, ``present_key_values.3``,
#: ``past_key_values.3.value``, ``cache_k_3``, ``key_cache.3``, ``new_k_3``...
CACHE_NAME = re.compile(r"present|past|cache|(^|[._/])(key|value|keys|values|k|v)([._/]|\d|$)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CacheIO:
    """A unit's KV cache: the graph outputs it computes (``present``) and the graph inputs they are computed from
    (``past``; none in a prefill graph)."""

    outputs: tuple[ir.Value, ...] = ()
    inputs: tuple[ir.Value, ...] = ()


def cache_io(nodes: list[ir.Node], end: ir.Value, graph: ir.Graph) -> CacheIO | str:
    """The KV cache of the unit made of ``nodes`` (output ``end``), or why its graph outputs are not one.

    A graph output computed inside the unit is its cache when it is computed from a graph input that the unit reads
    (a decode step's ``past`` tensor, concatenated with the new keys or values), or, in a prefill graph, when its
    name says so (:data:`CACHE_NAME`). Any other graph output inside the unit (exported hidden states) is returned
    as a reason, as is a ``past`` input that something outside the unit reads other than by its ``Shape`` (the past
    length, which the position ids and the mask read off one layer's cache, chosen by the exporter: the pass moves
    such a read to a cache input of the same shape that stays)."""
    inside = {id(n) for n in nodes}
    graph_inputs = {id(v) for v in graph.inputs}
    outs = [v for n in nodes for v in n.outputs if v is not end and any(v is o for o in graph.outputs)]
    if not outs:
        return CacheIO()
    pasts: dict[int, ir.Value] = {}
    for v in outs:
        found: dict[int, ir.Value] = {}
        stack, seen = [v.producer()], set()
        while stack:  # the graph inputs this output is computed from, inside the unit
            n = stack.pop()
            if n is None or id(n) in seen or id(n) not in inside:
                continue
            seen.add(id(n))
            for x in n.inputs:
                if x is None:
                    continue
                if id(x) in graph_inputs:
                    found[id(x)] = x
                stack.append(x.producer())
        if not found and not CACHE_NAME.search(v.name or ""):
            return f"graph output {v.name!r}"
        pasts.update(found)
    for x in pasts.values():
        for user, _ in x.uses():
            if id(user) not in inside and user.op_type != "Shape":
                return (f"its cache input {x.name!r} is also read outside it (by {user.op_type} {user.name!r}), so "
                        "removing the unit could not drop it")
    return CacheIO(tuple(outs), tuple(pasts.values()))


#: Node metadata the torch dynamo exporter writes: the module path of the node, outermost first, then the ATen
#: node's own name (``['', 'lm', 'lm.model', 'lm.model.layers.0', 'lm.model.layers.0.self_attn', 'neg_3']``).
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def module_scopes(node: ir.Node) -> list[str] | None:
    """The module paths ``node`` was computed in, outermost first (the exporter's name scopes without the node's own
    name); ``None`` when the export did not record them."""
    raw = node.metadata_props.get(NAME_SCOPES) if node.metadata_props else None
    if not raw:
        return None
    try:
        chain = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(chain, list) or not chain or not all(isinstance(s, str) for s in chain):
        return None
    return chain[:-1]


def unit_module(block: ResidualBlock, kind: str, nodes: list[ir.Node], graph: ir.Graph,
                allowed: Collection[int] = ()) -> str:
    """The module of the exported ``nn.Module`` that computes exactly this unit, by its path (``model.layers.3`` for
    a block, ``model.layers.3.self_attn`` / ``.mlp`` for a pre-norm branch, the output projection for a post-norm
    one), or raises :class:`ValueError` with why there is none.

    A block is the innermost module that holds all its nodes. A branch is the module, directly inside the one that
    adds it to the stream, that computes the value added: removing the branch is that module returning zeros. In
    both cases no value computed inside the module may be read outside it but the unit's own output (and the
    values whose ids are in ``allowed``: the KV cache the pass removes with the unit)."""
    if kind == "block":
        chains = [module_scopes(n) for n in nodes]
        if not chains or any(c is None for c in chains):
            raise ValueError("the export records no module scopes for it (not a torch dynamo export)")
        common = chains[0]
        for c in chains[1:]:
            k = 0
            while k < min(len(common), len(c)) and common[k] == c[k]:
                k += 1
            common = common[:k]
        target = common[-1] if common else ""
        end = block.out
    else:
        br = block.attention if kind == "attention" else block.mlp
        value = next((x for x in br.add.inputs if x is not br.stream), None)
        prod = value.producer() if value is not None else None
        outer = module_scopes(br.add)
        inner = module_scopes(prod) if prod is not None else None
        if outer is None or inner is None:
            raise ValueError("the export records no module scopes for it (not a torch dynamo export)")
        if inner[:len(outer)] != outer or len(inner) <= len(outer):
            raise ValueError(f"the {kind} branch is not computed by a module inside the one that adds it to the "
                             "stream")
        target = inner[len(outer)]
        end = value
    if not target:
        raise ValueError("its nodes share no module below the model itself")
    inside = [n for n in graph if target in (module_scopes(n) or ())]
    why = outside_reads(inside, end, graph, allowed)
    if why is not None:
        raise ValueError(f"module {target!r} also computes {why}")
    return target


__all__ = ["CACHE_NAME", "NAME_SCOPES", "Branch", "CacheIO", "ResidualBlock", "cache_io", "interior", "module_scopes",
           "outside_reads", "residual_block", "residual_blocks", "unit_module"]
