"""ToMe: the ``TokenMerge`` node one reduction inserts, proportional attention (log size on the later blocks'
logits), and the refusal of padded batches."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune._ir import additive_mask
from graphprune.analysis import streams
from graphprune.analysis.attention import AttentionBlock
from graphprune.ops import Body, add_node_function, token_merge
from graphprune.passes.base import Skip
from graphprune.passes.token_drop import rewire, scores
from graphprune.passes.token_drop.env import Env, commit, gather_masks, later_masks, retarget, stream_point
from graphprune.passes.token_drop.restore import Merged
from graphprune.passes.token_drop.select import check_saves, name_outputs


def merge(cfg, model, blocks, blk, env: Env, size, protect, bias_sites) -> tuple:
    """One ToMe merge at ``blk`` and proportional attention in the blocks after it: (tokens after, the sizes, note,
    the :class:`~graphprune.passes.token_drop.restore.Merged` level or None without restore)."""
    stream, anchor = stream_point(blocks, blk, cfg.placement)
    check_saves(stream, env.after_end, blk)
    masked = later_masks(cfg, blocks, blk, env.dyn is not None)
    later = blocks[blk.index + 1:]
    for other in later:
        check_logit_bias(other)
    if env.n is not None:
        r = token_merge.merged_count(env.n, protect, cfg.r)
        n_new = env.n - r
    else:
        r, n_new = cfg.r, None  # clamped by the op to the runtime size of set A
    plan = retarget(model, blocks, blk, stream, env, n_new)
    t = Body()
    try:
        metric = scores.key_metric(t, blk)
    except Skip:
        rewire.detach(t.nodes)
        raise
    dims = {"N": env.n} if env.n is not None else None
    node = token_merge.make_node(stream, metric, size, r=r, protect=protect, dims=dims,
                                 name=f"token_merge_{blk.index}")
    name_outputs(node, f"token_merge_{blk.index}", stream)
    s_out = node.outputs[1]
    s_out.type = stream.type
    # proportional attention in the following blocks: + log(size) on the key axis, [B, 1, 1, N]
    t2 = Body()
    bias = t2.op("Unsqueeze", [t2.op("Log", [t2.op("Transpose", [s_out], {"perm": [0, 2, 1]})]), t2.ints(1)])
    bias.name = f"token_merge_{blk.index}_logsize"
    idx = node.outputs[2]
    idx.name, idx.type = f"token_merge_{blk.index}_indices", ir.TensorType(ir.DataType.INT64)
    extra, level, note = [], None, None
    if env.restore:  # unmerge needs which output token each input went to: the same merge of one-hot positions
        t3 = Body(stream.dtype or ir.DataType.FLOAT)
        n = t3.op("Shape", [stream], {"start": 1, "end": 2})
        eye = t3.one_hot(t3.op("Range", [t3.const(0, np.int64), t3.scalar(n), t3.const(1, np.int64)]),
                         t3.scalar(n), [0.0, 1.0], axis=-1)  # [N, N]
        eye = t3.op("Expand", [eye, t3.op("Concat", [t3.op("Shape", [stream], {"start": 0, "end": 1}), n, n],
                                            {"axis": 0})])
        member = token_merge.make_node(eye, metric, size, r=r, protect=protect, dims=dims,
                                       name=f"token_merge_{blk.index}_sources")
        member.outputs[0].name = f"token_merge_{blk.index}_members"
        for o, nm in zip(member.outputs[1:], ("sizes", "ids")):
            o.name = f"token_merge_{blk.index}_members_{nm}"
        extra = [*t3.nodes, member]
        level = Merged(member.outputs[0])
        note = "restore: the merge is repeated on one-hot positions to unmerge (an extra N² tensor)"
    commit(model, stream, [*t.nodes, node, *t2.nodes, *extra], node.outputs[0], anchor, plan, env, idx, node)
    if env.dyn is None:
        gather_masks(model.graph, masked, node, idx, env.mask_map)
    for other in later:  # a later merge's sizes supersede this one's
        if other.index in bias_sites:
            site, i = bias_sites[other.index]
            site.replace_input_with(i, bias)
        else:
            bias_sites[other.index] = add_logit_bias(model.graph, other, bias)
    add_node_function(model, node)
    if level is not None:
        add_node_function(model, member)
    return n_new, s_out, note, level


def refuse_padding(model: ir.Model, blocks: list[AttentionBlock]) -> None:
    """ToMe matches tokens by key similarity alone: with a padding mask read from the inputs, real tokens merge
    into padding (whose representative is masked) and vanish from the pooled output."""
    for b in blocks:
        if b.mask is not None and streams.reads_input(b.mask, model.graph.inputs):
            raise Skip(f"the attention mask (block {b.index}) comes from the model's inputs (padding): ToMe would merge "
                       "real tokens into padded ones; use a selection method (cls_attention) for padded batches")


def check_logit_bias(blk: AttentionBlock) -> None:
    if blk.kind == "matmul_softmax" and blk.probs is not None:
        return
    if blk.kind == "attention_op" and blk.layout == "BHND":
        return
    raise Skip(f"block {blk.index}: proportional attention not supported for {blk.kind} ({blk.layout})")


def add_logit_bias(graph: ir.Graph, blk: AttentionBlock, bias: ir.Value) -> tuple[ir.Node, int]:
    """logits + bias before the softmax (or into a fused ``Attention`` op's additive mask)."""
    if blk.kind == "matmul_softmax":
        sm = blk.probs.producer()
        add = ir.Node("", "Add", [sm.inputs[0], bias], num_outputs=1, name=f"{sm.name}_prop_attn")
        add.outputs[0].type = sm.inputs[0].type
        add.outputs[0].shape = sm.inputs[0].shape
        graph.insert_before(sm, add)
        sm.replace_input_with(0, add.outputs[0])
        return add, 1
    if blk.kind == "attention_op" and blk.layout == "BHND":
        # ORT's Attention wants the mask's query axis spelled out: Expand [B,1,1,N] to [B,1,Nq,N] (Nq from q).
        node = blk.nodes[0]
        t = Body()
        nq = t.op("Slice", [t.op("Shape", [node.inputs[0]]), t.ints(2), t.ints(3)])
        full = t.op("Expand", [bias, t.op("Concat", [t.ints(1, 1), nq, t.ints(1)], {"axis": 0})])
        expand = full.producer()
        old = node.inputs[3] if len(node.inputs) > 3 else None
        if old is not None:
            if blk.mask is not None and blk.mask.dtype == ir.DataType.BOOL:  # boolean keep-mask → additive
                old = additive_mask(t, old, node.inputs[0].dtype or ir.DataType.FLOAT)
            full = t.op("Add", [old, full])
        graph.insert_before(node, list(t.nodes))
        if len(node.inputs) < 4:
            node.resize_inputs(4)
        node.replace_input_with(3, full)
        blk.nodes.extend(t.nodes)  # so that a later mask gather also reaches the mask feeding these helpers
        return expand, 0
    raise Skip(f"block {blk.index}: proportional attention not supported for {blk.kind}")


__all__ = ["add_logit_bias", "check_logit_bias", "merge", "refuse_padding"]
