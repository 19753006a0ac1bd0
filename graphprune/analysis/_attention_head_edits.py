"""The whole-head rule's edits (:mod:`graphprune.analysis._attention_heads`): the channel ↔ (head, dim) maps found
by pushing index arrays through each chain (:mod:`graphprune.analysis._index_trace`), the shape constants that
vary with the channel, and ``apply``, which joins each head's atoms into one class and records the rewrites (or
why the block's heads stay)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis import _index_trace
from graphprune.analysis._attention_heads import _Block, _flat, _mask_heads, cache_concat
from graphprune.analysis._attention_rope import _check_rope, _rope_step
from graphprune.analysis._channel_core import Builder, static_shape
from graphprune.analysis._channel_layout import const_slot


def _step(step, env: dict) -> list[np.ndarray] | None:
    """The interpreter's hook: rotary steps, and a decode step's cache ``Concat`` (its new part's map passes on)."""
    if isinstance(step, ir.Node):
        new = cache_concat(step)
        if new is not None:
            return None if new not in env else [env[new]]
    return _rope_step(step, env)


def _simulate(chain: list, start: ir.Value, arr: np.ndarray, env: dict) -> str | None:
    """Push ``arr`` at ``start`` through ``chain`` (the index-tracing interpreter); why it stopped, else ``None``."""
    return _index_trace.trace(chain, {start: arr}, custom=_step, env=env).reason


def _index_array(value: ir.Value, width: int) -> np.ndarray | None:
    """Seed codes of a ``[.., width]`` value: channel + width·position (symbolic dims 1)."""
    s = static_shape(value)
    return _index_trace.index_map(s) if s is not None and s[-1] == width else None


def _head_map(arr: np.ndarray | None, width: int, transposed: bool) -> np.ndarray | str:
    """[H, D] channel of each (head, dim), from a simulated [1, H, N, D] (or [1, H, D, N]) operand."""
    if arr is None or arr.ndim != 4 or arr.shape[0] != 1:
        return "q/k/v are not [B, H, N, D] views of the projections"
    if transposed:
        arr = np.swapaxes(arr, 2, 3)
    ch, pos = arr % width, arr // width
    if not (ch == ch[:, :, :1, :]).all() or not (pos == pos[:, :1, :, :1]).all():
        return "heads mix channels with token positions"
    return ch[0, :, 0, :]


def _runtime_shape(value: ir.Value, allowed: set, forbidden: set[int], depth: int = 0) -> str | None:
    """``None`` when ``value`` is computed only from constants and ``Shape`` of ``allowed`` values (so it follows
    the pruned sizes at run time) and no constant in it equals a head count or width in ``forbidden``."""
    c = const_value(value)
    if c is not None:
        hit = set(np.asarray(c).ravel().tolist()) & forbidden
        return f"constant {sorted(hit)[0]} looks like a head count" if hit else None
    p = value.producer()
    if p is None or depth > 12:
        return f"{value.name!r} depends on a graph input"
    if p.op_type == "Shape":
        return None if p.inputs[0] in allowed else f"Shape of {p.inputs[0].name!r} outside the block"
    for v in p.inputs:
        if v is not None:
            bad = _runtime_shape(v, allowed, forbidden, depth + 1)
            if bad:
                return bad
    return None


def _edits(b: Builder, rec: _Block, env: dict, atoms_of, allowed: set, forbidden: set[int]) -> str | None:
    """Count edits for every chain Reshape/Expand/Split entry that varies with the kept heads."""
    atoms: dict[int, tuple] = {}  # id(simulated array) -> (array, its atoms), computed once per value

    def lines_of(y: np.ndarray, ax: int) -> np.ndarray:
        a = atoms.get(id(y), (None, None))[1]
        if a is None:
            a = atoms_of(y)
            atoms[id(y)] = (y, a)  # y kept referenced, so its id is not reused
        return np.moveaxis(a, ax, 0).reshape(y.shape[ax], -1)

    for node in _flat([n for c in rec.chains for n in c]) + rec.out_chain:
        for o in node.outputs:  # new shapes of the intermediate values
            y = env.get(o)
            for ax in range(y.ndim if y is not None else 0):
                lines = lines_of(y, ax)
                if not (lines == lines[:1]).all():
                    b.shape_line(o, ax, lines)
        if node.op_type in ("Reshape", "Expand"):
            y = env.get(node.outputs[0])
            length = node.inputs[1].shape[0] if node.inputs[1].shape is not None and len(node.inputs[1].shape) == 1 else None
            if y is None or not isinstance(length, int):
                return f"{node.op_type} {node.name!r}: unknown target length"
            off = y.ndim - length
            for p in range(length):
                if p + off < 0:
                    continue
                lines = lines_of(y, p + off)
                if (lines == lines[:1]).all():
                    continue
                slot = const_slot(node, 1, p)
                if isinstance(slot, str):
                    bad = _runtime_shape(node.inputs[1], allowed, forbidden)
                    if bad:
                        return f"{node.op_type} {node.name!r}: {slot} ({bad})"
                    continue  # computed at run time from the pruned tensors' own shapes
                snode, sidx, spos = slot
                cur = int(np.asarray(const_value(snode.inputs[sidx])).ravel()[spos])
                if cur <= 0 or (node.op_type == "Expand" and cur == 1):
                    continue
                if cur != y.shape[p + off]:
                    return f"{node.op_type} {node.name!r}: target entry {cur} is not the dim {y.shape[p + off]}"
                b.count_edit(snode, sidx, spos, lines)
        elif cache_concat(node) is not None:  # the cache fed back: its declared heads follow
            y = env.get(node.outputs[0])
            axis = node.attributes.get_int("axis", 0) % (y.ndim if y is not None else 1)
            for x in node.inputs:
                if y is None or x is None or not x.is_graph_input():
                    continue
                for ax in range(y.ndim):
                    lines = lines_of(y, ax)
                    if ax != axis and not (lines == lines[:1]).all():
                        b.shape_line(x, ax, lines)
        elif node.op_type == "Split":
            ys = [env.get(o) for o in node.outputs]
            if any(y is None for y in ys):
                continue
            axis = node.attributes.get_int("axis", 0) % ys[0].ndim
            # without sizes (num_outputs): the rewrite writes explicit ones
            base = None if len(node.inputs) > 1 and node.inputs[1] is not None else [y.shape[axis] for y in ys]
            for k, y in enumerate(ys):
                b.count_edit(node, 1, k, lines_of(y, axis), base=base)
        elif node.op_type == "Slice":
            x = env.get(node.inputs[0])
            if x is None:
                continue
            vals = [np.asarray(const_value(v)).ravel() if v is not None else None for v in node.inputs[1:5]]
            axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(vals[0]))
            steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(axes), dtype=np.int64)
            for k, a in enumerate(int(a) % x.ndim for a in axes):
                lines = lines_of(x, a)
                if (lines == lines[:1]).all():
                    continue  # the same atoms at every position: the bounds never move
                if int(steps[k]) != 1:
                    return f"Slice {node.name!r} strides over heads"
                n = x.shape[a]
                for idx, bound in ((1, int(vals[0][k])), (2, int(vals[1][k]))):
                    pos = min(max(bound + n if bound < 0 else bound, 0), n)
                    if 0 < pos < n:
                        b.count_edit(node, idx, k, lines[:pos], always=bound < 0)
    return None


def apply(b: Builder, rec: _Block) -> None:
    """Finish one block: derive head maps, union whole heads, label the merged tensor, record rewrites."""
    labs = [b.label(r) for r in rec.roots]
    all_atoms = [lab.atoms for lab in labs if lab is not None]

    def fail(reason: str) -> None:
        for a in all_atoms:
            b.block(a, f"attention block {rec.blk.index}: {reason}")
        merged = rec.merged if rec.merged is not None else rec.blk.output
        width = merged.shape[-1] if merged.shape is not None and len(merged.shape) else None
        if isinstance(width, int):  # an opaque source: its consumers stay consistent, nothing is pruned
            b.set_label(merged, len(merged.shape) - 1, b.new_space(rec.blk.nodes[-1], width))
            b.block(b.labels[merged].atoms, f"attention block {rec.blk.index}: {reason}")

    if rec.reason:
        return fail(rec.reason)
    if any(lab is None for lab in labs):
        return fail("q/k/v do not come from tracked projections")
    ranks = [len(r.shape) if r.shape is not None else None for r in rec.roots]
    if any(lab.axis != (rk or 0) - 1 for lab, rk in zip(labs, ranks, strict=True)):
        return fail("projection channels are not on the last axis")
    env: dict = {}
    maps = []
    three_d = rec.blk.layout == "BNC"
    for i, (chain, root, lab) in enumerate(zip(rec.chains, rec.roots, labs, strict=True)):
        width = len(lab.atoms)
        if three_d:
            heads = rec.blk.heads if i == 0 else (rec.blk.kv_heads or rec.blk.heads)
            if not heads or width % heads or chain:
                return fail("3-D attention inputs without a head count")
            maps.append(np.arange(width).reshape(heads, -1))
            continue
        arr = _index_array(root, width)
        if arr is None:
            return fail("projection output shape is unknown")
        err = _simulate(chain, root, arr, env)
        if err:
            return fail(err)
        hm = _head_map(env.get(rec.operands[i]), width, rec.k_transposed and i == 1)
        if isinstance(hm, str):
            return fail(hm)
        err = _check_rope(chain, env, width, hm)
        if err:
            return fail(err)
        maps.append(hm)
    qa, ka, va = (lab.atoms[m] for lab, m in zip(labs, maps, strict=True))
    h, hk = qa.shape[0], ka.shape[0]
    if h % hk or va.shape[0] != hk:
        return fail(f"{h} query heads do not split evenly over {hk} key/value heads")
    mask = _mask_heads(b, rec.blk, h)
    if isinstance(mask, str):
        return fail(mask)
    tracked = isinstance(mask, np.ndarray)
    for i in range(h):
        j = i * hk // h
        b.union_all(np.concatenate([qa[i], ka[j], va[j]] + ([mask[i:i + 1]] if tracked else [])))
    if tracked:  # a per-head parameter (a bias table), not the model's input stem
        b.stem_spaces -= {int(b.atom_space[a]) for a in mask.tolist()}
    elif mask is not None:  # a constant [1, H, T, T] bias: sliced on its head axis with the heads
        node, index = mask
        b.member(node, index, 1, qa[:, 0], "param")
        b.shape_line(rec.blk.mask, 1, qa[:, :1])
    for s in {int(b.atom_space[a]) for a in np.concatenate([qa.ravel(), ka.ravel(), va.ravel()]).tolist()}:
        b.kinds[s] = "heads"
    d = qa.shape[1]
    out_atoms = qa  # output channel (head h, dim d) belongs to q head h's class
    if three_d:
        merged_atoms = qa.reshape(-1)
        node = rec.blk.nodes[0]
        if rec.blk.kind == "attention_op":
            b.count_edit(node, None, 0, qa, attr="q_num_heads")
            b.count_edit(node, None, 0, ka, attr="kv_num_heads")
        else:
            b.count_edit(node, None, 0, qa, attr="num_heads")
        out = rec.blk.output  # contrib ops often carry no inferred shape: the output is [B, N, H·D] like q
        rank = len(out.shape) if out.shape is not None else len(rec.operands[0].shape or (0, 0, 0))
        b.set_label(out, rank - 1, merged_atoms)
    else:
        if rec.merged is None:
            return fail("no merged output")
        start = _index_array(rec.blk.output, d)
        if start is None:  # no inferred shape (a computed reshape target): [B, H, N] of q, D of v, as traced
            qs, vs = env.get(rec.operands[0]), env.get(rec.operands[2])
            if qs is not None and vs is not None and qs.ndim == 4 and vs.shape[-1] == d:
                start = _index_trace.index_map((*qs.shape[:-1], d))
        if start is None or start.shape[1] != h:
            return fail("core output is not [B, H, N, D]")
        code = (start % d) + d * np.arange(h)[None, :, None, None]
        tok = np.arange(start.shape[2])[None, None, :, None]
        err = _simulate(rec.out_chain, rec.blk.output, code + h * d * tok, env)
        if err:
            return fail(err)
        y = env.get(rec.merged)
        if y is None or y.shape[-1] != h * d:
            return fail("merged output is not [.., H·D]")
        ch = y % (h * d)
        if not (ch == ch.reshape(-1, h * d)[:1].reshape((1,) * (y.ndim - 1) + (h * d,))).all():
            return fail("merged output mixes heads with token positions")
        merged_atoms = out_atoms.reshape(-1)[ch.reshape(-1, h * d)[0]]
        b.set_label(rec.merged, y.ndim - 1, merged_atoms)
    # atoms of a simulated element: input side (channel + C·pos of one root) or output side ((h, d) + H·D·pos)
    root_atoms = {id(r): lab.atoms for r, lab in zip(rec.roots, labs, strict=True)}

    def atoms_of_in(root):
        a = root_atoms[id(root)]
        return lambda arr: a[arr % len(a)]

    out_flat = out_atoms.reshape(-1)
    allowed = set(rec.roots) | {rec.blk.output} | {o for c in rec.chains + [rec.out_chain] for n in _flat(c)
                                                     for o in n.outputs}
    forbidden = {h, h * d, hk, hk * d, 3 * h * d} - {1, d}
    for chain, root in zip(rec.chains, rec.roots, strict=True):
        sub = _Block(rec.blk, rec.operands, rec.k_transposed, [chain], [root], [], None)
        reason = _edits(b, sub, env, atoms_of_in(root), allowed, forbidden)
        if reason:
            return fail(reason)
    sub = _Block(rec.blk, rec.operands, rec.k_transposed, [], [], rec.out_chain, None)
    reason = _edits(b, sub, env, lambda arr: out_flat[arr % (h * d)], allowed, forbidden)
    if reason:
        return fail(reason)
    _core_cost(b, rec, qa[:, 0], h, d)
    for node in rec.blk.nodes:
        for o in node.outputs:
            if o.shape is not None and len(o.shape) == 4 and o.shape[1] == h:
                b.shape_line(o, 1, qa[:, :1])


def _core_cost(b: Builder, rec: _Block, head_atoms: np.ndarray, h: int, d: int) -> None:

    n = rec.blk.tokens
    q = static_shape(rec.blk.q) if rec.blk.q is not None else None
    if not n and q is not None and len(q) >= 2:
        n = q[-2]
    for node in rec.blk.nodes:  # per-node FLOPs come from count_flops when the caller has them
        b.cost(node, 4 * h * n * n * d if (n and node is rec.blk.nodes[-1]) else 0, None, head_atoms)

