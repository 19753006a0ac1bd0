"""Where the token count is written into the graph downstream of a stream value (for ``token_drop``). Changes
nothing.

``token_sites(start)`` walks every node that (transitively) consumes ``start`` and reports, in walk order, each
standard-op input that may hard-code the token count:
  1. :class:`ShapeConstant`: a constant ``Reshape`` / ``Expand`` target (dynamo writes ``[-1, N, 3, H, D]``) or
     constant ``Slice`` ends (positional slices ``x[:, a:N]``);
  2. :class:`ConcatShape`: a ``Reshape`` / ``Expand`` target built by ``Concat`` of pieces, some of them constants;
  3. :class:`SizeConstant`: an integer constant input of an op that takes sizes (``Split``, ``Tile``,
     ``ConstantOfShape``, ``Range``, ``Pad``, ``Resize``, ``OneHot``, ``TopK``);
  4. :class:`UpstreamShape`: a target computed upstream of ``start`` by something else than a ``Concat`` or
     ``Shape`` of downstream values; nothing can be rewritten there.
A target computed downstream, a graph input, or one computed only from ``Shape`` of downstream values and
constants follows the reduced tokens at run time and is not reported. ``weight_dims`` are the dimensions of the
weights the downstream ``MatMul`` / ``Gemm`` / ``Conv`` nodes use: a token count equal to one cannot be told apart.
Which sites hold the count, and whether that can be rewritten, is the pass's decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis import vocab

#: Ops whose integer constant inputs are sizes.
SIZE_OPS = frozenset({"Split", "Tile", "ConstantOfShape", "Range", "Pad", "Resize", "OneHot", "TopK"})


@dataclasses.dataclass(frozen=True)
class ShapeConstant:
    """Input ``input_index`` of ``node`` is the constant ``array``: a target shape (``kind`` ``shape``, or
    ``expand``, whose entries may repeat the count) or ``Slice`` ends (``ends``)."""

    node: ir.Node
    input_index: int
    array: np.ndarray
    kind: Literal["shape", "expand", "ends"]


@dataclasses.dataclass(frozen=True)
class ConcatShape:
    """Input ``input_index`` of ``node`` is a target shape built by ``concat``; ``pieces`` are its inputs, each
    with its constant value (``None`` when computed)."""

    node: ir.Node
    input_index: int
    concat: ir.Node
    pieces: tuple[tuple[ir.Value, np.ndarray | None], ...]


@dataclasses.dataclass(frozen=True)
class SizeConstant:
    """An integer constant input of a size-taking op (``split``: the sizes of a ``Split``, which add up)."""

    node: ir.Node
    array: np.ndarray
    split: bool


@dataclasses.dataclass(frozen=True)
class UpstreamShape:
    """Input ``input_index`` of ``node`` is a target shape that ``producer`` computes upstream of the stream."""

    node: ir.Node
    input_index: int
    producer: ir.Node


Site = ShapeConstant | ConcatShape | SizeConstant | UpstreamShape


@dataclasses.dataclass
class TokenSites:
    nodes: list[ir.Node]  # every node downstream of the start value
    sites: list[Site]
    weight_dims: set[int]


def downstream_nodes(start: ir.Value) -> list[ir.Node]:
    """Nodes that (transitively) consume ``start``."""
    seen: dict[int, ir.Node] = {}
    stack = [start]
    while stack:
        v = stack.pop()
        for user, _ in v.uses():
            if id(user) not in seen:
                seen[id(user)] = user
                stack.extend(user.outputs)
    return list(seen.values())


def _from_downstream_shapes(node: ir.Node, down: set[int]) -> bool:
    """True when ``node`` computes from ``Shape`` of downstream values and constants only."""
    stack, steps = [node], 0
    while stack and steps < 64:
        n = stack.pop()
        steps += 1
        if id(n) in down or (n.op_type == "Constant" and n.domain == ""):
            continue
        for v in n.inputs:
            if v is None or const_value(v) is not None:
                continue
            p = v.producer()
            if p is None:
                return False
            stack.append(p)
    return not stack


def _shape_site(node: ir.Node, i: int, down: set[int]) -> Site | None:
    val = node.inputs[i]
    arr = const_value(val)
    if arr is not None:
        return ShapeConstant(node, i, np.asarray(arr), "expand" if node.op_type == "Expand" else "shape")
    prod = val.producer()
    if prod is None or id(prod) in down:
        return None  # a graph input or computed from reduced values: already right
    if prod.op_type == "Concat" and prod.domain == "":
        pieces = tuple((p, None if (c := const_value(p)) is None else np.asarray(c)) for p in prod.inputs)
        return ConcatShape(node, i, prod, pieces)
    if _from_downstream_shapes(prod, down):
        return None
    return UpstreamShape(node, i, prod)


def weight_dims(nodes: Iterable[ir.Node]) -> set[int]:
    """Dimensions of the weight initializers (rank ≥ 2) that ``MatMul`` / ``Gemm`` / ``Conv`` nodes use."""
    dims: set[int] = set()
    for n in nodes:
        if n.domain != "" or n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        for v in n.inputs:
            if v is not None and v.const_value is not None and len(v.const_value.shape) >= 2:
                dims.update(int(d) for d in v.const_value.shape.numpy())
    return dims


def token_sites(start: ir.Value) -> TokenSites:
    """Every place downstream of ``start`` that may hard-code the token count (see the module docstring)."""
    nodes = downstream_nodes(start)
    down = {id(n) for n in nodes}
    sites: list[Site] = []
    for node in nodes:
        if node.domain != "":
            continue
        site: Site | None = None
        if node.op_type in ("Reshape", "Expand") and len(node.inputs) > 1:
            site = _shape_site(node, 1, down)
        elif node.op_type == "Slice":
            ends = const_value(node.inputs[2]) if len(node.inputs) > 2 else None
            site = None if ends is None else ShapeConstant(node, 2, np.asarray(ends), "ends")
        elif node.op_type in SIZE_OPS:
            for v in node.inputs[1:]:
                arr = const_value(v)
                if arr is not None and np.issubdtype(np.asarray(arr).dtype, np.integer):
                    sites.append(SizeConstant(node, np.asarray(arr), node.op_type == "Split"))
        if site is not None:
            sites.append(site)
    return TokenSites(nodes, sites, weight_dims(nodes))


# -- op facts the token passes consume (op types are matched here, not in passes/) ------------------------------
#: Shape arithmetic that carries the token count from a ``Shape`` to a downstream reader (cloned by the dynamic
#: token rewrite when the count changes).
SHAPE_OPS = frozenset({"Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Cast", "Add", "Sub", "Mul", "Div",
                       "Reshape", "Identity", "Max", "Min", "Neg", "Abs", "Equal", "Where", "Mod", "ReduceProd",
                       "ReduceSum", "Flatten"})
_GATHERS = frozenset({"Gather", "GatherND", "GatherElements"})


def _std(node: ir.Node | None, *types: str) -> bool:
    return node is not None and node.domain == "" and node.op_type in types


def is_broadcasting(node: ir.Node | None) -> bool:
    """A standard elementwise op whose inputs broadcast against each other (``vocab.BROADCASTING``)."""
    return vocab.is_broadcasting(node)


_TOKEN_COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MatMulInteger",
                            "QLinearMatMul"})


def is_token_compute(node: ir.Node | None) -> bool:
    """A node whose cost grows with the tokens it reads: a standard matrix product, convolution or attention, or a
    graphprune op (attention, token reduction)."""
    return node is not None and (_std(node, *_TOKEN_COMPUTE) or node.domain == "ai.graphprune")


def is_shape(node: ir.Node | None) -> bool:
    """A standard ``Shape`` node (its output follows the tensor it reads at run time)."""
    return _std(node, "Shape")


def is_shape_arith(node: ir.Node | None) -> bool:
    """A standard op of :data:`SHAPE_OPS`: shape arithmetic the dynamic token rewrite can clone."""
    return _std(node, *SHAPE_OPS)


def is_reshape(node: ir.Node | None) -> bool:
    return _std(node, "Reshape")


def is_matmul(node: ir.Node | None) -> bool:
    return _std(node, "MatMul")


def is_gather(node: ir.Node | None) -> bool:
    """A standard gather (``Gather`` / ``GatherND`` / ``GatherElements``) with its data and index inputs."""
    return _std(node, *_GATHERS) and len(node.inputs) >= 2


def is_stream_add(node: ir.Node | None) -> bool:
    """A standard ``Add`` of two computed tensors (no constant input): a residual connection, not a bias."""
    return _std(node, "Add") and all(const_value(x) is None for x in node.inputs)


def same_op(a: ir.Node | None, b: ir.Node | None) -> bool:
    """``a`` and ``b`` are the same operator (type and domain)."""
    return a is not None and b is not None and (a.domain, a.op_type) == (b.domain, b.op_type)


__all__ = ["SHAPE_OPS", "ConcatShape", "ShapeConstant", "Site", "SizeConstant", "TokenSites", "UpstreamShape",
           "downstream_nodes", "is_broadcasting", "is_gather", "is_matmul", "is_reshape", "is_shape", "is_shape_arith",
           "is_stream_add", "is_token_compute", "same_op", "token_sites", "weight_dims"]
