"""bfloat16 models on a backend without bfloat16 kernels: an exact float32 twin to run.

ONNX Runtime's CPU provider implements almost no operator for ``tensor(bfloat16)`` (MatMul, Add, Conv, Softmax,
Gather, ... all refuse it; only casts, LayerNormalization and data movement run), so a bfloat16 model cannot be
verified or calibrated there at its own dtype. :func:`upcast_bfloat16` rewrites a model in place so that every
bfloat16 tensor is float32: value types, initializers (converted lazily, one tensor at a time when the model is
serialised or saved; bfloat16 → float32 is exact), tensor attributes (``Constant``, ``ConstantOfShape``), and the
``to`` / ``dtype`` attributes that name bfloat16 (``Cast``, ``EyeLike``, ``Random*``), in the main graph, every
subgraph and every model-local function (the ai.graphprune op bodies). The original and the optimized model are
upcast the same way, so a comparison of the twins checks the rewrite; what it does not see is bfloat16 rounding
inside the compute, and the callers say so.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["has_bfloat16", "upcast_bfloat16", "BF16_NOTE"]

BF16_NOTE = ("ran at float32: ONNX Runtime's CPU provider has no bfloat16 kernels, so the bfloat16 weights were "
             "upcast exactly and both models computed in float32 (the check covers the rewrite, not bfloat16 rounding)")

_BF16, _F32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
_DTYPE_ATTRS = {"to", "dtype"}


def _graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    yield model.graph
    yield from model.graph.subgraphs()
    for f in model.functions.values():
        yield f
        yield from f.graph.subgraphs()


def _values(graph: ir.Graph | ir.Function) -> Iterator[ir.Value]:
    yield from graph.inputs
    if isinstance(graph, ir.Graph):
        yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _is_bf16_type(t: ir.TypeProtocol | None) -> bool:
    return t is not None and getattr(t, "dtype", None) == _BF16


def has_bfloat16(model: ir.Model) -> bool:
    """True when any value, initializer or tensor attribute of ``model`` is bfloat16 (weights are not read)."""
    for g in _graphs(model):
        if any(_is_bf16_type(v.type) for v in _values(g)):
            return True
        for node in g:
            for a in node.attributes.values():
                if a.type == ir.AttributeType.TENSOR and a.value.dtype == _BF16:
                    return True
                if a.name in _DTYPE_ATTRS and a.type == ir.AttributeType.INT and a.value == _BF16.value:
                    return True
    return False


def _upcast_tensor(t: ir.TensorProtocol) -> ir.TensorProtocol:
    def compute() -> ir.Tensor:
        return ir.tensor(np.asarray(t.numpy()).astype(np.float32), name=t.name)

    return ir.LazyTensor(compute, dtype=_F32, shape=ir.Shape(list(t.shape)), name=t.name)


def upcast_bfloat16(model: ir.Model) -> bool:
    """Rewrite ``model`` in place: every bfloat16 tensor becomes float32. Returns whether anything changed."""
    changed = False
    for g in _graphs(model):
        for v in _values(g):
            if _is_bf16_type(v.type):
                v.type = ir.TensorType(_F32)
                changed = True
            if v.const_value is not None and v.const_value.dtype == _BF16:
                v.const_value = _upcast_tensor(v.const_value)
                changed = True
        for node in g:
            for name, a in list(node.attributes.items()):
                if a.type == ir.AttributeType.TENSOR and a.value.dtype == _BF16:
                    node.attributes[name] = ir.AttrTensor(name, _upcast_tensor(a.value))
                    changed = True
                elif name in _DTYPE_ATTRS and a.type == ir.AttributeType.INT and a.value == _BF16.value:
                    node.attributes[name] = ir.AttrInt64(name, _F32.value)
                    changed = True
    return changed
