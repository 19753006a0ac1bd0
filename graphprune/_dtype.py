"""bfloat16 models on a backend without bfloat16 kernels: an exact float32 twin to run.

ONNX Runtime's CPU provider implements almost no compute operator for ``tensor(bfloat16)`` (MatMul, Add, Mul, Conv,
Softmax, Where, ... all refuse it; casts, LayerNormalization and data movement run), so a bfloat16 model cannot be
verified or calibrated there at its own dtype. :func:`upcast_bfloat16` rewrites a model in place so that every
bfloat16 tensor is float32: value types, initializers (converted lazily, one tensor at a time when the model is
serialised or saved; bfloat16 → float32 is exact), tensor attributes (``Constant``, ``ConstantOfShape``), and the
``to`` / ``dtype`` attributes that name bfloat16 (``Cast``, ``EyeLike``, ``Random*``), in the main graph, every
subgraph and every model-local function (the ai.graphprune op bodies). Verification asks for ``round_outputs``:
every op's output is rounded back to bfloat16 where it is produced, which is what bfloat16 kernels that accumulate
in float32 return, so both models are compared at their own dtype (emulated, and the report says so). Calibration
probes read the plain float32 twin.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["has_bfloat16", "upcast_bfloat16", "BF16_NOTE", "BF16_EMULATED"]

BF16_NOTE = ("emulated bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels, so both models ran in "
             "float32 on their exact float32 weights with every op's output rounded to bfloat16")
#: ``VerifyReport.compute_dtype`` of an emulated run.
BF16_EMULATED = "bfloat16 (emulated: float32 compute, each op's output rounded to bfloat16)"

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


def _bf16_attr(a: ir.Attr) -> str | None:
    """``"tensor"`` for a bfloat16 tensor attribute, ``"dtype"`` for a ``to`` / ``dtype`` naming bfloat16."""
    if a.type == ir.AttributeType.TENSOR and a.value.dtype == _BF16:
        return "tensor"
    if a.name in _DTYPE_ATTRS and a.type == ir.AttributeType.INT and a.value == _BF16.value:
        return "dtype"
    return None


def has_bfloat16(model: ir.Model) -> bool:
    """True when any value, initializer or tensor attribute of ``model`` is bfloat16 (weights are not read)."""
    return any(any(_is_bf16_type(v.type) for v in _values(g)) or
               any(_bf16_attr(a) for node in g for a in node.attributes.values()) for g in _graphs(model))


def _upcast_tensor(t: ir.TensorProtocol) -> ir.TensorProtocol:
    def compute() -> ir.Tensor:
        return ir.tensor(np.asarray(t.numpy()).astype(np.float32), name=t.name)

    return ir.LazyTensor(compute, dtype=_F32, shape=ir.Shape(list(t.shape)), name=t.name)


def upcast_bfloat16(model: ir.Model, round_outputs: bool = False) -> bool:
    """Rewrite ``model`` in place: every bfloat16 tensor becomes float32. Returns whether anything changed.

    ``round_outputs``: also round every main-graph node output that was bfloat16 back to bfloat16 where it is
    produced (``Cast(→bfloat16) → Cast(→float32)``; the rounded value takes over the name and every use, graph
    outputs included), so each op computes in float32 and yields what a bfloat16 kernel that accumulates in float32
    yields: the model at its own dtype, emulated. The ai.graphprune op bodies round only their outputs."""
    rounded = {v for n in model.graph for v in n.outputs if _is_bf16_type(v.type)} if round_outputs else set()
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
                kind = _bf16_attr(a)
                if kind == "tensor":
                    node.attributes[name] = ir.AttrTensor(name, _upcast_tensor(a.value))
                elif kind == "dtype":
                    node.attributes[name] = ir.AttrInt64(name, _F32.value)
                changed = changed or kind is not None
    _round(model.graph, rounded)
    return changed


def _round(graph: ir.Graph, values: set[ir.Value]) -> None:
    for node in list(graph):
        for v in node.outputs:
            if v not in values:
                continue
            name = v.name
            v.name = f"{name}/float32"
            low = ir.Value(name=f"{name}/bfloat16", type=ir.TensorType(_BF16), shape=v.shape)
            back = ir.Value(name=name, type=ir.TensorType(_F32), shape=v.shape)
            v.replace_all_uses_with(back, replace_graph_outputs=True)
            down = ir.Node("", "Cast", [v], attributes=[ir.AttrInt64("to", _BF16.value)], outputs=[low])
            up = ir.Node("", "Cast", [low], attributes=[ir.AttrInt64("to", _F32.value)], outputs=[back])
            graph.insert_after(node, [down, up])
