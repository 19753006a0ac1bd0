"""Whole-head channel rule for :mod:`graphprune.analysis.channels`, anchored on :class:`AttentionBlock`.

Pattern (any layout the exporter writes between the projections and the core):
    root_q/k/v [.., C] --(Reshape | Transpose | Gather | Split | Squeeze | Unsqueeze | Expand | Mul/Div by scalar)*-->
        q [B, H, N, D], k (or kᵀ) [B, Hk, N, D], v [B, Hk, N, D] --core--> out [B, H, N, D]
        --(Transpose | Reshape)*--> merged [.., H·D] --> output projection
The root values are the outputs of the q/k/v projections (plus bias), labeled on their last axis.

How the channel ↔ (head, dim) maps are found: an index tensor (channel + C·position) is pushed through the
exact chain ops in numpy, with symbolic dims (batch, tokens) set to 1. The result at q/k/v gives, for each
(head, dim), the projection channel it reads; a channel that would depend on the token position, or a head
that would mix channels of several positions, blocks the block. The same is done backwards from the core
output to the merged tensor. Nothing about ``[B, N, 3, H, D]`` or ``permute(2, 0, 3, 1, 4)`` is assumed.

Coupling: each q head h is one class with k/v head ``h·Hk/H`` (grouped-query attention keeps whole kv groups),
and with the merged channels of head h (the rows of the output projection).
Rewrites: every static entry of a chain Reshape/Expand target and Split sizes that varies with the channel; the
``q_num_heads``/``kv_num_heads`` attributes of a 3-D ``Attention`` op; com.microsoft ``num_heads``.
Blocked: com.microsoft packed ``Attention``, per-head masks, chains with other ops or other users.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis._channel_core import Builder, static_shape
from graphprune.analysis._channel_layout import const_slot
from graphprune.analysis.attention import AttentionBlock

_CHAIN = {"Reshape", "Transpose", "Gather", "Split", "Squeeze", "Unsqueeze", "Expand", "Mul", "Div", "Identity", "Cast"}
_OUT_CHAIN = {"Transpose", "Reshape"}


@dataclasses.dataclass
class _Block:
    blk: AttentionBlock
    operands: list[ir.Value]  # q-side, k-side, v-side inputs of the core
    k_transposed: bool
    chains: list[list[ir.Node]]  # per operand, forward order
    roots: list[ir.Value]
    out_chain: list[ir.Node]
    merged: ir.Value | None
    reason: str | None = None


@dataclasses.dataclass
class Claims:
    finishers: dict[ir.Node, _Block]


def _data_input(node: ir.Node) -> ir.Value | None:
    if node.op_type in ("Mul", "Div"):
        consts = [v for v in node.inputs if const_value(v) is not None and const_value(v).size == 1]
        data = [v for v in node.inputs if const_value(v) is None]
        return data[0] if len(consts) == 1 and len(data) == 1 else None
    return node.inputs[0]


def _walk_back(value: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    chain: list[ir.Node] = []
    cur = value
    while True:
        p = cur.producer()
        if p is None or p.domain != "" or p.op_type not in _CHAIN:
            return list(reversed(chain)), cur
        data = _data_input(p)
        shape_ok = p.op_type in ("Reshape", "Expand")  # targets may be computed; entries are checked in _edits
        if data is None or (not shape_ok and any(const_value(v) is None for v in p.inputs[1:] if v is not None and v is not data)):
            return list(reversed(chain)), cur
        chain.append(p)
        cur = data


def _walk_forward(value: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    chain: list[ir.Node] = []
    cur = value
    while True:
        users = [u for u, _ in cur.uses()]
        if len(users) != 1 or users[0].op_type not in _OUT_CHAIN or users[0].domain != "":
            return chain, cur
        chain.append(users[0])
        cur = users[0].outputs[0]


def _describe(b: Builder, blk: AttentionBlock) -> _Block:
    if blk.kind == "ms_attention":
        return _Block(blk, [], False, [], [], [], None, "com.microsoft packed Attention: heads are not separable")
    if blk.kind == "matmul_softmax":
        qk = next(n for n in blk.nodes if n.op_type in ("MatMul", "Einsum"))
        if qk.op_type == "Einsum":  # torchvision MaxViT's 5-D einsum core
            return _Block(blk, [], False, [], [], [], None, "the attention core is an Einsum; heads are not followed")
        pv = blk.nodes[-1]
        operands, kt = [qk.inputs[0], qk.inputs[1], pv.inputs[1]], True
    else:
        operands, kt = list(blk.nodes[0].inputs[:3]), False
    chains, roots = [], []
    for v in operands:
        c, r = _walk_back(v)
        chains.append(c)
        roots.append(r)
    out_chain, merged = _walk_forward(blk.output)
    rec = _Block(blk, operands, kt, chains, roots, out_chain, merged)
    if blk.mask is not None and blk.mask.shape is not None and len(blk.mask.shape) == 4:
        h = blk.mask.shape[1]
        if not (isinstance(h, int) and h == 1):
            rec.reason = "the mask has a head axis"
    return rec


def claim(b: Builder, blocks: list[AttentionBlock]) -> Claims:
    """Mark core and chain nodes as handled by this rule; the last core node finishes the block."""
    finishers: dict[ir.Node, _Block] = {}
    for blk in blocks:
        rec = _describe(b, blk)
        nodes = set(blk.nodes) | set(rec.out_chain) | {n for c in rec.chains for n in c}
        inner = [o for n in nodes for o in n.outputs if o is not rec.merged]
        if any(u not in nodes and u.op_type != "Shape" for o in inner for u, _ in o.uses()):
            rec.reason = rec.reason or "an intermediate attention value has users outside the block"
        b.claimed |= nodes
        finishers[blk.nodes[-1]] = rec
    return Claims(finishers)


def _eval_shape(value: ir.Value, env: dict, depth: int = 0) -> np.ndarray:
    """Evaluate a small shape computation (Shape of simulated values, constants, index arithmetic)."""
    c = const_value(value)
    if c is not None:
        return np.asarray(c)
    p = value.producer()
    if p is None or depth > 16:
        raise ValueError(f"shape {value.name!r} depends on a graph input")
    op = p.op_type
    if op == "Shape":
        src = env.get(p.inputs[0])
        if src is None:
            raise ValueError(f"Shape of {p.inputs[0].name!r} outside the simulated chain")
        shp = np.asarray(src.shape, dtype=np.int64)
        start = p.attributes.get_int("start", 0)
        end = p.attributes.get_int("end", len(shp))
        return shp[start:end]
    ins = [_eval_shape(v, env, depth + 1) if v is not None else None for v in p.inputs]
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in ins], axis=p.attributes.get_int("axis", 0))
    if op == "Gather":
        return np.take(ins[0], ins[1], axis=p.attributes.get_int("axis", 0))
    if op == "Slice":
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else [0]
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(axes)
        sl = [slice(None)] * ins[0].ndim
        for a, st, en, sp in zip(axes, ins[1], ins[2], steps, strict=False):
            sl[int(a)] = slice(int(st), int(en), int(sp))
        return ins[0][tuple(sl)]
    if op in ("Unsqueeze", "Squeeze", "Reshape"):
        if op == "Reshape":
            return ins[0].reshape(ins[1])
        return ins[0].reshape(-1) if op == "Unsqueeze" else np.squeeze(ins[0])
    if op in ("Cast", "Identity"):
        return ins[0]
    fns = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.floor_divide}
    if op in fns:
        return fns[op](ins[0], ins[1])
    raise ValueError(f"shape computed by {op}")


def _run(node: ir.Node, x: np.ndarray, env: dict) -> list[np.ndarray]:

    op = node.op_type
    if op == "Reshape":
        try:
            target = _eval_shape(node.inputs[1], env).astype(np.int64).ravel()
        except ValueError:
            return [x.reshape(_target(node.outputs[0]))]
        target = np.where(target == 0, np.asarray(x.shape[: len(target)] + (0,) * max(0, len(target) - x.ndim)), target)
        return [x.reshape(target)]
    if op in ("Squeeze", "Unsqueeze"):
        return [x.reshape(_target(node.outputs[0]))]
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return [np.transpose(x, perm)]
    if op == "Gather":
        return [np.take(x, const_value(node.inputs[1]), axis=node.attributes.get_int("axis", 0))]
    if op == "Expand":
        return [np.broadcast_to(x, static_shape(node.outputs[0]))]
    if op == "Split":
        sizes = np.asarray(const_value(node.inputs[1])) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        axis = node.attributes.get_int("axis", 0)
        if sizes is None:
            return list(np.split(x, len(node.outputs), axis=axis))
        return list(np.split(x, np.cumsum(sizes)[:-1], axis=axis))
    return [x]  # Mul/Div by a scalar, Identity, Cast


def _target(value: ir.Value) -> list[int]:
    """Reshape target for the simulation: plain symbols (batch, tokens) are 1, one composite symbol is -1."""
    if value.shape is None:
        raise ValueError(f"{value.name!r} has no shape")
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif d.value is not None and str(d.value).isidentifier():
            dims.append(1)
        else:
            dims.append(-1)
    if dims.count(-1) > 1:
        raise ValueError(f"{value.name!r} has several unknown dims")
    return dims


def _simulate(chain: list[ir.Node], start: ir.Value, arr: np.ndarray, env: dict) -> str | None:
    env[start] = arr
    for node in chain:
        x = env.get(_data_input(node))
        if x is None:
            continue
        try:
            ys = _run(node, x, env)
        except (ValueError, TypeError, IndexError) as e:
            return f"cannot follow channels through {node.op_type} {node.name!r} ({e})"
        for o, y in zip(node.outputs, ys, strict=False):
            env[o] = y
    return None


def _index_array(value: ir.Value, width: int) -> np.ndarray | None:

    s = static_shape(value)
    if s is None or s[-1] != width:
        return None
    outer = int(np.prod(s[:-1]))
    return (np.arange(width)[None, :] + width * np.arange(outer)[:, None]).reshape(s)


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
    for node in [n for c in rec.chains for n in c] + rec.out_chain:
        for o in node.outputs:  # new shapes of the intermediate values
            y = env.get(o)
            for ax in range(y.ndim if y is not None else 0):
                lines = atoms_of(np.moveaxis(y, ax, 0).reshape(y.shape[ax], -1))
                if not (lines == lines[:1]).all():
                    b.shape_lines.append((o, ax, lines))
        if node.op_type in ("Reshape", "Expand"):
            y = env.get(node.outputs[0])
            length = node.inputs[1].shape[0] if node.inputs[1].shape is not None and len(node.inputs[1].shape) == 1 else None
            if y is None or not isinstance(length, int):
                return f"{node.op_type} {node.name!r}: unknown target length"
            off = y.ndim - length
            for p in range(length):
                if p + off < 0:
                    continue
                lines = atoms_of(np.moveaxis(y, p + off, 0).reshape(y.shape[p + off], -1))
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
        elif node.op_type == "Split":
            if len(node.inputs) < 2 or node.inputs[1] is None:
                return f"Split {node.name!r} without sizes"
            axis = node.attributes.get_int("axis", 0)
            for k, o in enumerate(node.outputs):
                y = env.get(o)
                if y is not None:
                    b.count_edit(node, 1, k, atoms_of(np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)))
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
        maps.append(hm)
    qa, ka, va = (lab.atoms[m] for lab, m in zip(labs, maps, strict=True))
    h, hk = qa.shape[0], ka.shape[0]
    if h % hk or va.shape[0] != hk:
        return fail(f"{h} query heads do not split evenly over {hk} key/value heads")
    for i in range(h):
        j = i * hk // h
        b.union_all(np.concatenate([qa[i], ka[j], va[j]]))
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
        if rec.merged is None or rec.merged.shape is None:
            return fail("no merged output")
        start = _index_array(rec.blk.output, d)
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
    allowed = set(rec.roots) | {rec.blk.output} | {o for c in rec.chains + [rec.out_chain] for n in c for o in n.outputs}
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
                b.shape_lines.append((o, 1, qa[:, :1]))


def _core_cost(b: Builder, rec: _Block, head_atoms: np.ndarray, h: int, d: int) -> None:

    n = rec.blk.tokens
    q = static_shape(rec.blk.q) if rec.blk.q is not None else None
    if not n and q is not None and len(q) >= 2:
        n = q[-2]
    for node in rec.blk.nodes:  # per-node FLOPs come from count_flops when the caller has them
        b.cost(node, 4 * h * n * n * d if (n and node is rec.blk.nodes[-1]) else 0, None, head_atoms)
