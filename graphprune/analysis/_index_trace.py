"""One index-tracing interpreter: data-movement and shape ops evaluated over index maps. Changes nothing, runs nothing.

A caller seeds a value with an integer *index map* (a numpy array the shape of the value, every element a code for
what it holds: a channel + C·position, a flat stream position, ...) and hands an ordered list of nodes. Each node is
evaluated on the codes, so at any later value the array says which seeded element sits at each position. That is how
a channel, a head or a token atom is followed through any spelling an exporter writes: nothing about a particular
``reshape``/``permute``/``unbind`` sequence is assumed.

Ops followed (standard domain):
  1. movement: ``Reshape`` (``0`` and ``-1`` entries, ``allowzero``), ``Transpose``, ``Slice``, ``Squeeze``,
     ``Unsqueeze`` (axes as input or attribute), ``Gather`` (constant or computed indices), ``Split`` (sizes,
     ``num_outputs`` or equal parts), ``Concat`` (every part traced), ``Expand``, ``Tile``, ``Flatten``,
     ``Identity``, ``Cast``, ``Dropout`` (inference), ``Pad`` with zero pads;
  2. elementwise ops with exactly one traced input (a scale, a bias, a rotary factor): the codes pass through,
     broadcast to the output's shape;
  3. shape arithmetic feeding a target, bounds, indices or repeats (``Shape`` with ``start``/``end``, ``Size``,
     constants, ``Concat``, ``Gather``, ``Slice``, ``Squeeze``, ``Unsqueeze``, ``Reshape``, ``Cast``, ``Identity``,
     ``Add``/``Sub``/``Mul``/``Div``/``Mod``/``Max``/``Min``, ``Range``, ``ConstantOfShape``, ``Expand``,
     ``Equal``/``Where``): evaluated in numpy. ``Shape`` reads the traced array when the value is traced, else the
     value's static shape.

Static and symbolic dims: a symbolic dim is taken as ``fill`` (1 by default: the batch, the tokens), both in seeds
the caller builds with :func:`static_shape` and in every shape read off a value that is not traced, so one trace
stands for every size of those dims. A ``Reshape`` whose target cannot be evaluated falls back to the output's
inferred shape (plain symbols ``fill``, one composite symbol ``-1``).

Where it stops: :func:`trace` returns a :class:`Trace`; ``stop`` is set to a :class:`Stop` (the node and why) at the
first node it cannot evaluate, and ``env`` holds every value computed before it. Nodes whose data input is not traced
are passed over (a branch of the region that does not read the seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis import vocab

#: Ops the interpreter moves index codes through (the data-movement vocabulary).
MOVEMENT = vocab.MOVEMENT
#: Elementwise ops whose codes pass through when exactly one input is traced.
PASS_THROUGH = vocab.ARITHMETIC | {"Neg", "Where"}
_SHAPE_DEPTH = 24


class TraceStop(Exception):
    """Raised inside the interpreter; :func:`trace` turns it into :class:`Stop`."""

    def __init__(self, reason: str, node: ir.Node | None = None) -> None:
        super().__init__(reason)
        self.reason, self.node = reason, node


@dataclasses.dataclass
class Stop:
    """Where a trace stopped and why."""

    node: ir.Node | None
    reason: str

    def __str__(self) -> str:
        if self.node is None:
            return self.reason
        return f"cannot follow indices through {self.node.op_type} {self.node.name!r} ({self.reason})"


@dataclasses.dataclass
class Trace:
    """Index maps of the values computed so far (keyed by value) and, when it stopped early, where and why."""

    env: dict[ir.Value, np.ndarray]
    stop: Stop | None = None
    fill: int = 1

    def get(self, value: ir.Value | None) -> np.ndarray | None:
        return self.env.get(value) if value is not None else None

    @property
    def reason(self) -> str | None:
        return str(self.stop) if self.stop is not None else None


def static_shape(value: ir.Value | None, fill: int = 1) -> list[int] | None:
    """``value``'s shape with named symbolic dims as ``fill``; ``None`` when the rank or a dim is unknown."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value is not None:
            dims.append(fill)
        else:
            return None
    return dims


def _target_shape(value: ir.Value, fill: int) -> list[int]:
    """An output shape as a reshape target: plain symbols ``fill``, one composite symbol (``batch*197``) ``-1``."""
    if value.shape is None:
        raise TraceStop(f"{value.name!r} has no inferred shape")
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif d.value is not None and str(d.value).isidentifier():
            dims.append(fill)
        else:
            dims.append(-1)
    if dims.count(-1) > 1:
        raise TraceStop(f"{value.name!r} has several unknown dims")
    return dims


_LOGIC: dict[str, Callable] = {"Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal,
                               "LessOrEqual": np.less_equal, "And": np.logical_and, "Or": np.logical_or,
                               "Xor": np.logical_xor, "Not": np.logical_not}
_ARITH: dict[str, Callable] = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide,
                               "Mod": np.mod, "Max": np.maximum, "Min": np.minimum, "Equal": np.equal}


def eval_shape(value: ir.Value, env: dict, fill: int = 1, depth: int = 0, limit: int = _SHAPE_DEPTH,
               cache: dict | None = None) -> np.ndarray:
    """Evaluate a small shape (or mask) computation in numpy (see the module docstring); a value in ``env`` (a
    traced value, a seeded graph input) is read from there. ``cache`` memoises values across calls. Raises
    :class:`TraceStop`."""
    if value in env:
        return env[value]
    if cache is not None and value in cache:
        return cache[value]
    out = _eval(value, env, fill, depth, limit, cache)
    if cache is not None:
        cache[value] = out
    return out


def _eval(value: ir.Value, env: dict, fill: int, depth: int, limit: int, cache: dict | None) -> np.ndarray:
    c = const_value(value)
    if c is not None:
        return np.asarray(c)
    p = value.producer()
    if p is None:
        raise TraceStop(f"shape value {value.name!r} is a graph input")
    if depth > limit or p.domain != "":
        raise TraceStop(f"shape value {value.name!r} is computed by {p.domain + '::' if p.domain else ''}{p.op_type}", p)
    op = p.op_type
    if op in ("Shape", "Size"):
        src = env.get(p.inputs[0])
        shp = np.asarray(src.shape if src is not None else static_shape(p.inputs[0], fill) or [-1], dtype=np.int64)
        if src is None and (shp < 0).any():
            raise TraceStop(f"the shape of {p.inputs[0].name!r} is unknown", p)
        if op == "Size":
            return np.asarray(int(np.prod(shp)), dtype=np.int64)
        start, end = p.attributes.get_int("start", 0), p.attributes.get_int("end", len(shp))
        return shp[start:end]
    ins = [eval_shape(v, env, fill, depth + 1, limit, cache) if v is not None else None for v in p.inputs]
    a = p.attributes
    if op == "Concat":
        return np.concatenate([np.atleast_1d(x) for x in ins if x is not None], axis=a.get_int("axis", 0))
    if op == "Gather":
        return np.take(ins[0], ins[1], axis=a.get_int("axis", 0))
    if op == "Slice":
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(np.atleast_1d(ins[1])))
        return _slice(ins[0], ins[1], ins[2], axes, ins[4] if len(ins) > 4 else None)
    if op in ("Squeeze", "Unsqueeze"):
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else a.get_ints("axes", None)
        return _squeeze(ins[0], axes) if op == "Squeeze" else _unsqueeze(ins[0], axes)
    if op == "Reshape":
        return ins[0].reshape(_resolve_target(ins[1], ins[0].shape, a.get_int("allowzero", 0)))
    if op == "Identity":
        return ins[0]
    if op == "Cast":
        return ins[0].astype(ir.DataType(a.get_int("to", 0)).numpy())
    if op == "Div" and np.issubdtype(np.result_type(ins[0], ins[1]), np.floating):
        return np.true_divide(ins[0], ins[1])
    if op in _ARITH:
        return _ARITH[op](ins[0], ins[1])
    if op in _LOGIC:
        return _LOGIC[op](*ins[:2]) if op != "Not" else np.logical_not(ins[0])
    if op == "Neg":
        return -ins[0]
    if op == "CumSum" and not a.get_int("exclusive", 0) and not a.get_int("reverse", 0):
        return np.cumsum(ins[0], axis=int(np.asarray(ins[1]).ravel()[0]))
    if op == "GatherND" and not a.get_int("batch_dims", 0):
        idx = np.asarray(ins[1]).astype(np.int64)
        return ins[0][tuple(np.moveaxis(idx, -1, 0))]
    if op == "Transpose":
        return np.transpose(ins[0], a.get_ints("perm", None))
    if op == "Tile":
        return np.tile(ins[0], _ints(ins[1]))
    if op == "Trilu":
        k = int(np.asarray(ins[1]).ravel()[0]) if len(ins) > 1 and ins[1] is not None else 0
        return np.triu(ins[0], k) if a.get_int("upper", 1) else np.tril(ins[0], k)
    if op == "Range":
        return np.arange(int(ins[0]), int(ins[1]), int(ins[2]), dtype=np.int64)
    if op == "ConstantOfShape":
        t = p.attributes.get("value")
        val = t.value.numpy().ravel()[0] if t is not None else 0
        return np.full([int(d) for d in ins[0]], val)
    if op == "Expand":
        return ins[0] * np.ones([int(d) for d in ins[1]], dtype=ins[0].dtype)
    if op == "Where":
        return np.where(ins[0], ins[1], ins[2])
    raise TraceStop(f"shape value {value.name!r} is computed by {op}", p)


def _ints(arr) -> list[int]:
    return [int(v) for v in np.asarray(arr).ravel()]


def _slice(x: np.ndarray, starts, ends, axes, steps) -> np.ndarray:
    axes = _ints(axes)
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    sl = [slice(None)] * x.ndim
    for ax, st, en, sp in zip(axes, _ints(starts), _ints(ends), steps, strict=True):
        sl[ax % x.ndim] = slice(st, en, sp)
    return x[tuple(sl)]


def _squeeze(x: np.ndarray, axes) -> np.ndarray:
    if axes is None or not len(np.atleast_1d(axes)):
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in _ints(axes)))


def _unsqueeze(x: np.ndarray, axes) -> np.ndarray:
    axes = _ints(axes)
    out = x.ndim + len(axes)
    for ax in sorted(a % out for a in axes):
        x = np.expand_dims(x, ax)
    return x


def _resolve_target(target, src_shape, allowzero: int) -> list[int]:
    t = _ints(target)
    if not allowzero:
        t = [src_shape[i] if v == 0 and i < len(src_shape) else v for i, v in enumerate(t)]
    return t


def _traced(node: ir.Node, env: dict) -> list[int]:
    return [i for i, v in enumerate(node.inputs) if v is not None and v in env]


def _shape_in(node: ir.Node, i: int, env: dict, fill: int) -> np.ndarray | None:
    v = node.inputs[i] if len(node.inputs) > i else None
    return eval_shape(v, env, fill) if v is not None else None


def step(node: ir.Node, env: dict, fill: int = 1) -> list[np.ndarray] | None:
    """Index maps of ``node``'s outputs from those of its traced inputs; ``None`` when no data input is traced.
    Raises :class:`TraceStop` when the node cannot be followed."""
    if node.domain != "":
        raise TraceStop(f"{node.domain} op", node)
    op, a = node.op_type, node.attributes
    traced = _traced(node, env)
    if not traced:
        return None
    if op in PASS_THROUGH:
        if len(traced) != 1 or (op == "Where" and traced[0] == 0):
            raise TraceStop("it combines several traced values" if len(traced) != 1 else "the condition is traced")
        x = env[node.inputs[traced[0]]]
        others = [static_shape(v, fill) if const_value(v) is None else list(np.shape(const_value(v)))
                  for i, v in enumerate(node.inputs) if v is not None and i != traced[0]]
        if any(s is None for s in others):
            raise TraceStop("an operand has an unknown shape")
        return [np.broadcast_to(x, np.broadcast_shapes(x.shape, *[tuple(s) for s in others]))]
    if op not in MOVEMENT:
        raise TraceStop("it computes on the values")
    if op == "Concat":
        if len(traced) != len([v for v in node.inputs if v is not None]):
            raise TraceStop("it joins a value that is not traced")
        return [np.concatenate([env[v] for v in node.inputs if v is not None], axis=a.get_int("axis", 0))]
    if traced != [0]:
        raise TraceStop("a shape or index input is traced, not the data")
    x = env[node.inputs[0]]
    if op in ("Identity", "Cast"):
        return [x]
    if op == "Dropout":
        return [x] + ([np.ones(x.shape, bool)] if len(node.outputs) > 1 else [])
    if op == "Pad":
        pads = _shape_in(node, 1, env, fill)
        if pads is None or np.any(pads) or a.get_string("mode", "constant") != "constant":
            raise TraceStop("it pads with values")
        return [x]
    if op == "Reshape":
        try:
            target = _resolve_target(_shape_in(node, 1, env, fill), x.shape, a.get_int("allowzero", 0))
        except TraceStop:
            target = _target_shape(node.outputs[0], fill)
        return [x.reshape(target)]
    if op == "Transpose":
        return [np.transpose(x, a.get_ints("perm", None))]
    if op == "Slice":
        starts, ends = _shape_in(node, 1, env, fill), _shape_in(node, 2, env, fill)
        axes = _shape_in(node, 3, env, fill)
        return [_slice(x, starts, ends, axes if axes is not None else range(len(np.atleast_1d(starts))),
                       _shape_in(node, 4, env, fill))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _shape_in(node, 1, env, fill)
        axes = axes if axes is not None else a.get_ints("axes", None)
        return [_squeeze(x, axes) if op == "Squeeze" else _unsqueeze(x, axes)]
    if op == "Gather":
        idx = np.asarray(_shape_in(node, 1, env, fill)).astype(np.int64)
        return [np.take(x, idx, axis=a.get_int("axis", 0))]
    if op == "Flatten":
        ax = a.get_int("axis", 1) % max(x.ndim, 1)
        return [x.reshape(int(np.prod(x.shape[:ax])), -1)]
    if op == "Expand":
        return [np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(_shape_in(node, 1, env, fill)))))]
    if op == "Tile":
        return [np.tile(x, _ints(_shape_in(node, 1, env, fill)))]
    # Split
    axis = a.get_int("axis", 0) % x.ndim
    sizes = _shape_in(node, 1, env, fill)
    k = len(node.outputs)
    if sizes is None:  # num_outputs (opset 18): ceil(n / k) each, the last one smaller; else equal parts
        n = x.shape[axis]
        size = -(-n // k)
        sizes = [min(size, max(n - size * i, 0)) for i in range(k)]
    sizes = _ints(sizes)
    if len(sizes) != k or sum(sizes) != x.shape[axis]:
        raise TraceStop(f"split sizes {sizes} do not cover the axis of {x.shape[axis]}")
    return list(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


Custom = Callable[[object, dict], "list[np.ndarray] | None"]


def trace(nodes: Iterable, seeds: dict[ir.Value, np.ndarray], fill: int = 1, custom: Custom | None = None,
          env: dict | None = None) -> Trace:
    """Evaluate ``nodes`` (in order) on the index maps ``seeds``. ``custom(step, env)`` evaluates composite steps a
    caller defines (a rotary embedding); it returns ``None`` to fall back to :func:`step`. ``env`` continues an
    earlier trace. Returns the maps of every value computed, and where it stopped (see :class:`Trace`)."""
    env = env if env is not None else {}
    env.update(seeds)
    for node in nodes:
        try:
            ys = custom(node, env) if custom is not None else None
            if ys is None:
                ys = step(node, env, fill)
        except TraceStop as e:
            return Trace(env, Stop(e.node or node, e.reason), fill)
        except (ValueError, TypeError, IndexError) as e:
            return Trace(env, Stop(node, str(e)), fill)
        if ys is None:
            continue
        for o, y in zip(node.outputs, ys, strict=False):
            env[o] = y
    return Trace(env, None, fill)


def index_map(shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Seed codes: every element its flat position (on a ``[.., C]`` value: channel + C·position)."""
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def movement_source(value: ir.Value, limit: int = 32) -> tuple[ir.Value, list[ir.Node]]:
    """Walk back from ``value`` through single-data-input movement ops (not ``Concat``): (the value they start
    from, the nodes in graph order). With no movement op before ``value``, that is ``(value, [])``."""
    nodes: list[ir.Node] = []
    cur = value
    while len(nodes) < limit:
        p = cur.producer()
        if p is None or p.domain != "" or p.op_type not in MOVEMENT or p.op_type == "Concat" or not p.inputs:
            break
        nodes.append(p)
        cur = p.inputs[0]
    return cur, nodes[::-1]


def distinct_along(value: ir.Value, axis: int, max_elements: int = 1 << 22) -> int | None:
    """How many distinct slices ``value`` holds along ``axis`` when it is a movement-op view of one source (a
    ``repeat_kv`` expansion ``Reshape(Expand(Unsqueeze(k)))`` repeats each kv head); ``None`` when unknown."""
    src, nodes = movement_source(value)
    shape = static_shape(src)
    if not nodes or shape is None or int(np.prod(shape)) > max_elements:
        return None
    t = trace(nodes, {src: index_map(shape)})
    y = t.get(value)
    if t.stop is not None or y is None or not -y.ndim <= axis < y.ndim:
        return None
    rows = np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)
    return len(np.unique(rows, axis=0))
