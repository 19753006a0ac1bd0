"""Window / grid partitions around an attention core (for :mod:`graphprune.analysis.attention`). Changes nothing.

Pattern: the projection input ``P`` of a block is reached from a stream value ``S`` (``[B, L, C]`` or channels-last
``[B, H, W, C]``) only through data-movement ops (``Reshape``, ``Transpose``, ``Slice``, ``Concat``, ``Squeeze``,
``Unsqueeze``, ``Flatten``, ``Identity``, constant-index ``Gather``, zero ``Pad``): Swin's
``view → (roll) → view(B, H/ws, ws, W/ws, ws, C) → permute(0, 1, 3, 2, 4, 5) → reshape(-1, ws·ws, C)``, MaxViT's
block and grid partitions. ``torch.roll`` exports as ``Slice``/``Concat`` pairs and is one of these.

How it is recognised (nothing about a particular permute is assumed): an index array (flat position in ``S``, with
symbolic dims — the batch — set to 1) is pushed through those ops by the index-tracing interpreter
(:mod:`graphprune.analysis._index_trace`). At ``P`` every element must still hold
its channel, and the tokens seen by the attention (``T`` = the core's query length) give a token map
``[windows, T]``: which stream token sits at each (window, position). ``S`` may be channels-last or NCHW (tried in
that order; the channel check decides). With the stream's spatial map ``H × W`` (``S`` itself when it is 4-D, else
the first ``[B, H, W, C]`` or ``[B, H/a, a, W/b, b, C]`` view of it reached by reshapes; else ``1 × L``) each window
is checked to be a row-major
``wh × ww`` block of tokens with a constant row step ``sr`` and column step ``sc`` (cyclic):
  1. ``sr = sc = 1``: ``window`` partition; ``shift`` is the offset of the window starts (a rolled map);
  2. ``sr·wh = H`` and ``sc·ww = W``: ``grid`` partition (MaxViT), ``dilation = (sr, sc)``;
  3. anything else that still moves tokens (overlaps, missing tokens, other steps): ``other``.
The reverse is checked the same way: from the output projection to the value entering the residual ``Add``, an
index array of the windows must land every token back where it came from; otherwise the kind is ``other``.
A constant ``Pad`` of a channels-last map right before the chain (torchvision's Swin pads to a multiple of the
window) is part of the partition: the windows tile the padded map, and the reverse must crop back to it.
``known`` layouts: when ``S`` is (token-wise ops away from) a stream value already partitioned by an earlier block
(torchvision MaxViT runs its residuals in window layout), the token map is composed with that block's, so it is
stated on the image. One window holding every token in order with no spatial view in between (an NCHW →
``[B, L, C]`` layout change, ``[B·N, C]`` for a Gemm) is no partition; one window covering the whole map through a
``[B, H/a, a, W/b, b, C]`` view (Swin's last stage) is a ``window`` partition with ``windows = 1``: the token count
is written there as H × W factors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis import _index_trace, vocab

#: Ops that move elements without computing (the partition / reverse vocabulary).
MOVE = frozenset({"Reshape", "Transpose", "Slice", "Concat", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather",
                  "Pad"})
_REORDER = frozenset({"Transpose", "Slice", "Concat", "Gather", "Pad"})
_MAX_ELEMENTS = 1 << 24  # index arrays beyond this are not simulated (the block is then described as "other")


@dataclasses.dataclass
class Partition:
    kind: str  # "window" | "grid" | "other"
    source: ir.Value  # the stream-side value S
    nodes: list[ir.Node]  # S → P, in graph order
    window: tuple[int, int] | None = None
    windows: int | None = None  # per image
    tokens_per_window: int | None = None
    dilation: tuple[int, int] | None = None
    shift: tuple[int, int] = (0, 0)
    spatial: tuple[int, int] | None = None  # the H × W token map
    tokmap: np.ndarray | None = None  # [windows, T] stream token of each (window, position)
    channels: int | None = None
    reason: str | None = None  # why the kind is "other"
    pad: ir.Node | None = None  # a Pad of the map before the partition (the windows tile the padded map)
    unpadded: tuple[int, int] | None = None  # the map before that Pad
    pad_begin: tuple[int, int] = (0, 0)


def is_move(node: ir.Node | None) -> bool:
    if node is None or node.domain != "" or node.op_type not in MOVE:
        return False
    if node.op_type == "Gather":
        return const_value(node.inputs[1]) is not None
    if node.op_type == "Pad":
        pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        return pads is not None and not np.any(pads) and node.attributes.get_string("mode", "constant") == "constant"
    return True


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None] if node.op_type == "Concat" else [node.inputs[0]]


def back_chain(p: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """(S, movement nodes S → P in graph order) when ``P`` comes from one value through movement ops, else None."""
    nodes: dict[int, ir.Node] = {}
    sources: dict[int, ir.Value] = {}
    stack = [p]
    while stack:
        v = stack.pop()
        prod = v.producer()
        if not is_move(prod):
            sources[id(v)] = v
            continue
        if id(prod) in nodes:
            continue
        nodes[id(prod)] = prod
        stack.extend(_data_inputs(prod))
    if not nodes or len(sources) != 1:
        return None
    order = {id(n): i for i, n in enumerate(p.graph)} if p.graph is not None else {}
    return next(iter(sources.values())), sorted(nodes.values(), key=lambda n: order.get(id(n), 0))


def _static(value: ir.Value, fill: int = 1) -> tuple[int, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else fill for d in value.shape)


def _ints(value: ir.Value | None) -> list[int] | None:
    arr = const_value(value)
    return None if arr is None else [int(x) for x in np.asarray(arr).ravel()]


def simulate(nodes: list[ir.Node], start: ir.Value, arr: np.ndarray) -> _index_trace.Trace:
    """Index maps of every value ``nodes`` compute from ``arr`` at ``start`` (the index-tracing interpreter);
    ``stop`` says where and why it could not go on."""
    return _index_trace.trace(nodes, {start: arr})


def _spatial(src: ir.Value, nodes: list[ir.Node], env: dict, tokens: int) -> tuple[int, int]:
    """The H × W map: ``S`` when 4-D, else the first view of ``S`` reached by reshapes only that is
    ``[1, H, W, C]`` or ``[1, a, b, c, d, C]`` (H = a·b, W = c·d, as both window and grid partitions write it);
    else a 1 × L row."""
    s = env.get(src).shape
    if len(s) == 4:
        return s[1], s[2]
    pure = {id(src)}
    for n in nodes:
        if n.op_type not in ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity") or id(n.inputs[0]) not in pure:
            continue
        pure.add(id(n.outputs[0]))
        y = env.get(n.outputs[0])
        if y is None or y.shape[-1] != s[-1] or int(np.prod(y.shape[1:-1])) != tokens:
            continue
        if y.ndim == 4:
            return y.shape[1], y.shape[2]
        if y.ndim == 6:
            return y.shape[1] * y.shape[2], y.shape[3] * y.shape[4]
    return 1, tokens


def _steps(a: np.ndarray, mod: int) -> int | None:
    """The one cyclic step along axis 1 of ``a`` (1 when the axis has length 1), else None."""
    if a.shape[1] < 2:
        return 1
    d = np.unique((a[:, 1:] - a[:, :-1]) % mod)
    return int(d[0]) if d.size == 1 else None


_TOKENWISE = vocab.ARITHMETIC | frozenset({"LayerNormalization", "Relu", "Erf", "Gelu", "Sigmoid", "Tanh",
                        "Identity", "Dropout"})


def _known_layout(v: ir.Value, known: dict | None) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The layout of ``v`` when it is (token-wise ops away from) a partitioned stream described before: (image
    token of each of ``v``'s tokens, H × W map). Residual Adds and norms in window layout keep the layout."""
    if not known:
        return None
    stack, seen = [(v, 0)], set()
    while stack:
        x, depth = stack.pop()
        if id(x) in known:
            return known[id(x)]
        prod = x.producer()
        if id(x) in seen or depth > 24 or prod is None or prod.domain != "" or prod.op_type not in _TOKENWISE:
            continue
        seen.add(id(x))
        for inp in prod.inputs:
            if inp is not None and const_value(inp) is None and inp.shape is not None and x.shape is not None \
                    and list(inp.shape) == list(x.shape):
                stack.append((inp, depth + 1))
    return None


def describe(p: ir.Value, tokens: int | None, known: dict | None = None) -> Partition | None:
    """The partition from the stream to ``p`` (the projection input, or the partitioned stream itself when the
    residual runs in window layout), attention over ``tokens`` queries; None when tokens are not rearranged.

    ``known``: id of an already partitioned stream value → (image token of each of its tokens, H × W), so a grid
    partition taken from a window layout (torchvision MaxViT) is described on the image."""
    found = back_chain(p)
    if found is None:
        return None
    src, nodes = found
    reorders = any(n.op_type in _REORDER for n in nodes)
    shape = _static(src)
    c = p.shape[-1] if p.shape is not None and len(p.shape) else None
    other = Partition("other", src, nodes)
    if shape is None or len(shape) not in (3, 4) or not tokens or not isinstance(c, int):
        other.reason = "the stream shape or the attention length is unknown"
        return other if reorders else None
    if any(not isinstance(d, int) for d in list(src.shape)[1:]):  # only the batch may be symbolic
        other.reason = "the token map is dynamic"
        return other if reorders else None
    shape = (1, *shape[1:])
    size = int(np.prod(shape))
    if size > _MAX_ELEMENTS:
        other.reason = f"the stream has {size} elements; not simulated"
        return other
    base = _known_layout(src, known)
    length = size // c
    layouts = (["last"] if shape[-1] == c else []) + (["first"] if base is None and len(shape) == 4 and shape[1] == c else [])
    y, nchw, stop = None, False, None
    for layout in layouts:  # channels last ([B, L, C], [B, H, W, C]) or first (NCHW: element (ch, r, col) is token r·W + col)
        nchw = layout == "first"
        arr = np.arange(size, dtype=np.int64).reshape(shape)
        if nchw:
            arr = arr.reshape(1, shape[2], shape[3], c).transpose(0, 3, 1, 2)
        env = simulate(nodes, src, arr)
        y = env.get(p) if env.stop is None else None
        stop = stop or env.reason
        if y is not None and y.shape[-1] == c and (y % c == np.arange(c)).all() and not y.size % (c * tokens):
            break
        y = None
    if y is None:
        other.reason = "the partition could not be followed" + (f": {stop}" if stop else "")
        return other
    tok = (y // c)[..., 0].reshape(-1, tokens)
    if tok.size != length or not np.array_equal(np.sort(tok.ravel()), np.arange(length)):
        other.reason = "windows do not cover every token once"
        return other
    if base is not None:
        tok, (hm, wm) = base[0][tok], base[1]
    else:
        hm, wm = (shape[2], shape[3]) if nchw else _spatial(src, nodes, env, length)
    split = any(y.ndim >= 5 for n in nodes for o in n.outputs if (y := env.get(o)) is not None)
    if tok.shape[0] == 1 and np.array_equal(tok[0], np.arange(length)) and not split:
        return None  # one window in token order, no spatial view: a layout change (NCHW → [B, L, C], [B·N, C])
    part = _classify(Partition("other", src, nodes, windows=tok.shape[0], tokens_per_window=tokens,
                               spatial=(hm, wm), tokmap=tok, channels=c))
    _padding(part)
    return part


def _padding(part: Partition) -> None:
    """Record a constant ``Pad`` of a channels-last map right before the partition (torchvision's Swin pads the map
    to a multiple of the window); the source then becomes the unpadded map."""
    pad = part.source.producer()
    if pad is None or pad.domain != "" or pad.op_type != "Pad" or pad.attributes.get_string("mode", "constant") != "constant":
        return
    pads, x = _ints(pad.inputs[1]) if len(pad.inputs) > 1 else None, pad.inputs[0]
    axes = pad.inputs[3] if len(pad.inputs) > 3 else None
    shape = _static(x)
    if pads is None or axes is not None or shape is None or len(shape) != 4 or len(pads) != 8:
        return
    if pads[0] or pads[3] or pads[4] or pads[7] or min(pads) < 0 or part.spatial != (shape[1] + pads[1] + pads[5],
                                                                                      shape[2] + pads[2] + pads[6]):
        return
    part.pad, part.unpadded, part.pad_begin = pad, (shape[1], shape[2]), (pads[1], pads[2])
    part.source, part.nodes = x, [pad, *part.nodes]


def _classify(part: Partition) -> Partition:
    """window / grid / other from the token map (see the module docstring)."""
    tok, tokens = part.tokmap, part.tokens_per_window
    hm, wm = part.spatial
    r, col = tok // wm, tok % wm
    first_row = np.nonzero(r[0] != r[0, 0])[0]
    ww = int(first_row[0]) if first_row.size else tokens
    wh = tokens // ww
    part.window = (wh, ww)
    r3, c3 = r.reshape(-1, wh, ww) if wh * ww == tokens else r, col.reshape(-1, wh, ww) if wh * ww == tokens else col
    if wh * ww != tokens or not ((r3 == r3[:, :, :1]).all() and (c3 == c3[:, :1, :]).all()):
        part.window, part.reason = None, "windows are not rectangular"
        return part
    sr, sc = _steps(r3[:, :, 0], hm), _steps(c3[:, 0, :], wm)
    if sr == 1 and sc == 1:
        off = (r3[:, 0, 0] % wh, c3[:, 0, 0] % ww)
        if (off[0] == off[0][0]).all() and (off[1] == off[1][0]).all():
            part.kind, part.dilation, part.shift = "window", (1, 1), (int(off[0][0]), int(off[1][0]))
            return part
    elif sr is not None and sc is not None and sr * wh == hm and sc * ww == wm:
        part.kind, part.dilation = "grid", (sr, sc)
        return part
    part.reason = "tokens of a window are neither contiguous nor a regular grid"
    return part


def reverse_ok(part: Partition, v: ir.Value, nodes: list[ir.Node], r: ir.Value) -> bool:
    """True when the movement ``nodes`` from ``v`` (window layout, the out projection's output) to ``r`` (stream
    layout) put every token back where ``part`` took it from."""
    if part.tokmap is None or v.shape is None or r.shape is None:
        return False
    nw, t = part.tokmap.shape
    c = part.channels
    dims = list(v.shape)
    known = int(np.prod([d for d in dims if isinstance(d, int)]))
    free = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if len(free) > 1 or (nw * t * c) % known:
        return False
    if free:
        dims[free[0]] = nw * t * c // known
    if int(np.prod(dims)) != nw * t * c or dims[-1] != c:
        return False
    env = simulate(nodes, v, np.arange(nw * t * c, dtype=np.int64).reshape(dims))
    y = env.get(r) if env.stop is None else None
    shape = _static(part.source)
    if y is None or shape is None or y.shape != (1, *shape[1:]):
        return False
    if not (y % c == np.arange(c)).all():
        return False
    j = (y // c)[..., 0].reshape(-1)
    want = np.arange(j.size)
    if part.pad is not None:  # stream token (r, c) of the unpadded map sits at (r + top, c + left) of the padded one
        r, col = np.divmod(want, part.unpadded[1])
        want = (r + part.pad_begin[0]) * part.spatial[1] + col + part.pad_begin[1]
    return bool(np.array_equal(part.tokmap.reshape(-1)[j], want))


def forward_region(start: ir.Value) -> tuple[list[ir.Node], ir.Value] | None:
    """Movement and elementwise-with-constant nodes downstream of ``start`` up to one exit value (what a residual
    ``Add`` then reads), as (nodes in graph order, exit); None when the region has several exits."""
    region: dict[int, ir.Node] = {}
    values = {id(start): start}
    stack = [start]
    while stack:
        v = stack.pop()
        for user, _ in v.uses():
            if id(user) in region or not (is_move(user) or _with_constant(user)):
                continue
            region[id(user)] = user
            for o in user.outputs:
                values[id(o)] = o
                stack.append(o)
    for n in region.values():  # a Concat must take every input from the region (roll), not join another tensor
        if n.op_type == "Concat" and any(id(x) not in values for x in n.inputs if x is not None):
            return None
    exits = [v for v in values.values()
             if v.is_graph_output() or any(id(u) not in region and u.op_type != "Shape" for u, _ in v.uses())]
    if len(exits) != 1:
        return None
    order = {id(n): i for i, n in enumerate(start.graph)} if start.graph is not None else {}
    return sorted(region.values(), key=lambda n: order.get(id(n), 0)), exits[0]


def _with_constant(node: ir.Node) -> bool:
    """Bias / layer scale (``Add``/``Mul``/``Div``/``Sub`` of one data input and a constant ``[C]`` or scalar), or an
    inference-time ``Dropout``."""
    if node.domain != "":
        return False
    if node.op_type == "Dropout":
        return len(node.outputs) == 1 or not node.outputs[1].uses()
    if node.op_type not in vocab.ARITHMETIC or len(node.inputs) != 2:
        return False
    consts = [const_value(v) for v in node.inputs]
    if sum(c is not None for c in consts) != 1:
        return False
    c = next(c for c in consts if c is not None)
    return c.ndim <= 1 or int(np.prod(c.shape[:-1])) == 1
