"""Where a ``token_drop`` run stands (:class:`Env`) and the steps every reduction shares: the stream point of a
block, the later blocks' masks to gather, the retargeting plan, and the commit that splices the reducing nodes in."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphprune.analysis import streams
from graphprune.analysis.attention import AttentionBlock, NoMatch
from graphprune.ops import Body
from graphprune.passes.base import Skip
from graphprune.passes.token_drop import rewire
from graphprune.passes.token_drop.dynamic import DynamicTokens


@dataclasses.dataclass
class Env:
    """Where a run stands: the static token count (``None`` when dynamic, then ``dyn`` tracks it and ``label``
    names it), the nodes past the restore point (never retargeted), the static path's gathered masks."""

    n: int | None
    dyn: DynamicTokens | None
    after_end: set[int]
    mask_map: dict[int, ir.Value]
    data: DynamicTokens  # per-token tensors computed upstream (the dynamic tracker, or a static one)
    label: str = "N"
    restore: bool = False


def stream_point(blocks: list[AttentionBlock], blk: AttentionBlock, placement: str) -> tuple[ir.Value, ir.Node]:
    """(stream value to reduce, node after which to insert); ``Skip`` with the analysis' reason when there is none."""
    return fact(streams.stream_point(blocks, blk, placement))


def fact(result):
    if isinstance(result, NoMatch):
        raise Skip(result.reason)
    return result


def model_dims(blocks: list[AttentionBlock]) -> set[int]:
    return {d for b in blocks for d in (b.heads, b.kv_heads, b.head_dim) if d}


def later_masks(cfg, blocks: list[AttentionBlock], blk: AttentionBlock, dynamic: bool = False) -> list[AttentionBlock]:
    """Later blocks whose attention mask spans the tokens (they need it gathered); refuses what cannot be.
    ``dynamic``: the masks are gathered with the other per-token tensors (``DynamicTokens``); only the
    ``fuse_rest`` refusal applies."""
    out = []
    for other in blocks[blk.index + 1:]:
        m = other.mask
        if m is None or (m.shape is not None and len(m.shape) > 0 and m.shape[-1] == 1):
            continue
        if cfg.fuse_rest and cfg.method != "tome":
            raise Skip(f"block {other.index} has a per-token attention mask; the fused rest token has none")
        if dynamic:
            continue
        if m.shape is None or len(m.shape) != 4:
            raise Skip(f"block {other.index}: attention mask is not a [B,H,Nq,Nk] tensor")
        out.append(other)
    return out


def gather_masks(graph: ir.Graph, masked: list[AttentionBlock], node: ir.Node, idx: ir.Value, mask_map: dict) -> None:
    """Give each later masked block its mask gathered to the kept tokens (one gather per distinct mask)."""
    done: dict[int, ir.Value] = {}
    current = [(other, mask_map.get(id(other.mask), other.mask)) for other in masked]
    for other, cur in current:
        if id(cur) not in done:
            t = Body()
            orig = other.mask  # _later_masks checked it is rank 4 with a static shape
            rows = orig.shape[2] != 1
            done[id(cur)] = rewire.gather_mask(t, cur, idx, rows)
            graph.insert_after(node, list(t.nodes))
        new = done[id(cur)]
        for n in other.nodes:
            for i, v in enumerate(n.inputs):
                if v is cur:
                    n.replace_input_with(i, new)
        mask_map[id(other.mask)] = new


def retarget(model, blocks, blk, stream, env: Env, n_new: int | None):
    """What the reduction at ``stream`` rewrites downstream (raises Skip before anything changes)."""
    if env.dyn is not None:
        return env.dyn.plan(stream, exclude=env.after_end)
    masks = tuple(env.mask_map.get(id(b.mask), b.mask) for b in blocks[blk.index + 1:] if b.mask is not None)
    return (rewire.plan_retarget(model.graph, stream, env.n, n_new, model_dims(blocks), exclude=env.after_end),
            env.data.plan(stream, exclude=env.after_end, masks=masks))


def commit(model, stream, nodes, reduced, anchor, plan, env: Env, idx: ir.Value, node: ir.Node) -> None:
    rewire.splice(model.graph, stream, nodes, reduced, anchor)
    if env.dyn is not None:
        env.dyn.apply(plan, reduced, idx, node)
    else:
        plan[0].apply()
        env.data.apply(plan[1], reduced, idx, node)
    rewire.clear_shapes(reduced)


__all__ = ["Env", "commit", "fact", "gather_masks", "later_masks", "model_dims", "retarget", "stream_point"]
