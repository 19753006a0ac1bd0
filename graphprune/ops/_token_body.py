"""Small helpers for writing ``ai.graphprune`` function bodies with :class:`onnx_ir.tape.Tape` (standard ops only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as _tape

from graphprune.ops._base import BODY_OPSET, DOMAIN

INT64_MAX = np.iinfo(np.int64).max


class Body(_tape.Tape):
    """A tape with a ``const`` helper (Constant nodes: function bodies have no initializers)."""

    def const(self, array, dtype=None, name: str | None = None) -> ir.Value:
        arr = np.asarray(array, dtype=dtype)
        return self.op("Constant", [], {"value": ir.tensor(arr, name=name)})

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def dim(self, shape: ir.Value, axis: int) -> ir.Value:
        """``shape[axis:axis+1]`` as a 1-element int64 tensor."""
        return self.op("Slice", [shape, self.ints(axis), self.ints(axis + 1)])

    def slice_tokens(self, x: ir.Value, start: int, axis: int = 1) -> ir.Value:
        return self.op("Slice", [x, self.ints(start), self.ints(INT64_MAX), self.ints(axis)])


def build_function(
    body: Body, name: str, overload: str, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], attrs: dict
) -> ir.Function:
    """Wrap the recorded nodes as a model-local function in ``ai.graphprune``.

    The node's attributes are declared (so a node may carry them for plugins) but the body is specialised:
    it never references them; the ``overload`` key tells specialisations apart.
    """
    graph = ir.Graph(
        inputs=list(inputs), outputs=list(outputs), nodes=body.nodes, opset_imports={"": BODY_OPSET}, name=name
    )
    fattrs = [ir.convenience.convert_attribute(k, v) for k, v in sorted(attrs.items())]
    return ir.Function(DOMAIN, name, overload, graph=graph, attributes=fattrs)


def node_attrs(attrs: dict) -> list[ir.Attr]:
    return [ir.convenience.convert_attribute(k, v) for k, v in sorted(attrs.items())]
