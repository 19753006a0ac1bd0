"""FLOPs and parameter counts, per node and per model. A multiply-add counts as 2 FLOPs.

Rules: MatMul/Gemm (2·M·N·K), Conv (grouped: 2·out·Cin/g·k), ConvTranspose, the standard ``Attention`` op and
com.microsoft ``Attention``/``MultiHeadAttention`` (projections + 4·B·H·N·M·D + softmax), LayerNorm/GroupNorm/
InstanceNorm (5/elem), Softmax (5/elem), BatchNormalization (2/elem), pooling (kernel·out), reductions (in),
elementwise ops (1/elem of the output). Shape-only ops (Reshape, Transpose, Gather, Concat, ...) are free.
``ai.graphprune`` ops use their definition's FLOPs function (``OpDef.flops``), fed the concrete input shapes at
the counted batch.

Shapes come from ONNX shape inference at a fixed input size (batch 1 by default), or from the caller
(``shapes``: e.g. completed with shapes measured in ONNX Runtime by ``graphprune.backends.onnxruntime.measure_flops``;
nothing here runs a model). Nodes whose shapes stay unknown are listed in ``FlopsReport.unknown`` rather than
silently counted as zero.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from graphprune.analysis import vocab
from graphprune.analysis.shapes import concrete_shapes, input_dims
from graphprune.ops import DOMAIN, REGISTRY

_ELEMENTWISE = vocab.ELEMENTWISE
_NORM5 = {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax",
          "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization"}
_REDUCE = vocab.REDUCE | vocab.GLOBAL_POOL | {"TopK"}


@dataclasses.dataclass
class FlopsReport:
    flops: int
    params: int
    per_node: dict[str, int]
    unknown: list[str]

    def to_dict(self) -> dict:
        return {"flops": self.flops, "params": self.params, "unknown_nodes": len(self.unknown)}


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return int(math.prod(shape))


def _node_flops(node: ir.Node, shp) -> int | None:  # noqa: C901 - a flat table of rules
    op = node.op_type
    ins = [shp(v) for v in node.inputs]
    outs = [shp(v) for v in node.outputs]
    out = outs[0] if outs else None
    if node.domain == DOMAIN:
        spec = REGISTRY.get(op)
        return spec.node_flops(node, shp) if spec is not None else None
    if op == "MatMul":
        if ins[0] is None or _numel(out) is None or not ins[0]:
            return None
        return 2 * _numel(out) * ins[0][-1]
    if op == "Gemm":
        if ins[0] is None or _numel(out) is None:
            return None
        k = ins[0][0] if node.attributes.get_int("transA", 0) else ins[0][-1]
        return 2 * _numel(out) * k + (_numel(out) if len(node.inputs) > 2 else 0)
    if op in ("Conv", "ConvTranspose"):
        w = ins[1]
        if w is None or _numel(out) is None:
            return None
        k = math.prod(w[2:])
        if op == "Conv":
            return 2 * _numel(out) * w[1] * k + (_numel(out) if len(node.inputs) > 2 else 0)
        x = _numel(ins[0])
        return None if x is None else 2 * x * w[1] * k  # weight [Cin, Cout/g, k...]
    if op == "Attention" and node.domain == "":
        q, k = ins[0], ins[1]
        if q is None or k is None:
            return None
        if len(q) == 4:
            b, h, n, d = q
            m = k[2]
            dv = ins[2][3] if ins[2] is not None else d
        else:
            heads = node.attributes.get_int("q_num_heads", 1)
            b, n, hd = q
            h, d, m = heads, hd // heads, k[1]
            dv = d
        return 2 * b * h * n * m * (d + dv) + 5 * b * h * n * m
    if node.domain == "com.microsoft" and op in ("Attention", "MultiHeadAttention"):
        heads = node.attributes.get_int("num_heads", 1)
        x = ins[0]
        if x is None:
            return None
        b, n, c = x
        proj = 2 * b * n * c * ins[1][1] if (op == "Attention" and ins[1] is not None) else 0
        hidden = ins[1][1] // 3 if (op == "Attention" and ins[1] is not None) else c
        m = n if op == "Attention" or ins[1] is None else ins[1][1]
        return proj + 4 * b * heads * n * m * (hidden // heads) + 5 * b * heads * n * m
    if op in _NORM5:
        e = _numel(out)
        return None if e is None else 5 * e
    if op == "BatchNormalization":
        e = _numel(out)
        return None if e is None else 2 * e
    if op in vocab.POOL:
        e = _numel(out)
        ks = node.attributes.get_ints("kernel_shape", [1])
        return None if e is None else e * math.prod(ks)
    if op in _REDUCE:
        e = _numel(ins[0])
        return None if e is None else e
    if op in _ELEMENTWISE:
        e = _numel(out)
        return None if e is None else e
    return 0


def count_params(model: ir.Model) -> int:
    """Elements of floating-point initializers (each tensor once, however many users)."""
    total = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is not None and t.dtype.is_floating_point():
            total += int(np.prod(t.shape.numpy())) if len(t.shape) else 1
    return total


def _node_flops_safe(node: ir.Node, shp) -> int | None:
    """``_node_flops``, or ``None`` when a dimension it needs is unknown (symbolic dims are strings)."""
    try:
        f = _node_flops(node, shp)
    except (TypeError, IndexError, ValueError):
        return None
    return int(f) if isinstance(f, (int, np.integer)) else None


def static_shapes(model: ir.Model, batch: int = 1, dims: dict[str, int] | None = None) -> dict[str, tuple]:
    """Shapes of every value from ONNX shape inference at a fixed input size (see ``count_flops``)."""
    return concrete_shapes(model, input_dims(model, batch=batch, dims=dims))


def unresolved_values(model: ir.Model, shapes: dict[str, tuple]) -> list[ir.Value]:
    """The typed, non-constant values of the main graph whose shape ``shapes`` leaves unknown or symbolic: what a
    caller measures (``graphprune.backends.onnxruntime.measure_flops``) when static inference stops."""
    wanted: dict[ir.Value, None] = {}
    for node in model.graph:
        for v in (*node.inputs, *node.outputs):
            if v is None or v in wanted or v.dtype is None or v.is_initializer():
                continue
            s = shapes.get(v.name)
            if s is None or any(not isinstance(d, int) for d in s):
                wanted[v] = None
    return list(wanted)


def count_flops(model: ir.Model, batch: int = 1, dims: dict[str, int] | None = None,
                shapes: dict[str, tuple] | None = None) -> FlopsReport:
    """FLOPs of one forward pass at ``batch`` (symbolic non-batch axes from ``dims`` or 32).

    ``shapes`` (value name → shape) replaces static shape inference, e.g. ``static_shapes`` completed with shapes
    measured in a run (``graphprune.backends.onnxruntime.measure_flops`` does that). Nodes whose shapes stay
    unknown are listed in ``unknown``. Runs nothing and changes nothing.
    """
    if shapes is None:
        shapes = static_shapes(model, batch, dims)

    def shp(value: ir.Value | None):
        if value is None:
            return None
        s = shapes.get(value.name)
        if s is None and value.shape is not None:
            s = tuple(value.shape)
        return s

    per_node: dict[str, int] = {}
    unknown: list[str] = []
    for node in model.graph:
        f = _node_flops_safe(node, shp)
        if f is None:
            unknown.append(node.name or node.op_type)
            f = 0
        per_node[node.name or f"{node.op_type}_{len(per_node)}"] = int(f)
    return FlopsReport(int(sum(per_node.values())), count_params(model), per_node, unknown)
