"""An ONNX graph run by torch operators, its weights trainable: what ``bench_distill`` fine-tunes.

:class:`OnnxModule` walks the graph once per call (its nodes are in topological order) and evaluates each node with
torch, so autograd reaches the floating-point initializers that feed a layer. Those become ``nn.Parameter``\\ s
(fp32); :meth:`OnnxModule.write_back` puts their values back into the ``ir.Model``'s initializers in their own
dtype, so the distilled model is the pruned ONNX file with new weights, ready for ONNX Runtime. ``ai.graphprune``
nodes run their op definition's ``compute`` on the torch array-API namespace (the code the numpy reference runs).

Benchmark code, not part of the package: distillation after pruning did not win on MiniLM (docs/frontier.md), so
graphprune has no training stage. Why not a converter library: onnx2torch, the maintained one, requires
torchvision, whose registry build does not import here (MEASURED.md); and the weights must map back to initializer
names, which an interpreter of the graph gives for free. A graph with an op outside ``_OPS`` or with subgraphs is
refused before any training, the ops named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

#: Ops whose floating-point initializer inputs are trained (any input position). Not ``Gather``: an embedding table
#: would move only the rows of the tokens the distillation texts contain.
_WEIGHTED = {"MatMul", "Gemm", "Conv", "LayerNormalization", "Add", "Mul", "BatchNormalization", "RMSNormalization",
             "SimplifiedLayerNormalization"}


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _torch_dtype(code: int) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, ir.DataType(code).numpy())).dtype


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable:
    def run(node: ir.Node, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _ints(axes) if axes is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        if not dims:
            if _attr(node, "noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, [_axis(d, x.dim()) for d in dims], keep)
    return run


def _slice(node: ir.Node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        n = x.shape[a]
        s, e = s + n if s < 0 else s, e + n if e < 0 else e
        if st > 0:  # ONNX clamps to [0, n]; a view
            s, e = max(0, min(n, s)), max(0, min(n, e))
            x = x.narrow(a, s, max(0, e - s))[(slice(None),) * a + (slice(None, None, st),)]
        else:  # negative step: start clamped to [0, n - 1], end to [-1, n - 1]
            s, e = max(0, min(n - 1, s)), max(-1, min(n - 1, e))
            x = torch.index_select(x, a, torch.arange(s, e, st, dtype=torch.long))
    return x


def _gemm(node, a, b, c=None):
    if _attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(node, "transB", 0):
        b = b.transpose(0, 1)
    y = _attr(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + _attr(node, "beta", 1.0) * c


def _pads(node, spatial: int) -> list[int]:
    pads = _attr(node, "pads") or [0] * (2 * spatial)
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError(f"node {node.name!r} ({node.op_type}): auto_pad {_attr(node, 'auto_pad')} is not supported for training")
    return pads


def _conv(node, x, w, b=None):
    spatial = x.dim() - 2
    pads = _pads(node, spatial)
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (begin[i], end[i])])
        begin = [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, stride=_attr(node, "strides") or 1, padding=begin, dilation=_attr(node, "dilations") or 1,
                groups=_attr(node, "group", 1))


def _pool(kind: str) -> Callable:
    def run(node, x):
        spatial = x.dim() - 2
        k = _attr(node, "kernel_shape")
        pads = _pads(node, spatial)
        begin, end = pads[:spatial], pads[spatial:]
        if begin != end or _attr(node, "ceil_mode", 0):
            raise ValueError(f"node {node.name!r} ({node.op_type}): asymmetric pads / ceil_mode are not supported for training")
        stride = _attr(node, "strides") or [1] * spatial
        if kind == "max":
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial](
                x, k, stride, begin, dilation=_attr(node, "dilations") or 1)
        return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial](
            x, k, stride, begin, count_include_pad=bool(_attr(node, "count_include_pad", 0)))
    return run


def _layer_norm(node, x, w, b=None):
    axis = _axis(_attr(node, "axis", -1), x.dim())
    return F.layer_norm(x, tuple(x.shape[axis:]), w.expand(x.shape[axis:]) if w.dim() < x.dim() - axis else w,
                        b, _attr(node, "epsilon", 1e-5))


def _rms_norm(node, x, w, *rest):
    axis = _axis(_attr(node, "axis", -1), x.dim())
    dims = list(range(axis, x.dim()))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + _attr(node, "epsilon", 1e-5)) * w


def _batch_norm(node, x, w, b, mean, var):
    return F.batch_norm(x, mean, var, w, b, False, 0.0, _attr(node, "epsilon", 1e-5))


def _gather_nd(node, x, idx):
    bd = _attr(node, "batch_dims", 0)
    if bd:
        raise ValueError(f"node {node.name!r} (GatherND): batch_dims {bd} is not supported for training")
    idx = idx.long()
    return x[tuple(idx[..., i] for i in range(idx.shape[-1]))]


def _split(node, x, split=None):
    axis = _axis(_attr(node, "axis", 0), x.dim())
    sizes = _ints(split) if split is not None else _attr(node, "split")
    if sizes is None:
        n = _attr(node, "num_outputs", len(node.outputs))
        sizes = [-(-x.shape[axis] // n)] * n
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return list(torch.split(x, sizes, dim=axis))


def _reshape(node, x, shape):
    dims = _ints(shape)
    if not _attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _unsqueeze(node, x, axes=None):
    axes = _ints(axes) if axes is not None else _attr(node, "axes")
    out_rank = x.dim() + len(axes)
    for a in sorted(_axis(a, out_rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(node, x, axes=None):
    axes = _ints(axes) if axes is not None else _attr(node, "axes")
    if axes is None:
        return x.squeeze()
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _expand(node, x, shape):
    dims = _ints(shape)
    rank = max(x.dim(), len(dims))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ds = [1] * (rank - len(dims)) + dims
    return x.reshape(xs).expand([max(a, b) if 1 in (a, b) else b for a, b in zip(xs, ds)])


def _clip(node, x, lo=None, hi=None):
    lo = lo if lo is not None else _attr(node, "min")
    hi = hi if hi is not None else _attr(node, "max")
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _variadic(fn: Callable) -> Callable:
    def run(node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


def _softmax(fn: Callable) -> Callable:
    return lambda node, x: fn(x, dim=_axis(_attr(node, "axis", -1), x.dim()))


def _gather(node, x, idx):
    axis = _axis(_attr(node, "axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_elements(node, x, idx):
    axis = _axis(_attr(node, "axis", 0), x.dim())
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx).long())


def _constant_of_shape(node, shape):
    value = _attr(node, "value")
    if value is None:
        return torch.zeros(_ints(shape), dtype=torch.float32)
    arr = value.numpy().reshape(-1)
    return torch.full(_ints(shape), arr[0].item(), dtype=torch.from_numpy(arr).dtype)


def _int_like(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex())


def _div(node, a, b):
    if _int_like(a) and _int_like(b):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


_OPS: dict[str, Callable] = {
    "Identity": lambda n, x: x, "Dropout": lambda n, x, *r: x,
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b, "Div": _div,
    "Pow": lambda n, a, b: torch.pow(a, b), "Sqrt": lambda n, x: torch.sqrt(x), "Exp": lambda n, x: torch.exp(x),
    "Log": lambda n, x: torch.log(x), "Neg": lambda n, x: -x, "Abs": lambda n, x: torch.abs(x),
    "Reciprocal": lambda n, x: 1.0 / x, "Erf": lambda n, x: torch.erf(x), "Tanh": lambda n, x: torch.tanh(x),
    "Sigmoid": lambda n, x: torch.sigmoid(x), "Relu": lambda n, x: F.relu(x), "Floor": lambda n, x: torch.floor(x),
    "Ceil": lambda n, x: torch.ceil(x), "Sin": lambda n, x: torch.sin(x), "Cos": lambda n, x: torch.cos(x),
    "Gelu": lambda n, x: F.gelu(x, approximate=_attr(n, "approximate", "none")),
    "HardSigmoid": lambda n, x: torch.clamp(_attr(n, "alpha", 0.2) * x + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: F.hardswish(x), "LeakyRelu": lambda n, x: F.leaky_relu(x, _attr(n, "alpha", 0.01)),
    "Softplus": lambda n, x: F.softplus(x), "Mish": lambda n, x: F.mish(x),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "MatMul": lambda n, a, b: a @ b, "Gemm": _gemm, "Conv": _conv,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "LayerNormalization": _layer_norm, "RMSNormalization": _rms_norm, "SimplifiedLayerNormalization": _rms_norm,
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda n, x: x.mean(list(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(list(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce(lambda x, d, k: x.mean(d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k)),
    "ReduceSumSquare": _reduce(lambda x, d, k: (x * x).sum(d, keepdim=k)),
    "Reshape": _reshape, "Flatten": lambda n, x: x.reshape(
        int(np.prod(x.shape[:_axis(_attr(n, "axis", 1), x.dim())])), -1),
    "Transpose": lambda n, x: x.permute(_attr(n, "perm") or list(reversed(range(x.dim())))),
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Expand": _expand,
    "Concat": lambda n, *xs: torch.cat(xs, dim=_axis(_attr(n, "axis"), xs[0].dim())),
    "Split": _split, "Slice": _slice,
    "Gather": _gather,
    "GatherND": _gather_nd, "GatherElements": _gather_elements,
    "Shape": lambda n, x: torch.tensor(list(x.shape)[_attr(n, "start", 0):_attr(n, "end", None)], dtype=torch.int64),
    "Size": lambda n, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Cast": lambda n, x: x.to(_torch_dtype(_attr(n, "to"))),
    "CastLike": lambda n, x, like: x.to(like.dtype),
    "Where": lambda n, c, a, b: torch.where(c.bool(), a, b),
    "Equal": lambda n, a, b: a == b, "Greater": lambda n, a, b: a > b, "Less": lambda n, a, b: a < b,
    "GreaterOrEqual": lambda n, a, b: a >= b, "LessOrEqual": lambda n, a, b: a <= b,
    "And": lambda n, a, b: a & b, "Or": lambda n, a, b: a | b, "Not": lambda n, x: ~x,
    "Range": lambda n, s, e, d: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype),
    "ConstantOfShape": _constant_of_shape,
    "Clip": _clip, "Tile": lambda n, x, r: x.repeat(_ints(r)),
    "Trilu": lambda n, x, k=None: (torch.triu if _attr(n, "upper", 1) else torch.tril)(x, 0 if k is None else int(k)),
    "CumSum": lambda n, x, a: torch.cumsum(x, _axis(int(a), x.dim())),
    "Einsum": lambda n, *xs: torch.einsum(_attr(n, "equation"), *xs),
    "IsNaN": lambda n, x: torch.isnan(x), "Sign": lambda n, x: torch.sign(x),
    "Mod": lambda n, a, b: torch.fmod(a, b) if _attr(n, "fmod", 0) else torch.remainder(a, b),
}


def unsupported(model: ir.Model) -> list[str]:
    """Why ``model`` cannot be run here: one line per unsupported op type or subgraph (empty when it can)."""
    from graphprune.ops import DOMAIN, REGISTRY

    out: dict[str, str] = {}
    for node in model.graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            out.setdefault(node.op_type, f"{node.op_type} (has subgraphs)")
        elif node.domain == DOMAIN:
            if node.op_type not in REGISTRY:
                out.setdefault(node.op_type, f"{DOMAIN}.{node.op_type}")
        elif node.domain not in ("", "ai.onnx") or (node.op_type not in _OPS and node.op_type != "Constant"):
            out.setdefault(node.op_type, f"{node.domain or 'ai.onnx'}.{node.op_type}")
    return sorted(out.values())


def _custom(node: ir.Node) -> Callable:
    from array_api_compat import torch as xp

    from graphprune.ops import REGISTRY

    spec = REGISTRY[node.op_type]
    attrs = {k: a.value for k, a in node.attributes.items()}

    def run(n, *inputs):
        outs = spec.compute(xp, *inputs, **spec.normalize(**attrs))
        return list(outs)
    return run


class OnnxModule(nn.Module):
    """``model``'s main graph as a module: ``forward(*inputs)`` in graph-input order returns the outputs' tensors.

    ``trainable(value)`` picks which floating-point initializers become parameters (default: those that feed a
    weighted layer, listed in ``_WEIGHTED``, with more than one element); the others, and every integer one, are
    constants. The module reads the initializers when built; later edits to ``model`` do not reach it.
    """

    def __init__(self, model: ir.Model, trainable: Callable[[ir.Value], bool] | None = None) -> None:
        super().__init__()
        from graphprune.ops import DOMAIN

        bad = unsupported(model)
        if bad:
            raise ValueError(f"training runs standard ONNX ops only; this model has {', '.join(bad[:6])}"
                              + (f" and {len(bad) - 6} more" if len(bad) > 6 else ""))
        self.params = nn.ParameterDict()
        self._const: dict[int, torch.Tensor] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._names: dict[str, ir.Value] = {}
        pick = trainable or _default_trainable
        for i, v in enumerate(v for v in model.graph.initializers.values() if v.const_value is not None):
            arr = v.const_value.numpy()
            if np.issubdtype(arr.dtype, np.floating) and arr.size > 1 and pick(v):
                key = f"p{i}"
                self.params[key] = nn.Parameter(torch.from_numpy(np.array(arr, dtype=np.float32)))
                self._dtypes[key] = arr.dtype
                self._names[key] = v
            else:
                self._const[id(v)] = torch.from_numpy(np.array(arr))
        self._run: list[tuple[ir.Node, Callable]] = []
        for node in model.graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self._const[id(node.outputs[0])] = torch.from_numpy(np.array(ir.convenience.get_const_tensor(node.outputs[0]).numpy()))
                continue
            self._run.append((node, _custom(node) if node.domain == DOMAIN else _OPS[node.op_type]))
        trained = {id(v) for v in self._names.values()}
        self._inputs = [v for v in model.graph.inputs if id(v) not in trained and id(v) not in self._const]
        self._outputs = list(model.graph.outputs)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self._inputs]

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env: dict[int, torch.Tensor] = dict(self._const)
        env.update({id(v): self.params[k] for k, v in self._names.items()})
        for v, x in zip(self._inputs, inputs):
            env[id(v)] = x
        for node, fn in self._run:
            args = [None if v is None else env[id(v)] for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            out = fn(node, *args)
            outs = out if isinstance(out, (list, tuple)) else [out]
            for v, t in zip(node.outputs, outs):
                env[id(v)] = t
        return [env[id(v)] for v in self._outputs]

    def run_feed(self, feed: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        """``forward`` on a feed dict (name → array)."""
        return self(*[torch.from_numpy(np.asarray(feed[v.name])) for v in self._inputs])

    def write_back(self) -> list[str]:
        """Copy the parameters into the model's initializers (in their original dtype); returns their names."""
        names = []
        for key, v in self._names.items():
            arr = self.params[key].detach().cpu().numpy().astype(self._dtypes[key])
            v.const_value = ir.tensor(arr, name=v.name)
            names.append(v.name)
        return names

    def trained(self) -> Sequence[nn.Parameter]:
        return list(self.params.values())


def _default_trainable(value: ir.Value) -> bool:
    return any(u.op_type in _WEIGHTED and u.domain in ("", "ai.onnx") for u, _ in value.uses())
