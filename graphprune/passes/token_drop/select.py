"""Token selection: the ``TokenSelect`` (scored by attention: ``cls_attention``, ``attention_graph``) or
``DiversitySelect`` (``diversity``) node one reduction inserts, and what every reducing node shares (its output
names, the refusal of a reduction that saves nothing)."""

from __future__ import annotations

import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock
from graphprune.analysis.tokens import downstream_nodes, is_token_compute
from graphprune.ops import Body, add_node_function, diversity_select, token_select
from graphprune.passes.base import Skip
from graphprune.passes.token_drop import rewire, scores
from graphprune.passes.token_drop.env import Env, commit, gather_masks, later_masks, retarget, stream_point
from graphprune.passes.token_drop.restore import Selected


def select(cfg, model, blocks, blk, env: Env, ratio, protect) -> tuple:
    """One selection (TokenSelect, or DivPrune's DiversitySelect) at ``blk``: (tokens after, note, score label, the
    :class:`~graphprune.passes.token_drop.restore.Selected` level)."""
    stream, anchor = stream_point(blocks, blk, cfg.placement)
    check_saves(stream, env.after_end, blk)
    masked = later_masks(cfg, blocks, blk, env.dyn is not None)
    if env.n is not None:
        k = token_select.kept_count(env.n, protect, keep_ratio=ratio)
        n_new = protect + k + int(cfg.fuse_rest)
        kw: dict = dict(k=k, protect=protect, keep_order=cfg.keep_order)
    else:  # the op computes k from the runtime N (exact rational keep_ratio)
        n_new, kw = None, dict(k=0, keep_ratio=ratio, protect=protect, keep_order=cfg.keep_order)
    plan = retarget(model, blocks, blk, stream, env, n_new)
    dims = {"N": env.n} if env.n is not None else None
    label = None
    if cfg.method == "diversity":
        node = diversity_select.make_node(stream, name=f"diversity_select_{blk.index}", dims=dims, **kw)
        t, note = Body(), None
        label = "diversity of the stream tokens (DivPrune)"
    else:
        t = Body()
        try:
            if cfg.method == "attention_graph":
                score, note = scores.attention_graph(t, blk, cfg.iterations)
                label = f"attention graph, {cfg.iterations} power iterations (Zero-TPrune)"
            else:
                rows, label = score_rows(cfg.query, protect)
                score, note = scores.cls_attention(t, blk, rows)
        except Skip:
            rewire.detach(t.nodes)
            raise
        node = token_select.make_node(stream, score, name=f"token_select_{blk.index}", dims=dims,
                                      fuse_rest=cfg.fuse_rest, **kw)
    name_outputs(node, f"token_select_{blk.index}", stream)
    node.outputs[1].type = ir.TensorType(ir.DataType.INT64)
    commit(model, stream, [*t.nodes, node], node.outputs[0], anchor, plan, env, node.outputs[1], node)
    if env.dyn is None:
        gather_masks(model.graph, masked, node, node.outputs[1], env.mask_map)
    add_node_function(model, node)
    return n_new, note, label, Selected(stream, node.outputs[1], cfg.fuse_rest and cfg.method != "diversity")


def score_rows(query, protect: int) -> tuple[tuple[int, int], str]:
    """The query rows ``[start, stop)`` whose attention scores the tokens (``start`` -1: the last row; ``stop`` 0:
    to the end) and what the report calls them. ``auto``: the CLS row when the model has a prefix token, else
    the column mean (the attention each token receives). Shared with the torch FX pass."""
    q = "cls" if query == "auto" and protect > 0 else "mean" if query == "auto" else query
    if q == "cls":
        return (0, 1), "CLS row of the attention"
    if q == "last":
        return (-1, 0), "last query row of the attention (FastV)"
    if q == "mean":
        why = " (no CLS token found)" if query == "auto" else ""
        return (0, 0), f"column mean of the attention: attention each token receives{why}"
    return (int(q[0]), int(q[1])), f"query rows [{int(q[0])}, {int(q[1])}) of the attention"


def check_saves(stream: ir.Value, after_end: set[int], blk: AttentionBlock) -> None:
    """Refuse a reduction that would only add cost: nothing that scales with the tokens (a matrix product,
    convolution or attention) reads the reduced stream before the tokens are restored or the graph ends. This is
    the last block of a model whose MLP reads the block input (parallel attention and MLP: Phi, GPT-NeoX, GPT-J)."""
    if not any(is_token_compute(n) for n in downstream_nodes(stream) if id(n) not in after_end):
        raise Skip(f"nothing that scales with the tokens reads the stream reduced at block {blk.index} before the "
                   "tokens are restored (e.g. the last block of a model whose MLP reads the block input, as in "
                   "parallel attention/MLP blocks): the reduction would only add cost")


def name_outputs(node: ir.Node, base: str, stream: ir.Value) -> None:
    node.outputs[0].name = f"{base}_tokens"
    node.outputs[1].name = f"{base}_aux"
    node.outputs[0].type = stream.type  # shapes come from shape inference at the end of the pass


__all__ = ["check_saves", "name_outputs", "score_rows", "select"]
