"""The op vocabulary: named groups of standard ONNX ops, and predicates that check the domain. Changes nothing.

Every module of ``analysis`` that asks "what kind of op is this" asks here, so a group has one set of members:
  * ``UNARY_MATH``: one-input elementwise ops that compute (activations, ``Sqrt``, ``Exp``, ``Not``, ...);
  * ``VALUE_PRESERVING``: one-input ops that pass values on (``Identity``, ``Cast``, ``CastLike``, ``Dropout``);
  * ``UNARY`` = both; ``BROADCASTING``: n-input elementwise ops whose inputs broadcast against each other;
  * ``ELEMENTWISE`` = ``UNARY_MATH`` | ``BROADCASTING`` (the ops that cost one operation per output element);
    ``ARITHMETIC``: the four arithmetic ops (a bias or a scale by a constant);
  * ``REDUCE`` (``Reduce*``, ``ArgMax``/``ArgMin``), ``POOL`` (windowed) and ``GLOBAL_POOL``; ``NORMALIZE``
    (ops normalising over an axis: ``Softmax``, the norms);
  * ``MOVEMENT``: ops that move elements without computing (the index-tracing interpreter's vocabulary,
    :mod:`graphprune.analysis._index_trace`); ``SHAPE``: ops that read only a tensor's shape.
The predicates (``is_unary``, ``is_broadcasting``, ...) are true only for the standard domain (``""`` or
``ai.onnx``): a custom-domain op of the same name is none of these.
"""

from __future__ import annotations

import onnx_ir as ir

STANDARD = frozenset({"", "ai.onnx"})

UNARY_MATH = frozenset({
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Clip", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu",
    "Softplus", "Softsign", "Mish", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Sin", "Cos", "Floor", "Ceil",
    "Round", "Sign", "IsNaN", "IsInf", "Not", "Swish", "ThresholdedRelu",
})
VALUE_PRESERVING = frozenset({"Identity", "Cast", "CastLike", "Dropout"})
UNARY = UNARY_MATH | VALUE_PRESERVING
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
                          "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift"})
ELEMENTWISE = UNARY_MATH | BROADCASTING
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})  # a bias, a scale: elementwise with a constant operand
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
                    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin"})
POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
NORMALIZE = frozenset({"LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax",
                       "RMSNormalization"})
SHAPE = frozenset({"Shape", "Size"})
MOVEMENT = frozenset({"Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Gather", "Split", "Concat", "Expand",
                      "Tile", "Flatten", "Identity", "Cast", "Dropout", "Pad"})

__all__ = ["ARITHMETIC", "BROADCASTING", "ELEMENTWISE", "GLOBAL_POOL", "MOVEMENT", "NORMALIZE", "POOL", "REDUCE", "SHAPE", "STANDARD",
           "UNARY", "UNARY_MATH", "VALUE_PRESERVING", "in_group", "is_broadcasting", "is_conv", "is_elementwise", "is_movement",
           "is_reduce", "is_standard", "is_unary"]


def is_standard(node: ir.Node | None, *op_types: str) -> bool:
    """A standard-domain node (of one of ``op_types`` when given)."""
    return node is not None and node.domain in STANDARD and (not op_types or node.op_type in op_types)


def in_group(node: ir.Node | None, group: frozenset[str]) -> bool:
    """A standard-domain node whose op is in ``group``."""
    return node is not None and node.domain in STANDARD and node.op_type in group


def is_unary(node: ir.Node | None) -> bool:
    return in_group(node, UNARY)


def is_broadcasting(node: ir.Node | None) -> bool:
    """A standard elementwise op whose inputs broadcast against each other (a constant operand lines up with the
    data's axes from the right)."""
    return in_group(node, BROADCASTING)


def is_elementwise(node: ir.Node | None) -> bool:
    return in_group(node, ELEMENTWISE)


def is_reduce(node: ir.Node | None) -> bool:
    return in_group(node, REDUCE)


def is_conv(node: ir.Node | None) -> bool:
    """A standard ``Conv`` or ``ConvTranspose`` (channels on axis 1 of its input)."""
    return is_standard(node, "Conv", "ConvTranspose")


def is_movement(node: ir.Node | None) -> bool:
    return in_group(node, MOVEMENT)
