"""Consumer layers as linear maps of single positions, y = x·W (+ b), for the least-squares refit. Changes nothing.

``linear_map(member)`` reads the layer that a channel-consumer :class:`~graphprune.analysis.channels.Member`
belongs to:
  1. ``MatMul`` with a 2-D constant weight (channels on the last axis); its bias is the constant of the single
     ``Add`` after it, when that has one entry per output;
  2. ``Gemm`` with ``transA = 0`` (``transB`` either way) and its bias input;
  3. ``Conv`` 1×1, group 1, no padding; stride s reads ``x[:, :, ::s, ::s]``; its bias input.
Anything else is not a linear map of single positions: the result is then the reason, as a string.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value
from graphprune.analysis.channels import Member


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """``node`` computes y = x·W (+ b) at every position. ``weight`` is W as [K, N] (K: input channels);
    ``layout`` is how the node stores it (``kn``: MatMul, Gemm; ``nk``: Gemm with ``transB``; ``conv1x1``:
    [N, K, 1, 1]). ``bias`` is the constant b when there is one to shift, read as input ``bias_index`` of
    ``bias_node`` (the layer itself, or the ``Add`` after a MatMul)."""

    node: ir.Node
    weight: np.ndarray
    layout: Literal["kn", "nk", "conv1x1"]
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None
    bias_index: int | None = None
    strides: tuple[int, int] = (1, 1)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The layer's input activations ``x`` as [positions, K]."""
        if self.layout == "conv1x1":
            s = self.strides
            x = np.moveaxis(x[:, :, :: s[0], :: s[1]], 1, -1)
        return x.reshape(-1, x.shape[-1])

    def stored(self, w: np.ndarray) -> np.ndarray:
        """A [K, N] weight in the layout the node stores it."""
        if self.layout == "kn":
            return w
        if self.layout == "nk":
            return w.T
        return w.T[:, :, None, None]


def _bias_input(node: ir.Node, n_out: int) -> ir.Value | None:
    b = node.inputs[2] if len(node.inputs) > 2 else None
    c = const_value(b)
    return b if c is not None and c.shape == (n_out,) else None


def linear_map(m: Member) -> LinearMap | str:
    """The layer of consumer member ``m`` as a :class:`LinearMap`, or the reason it is not one."""
    node = m.node
    w = const_value(m.value)
    op = node.op_type if node.domain == "" else f"{node.domain}::{node.op_type}"
    if op == "MatMul" and w is not None and w.ndim == 2:
        users = [u for u, _ in node.outputs[0].uses()]
        if len(users) == 1 and users[0].op_type == "Add" and users[0].domain == "":
            add = users[0]
            j = 1 if add.inputs[0] is node.outputs[0] else 0
            b = const_value(add.inputs[j])
            if b is not None and b.shape == (w.shape[1],):
                return LinearMap(node, w, "kn", add.inputs[j], add, j)
        return LinearMap(node, w, "kn")
    if op == "Gemm" and w is not None and not node.attributes.get_int("transA", 0):
        trans_b = bool(node.attributes.get_int("transB", 0))
        wk = w.T if trans_b else w
        bias = _bias_input(node, wk.shape[1])
        return LinearMap(node, wk, "nk" if trans_b else "kn", bias, node if bias is not None else None,
                         2 if bias is not None else None)
    if (op == "Conv" and w is not None and w.ndim == 4 and w.shape[2:] == (1, 1)
            and node.attributes.get_int("group", 1) == 1):
        if any(node.attributes.get_ints("pads", [0]) or [0]):
            return "1×1 Conv with padding"
        bias = node.inputs[2] if len(node.inputs) > 2 and const_value(node.inputs[2]) is not None else None
        strides = list(node.attributes.get_ints("strides", [1, 1]) or [1, 1])
        return LinearMap(node, w[:, :, 0, 0].T, "conv1x1", bias, node if bias is not None else None,
                         2 if bias is not None else None, (int(strides[0]), int(strides[1])))
    return f"{op} {'k×k' if op == 'Conv' else ''} consumer is not a linear map of single positions".replace("  ", " ")


__all__ = ["LinearMap", "linear_map"]
