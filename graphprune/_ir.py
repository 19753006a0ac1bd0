"""Small helpers over onnx-ir that analysis, passes and backends share: constants, dims, additive masks, names.

  * ``const_value``: the numpy value of an initializer or ``Constant`` output (``onnx_ir.convenience.get_const_tensor``);
    ``constant_node``: the ``Constant`` node behind a value;
  * ``rank`` / ``dim``: static facts of a value's shape (``None`` when unknown or symbolic);
  * ``mask_min`` / ``additive_mask``: the one bool → additive mask convention: 0 where the mask is True (attend),
    ``finfo(dtype).min`` where it is False. A finite minimum, not -inf, so that a fully masked row softmaxes to a
    uniform row instead of NaN (which would leak into every row of the next layer through 0·NaN);
  * ``NameScope``: unique names for values a rewrite adds (initializers included);
  * ``infer_shapes``: ONNX shape inference written back into the model (it mutates, so it is not in ``analysis``);
    ``input_symbols`` / ``symbol_hint``: what of a shape to keep when a rewrite re-infers it (the inputs' dim names);
  * ``unmap``: close the memory map of an external tensor after reading it.

Op-type strings do not live here, but for ``Constant`` (how ONNX spells a constant, which ``const_value`` reads):
matching graph patterns belongs to ``analysis``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir import tape as _tape
from onnx_ir.passes.common import ShapeInferencePass


def const_value(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant value (initializer or standard ``Constant`` output), else ``None``.

    A thin wrapper over :func:`onnx_ir.convenience.get_const_tensor` (``value_float(s)`` become float32,
    ``value_int(s)`` int64); a ``Constant`` it cannot read (a sparse value, an attribute reference, a malformed
    node) is not a constant here.
    """
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    return None if tensor is None else tensor.numpy()


def constant_node(value: ir.Value | None) -> ir.Node | None:
    """The standard ``Constant`` node that produces ``value``, if that is what produces it (``const_value`` reads
    such a value from the node's attribute)."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "Constant" and node.domain == "" else None


def rank(value: ir.Value | None) -> int | None:
    """The rank of ``value``, or ``None`` when its shape is unknown."""
    return len(value.shape) if value is not None and value.shape is not None else None


def dim(value: ir.Value | None, axis: int) -> int | None:
    """The static size of ``axis`` (negative counts from the end), or ``None`` when unknown, symbolic or out of range."""
    if value is None or value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def mask_min(dtype: ir.DataType) -> np.ndarray:
    """The additive value of a masked position for a float ``dtype``: a 0-d array holding ``finfo(dtype).min``."""
    np_dtype = dtype.numpy()
    return np.array(ml_dtypes.finfo(np_dtype).min, dtype=np_dtype)


def additive_mask(tape: _tape.Tape, mask: ir.Value, dtype: ir.DataType) -> ir.Value:
    """``Where(mask, 0, finfo(dtype).min)`` on ``tape``: a bool keep-mask (True: attend) as an additive bias."""
    zero = tape.op("Constant", [], {"value": ir.tensor(np.zeros((), dtype=dtype.numpy()))})
    low = tape.op("Constant", [], {"value": ir.tensor(mask_min(dtype))})
    return tape.op("Where", [mask, zero, low])


class NameScope:
    """The value names in use in a graph (inputs, initializers, node outputs), for naming new values uniquely.

    Build one per rewrite and ask it for every name the rewrite adds: ``fresh(base)`` is ``base`` when that is free,
    else ``base_1``, ``base_2``, ...; the name returned counts as taken from then on.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.taken: set[str] = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        self.taken.update(o.name for node in graph for o in node.outputs if o.name)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray, register: bool = True) -> ir.Value:
        """A constant value holding ``array`` under a fresh name; registered as an initializer unless ``register``
        is false (the caller registers it when the rewrite is applied)."""
        name = self.fresh(base)
        array = np.asarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        if register:
            self.graph.register_initializer(value)
        return value


def unmap(tensor: ir.TensorProtocol | None) -> None:
    """Close the memory map of a tensor read from external data (it reopens on the next read), so that pages read
    once (scored, sliced, written) stop counting in this process. A map an array still views stays open."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass


def infer_shapes(model: ir.Model) -> ir.Model:
    """Run ONNX shape inference (with data propagation) in place; a failure leaves shapes as they were."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return model


def input_symbols(model: ir.Model) -> set[str]:
    """The names of the graph inputs' symbolic dims (``batch``, ``sequence``)."""
    return {d.value for v in model.graph.inputs if v.shape is not None for d in v.shape
            if isinstance(d, ir.SymbolicDim) and d.value}


def symbol_hint(shape: ir.Shape | None, symbols: set[str]) -> ir.Shape | None:
    """``shape`` with only the dims named by ``symbols`` kept, every other dim unknown; ``None`` where it has none
    of them (a static shape is cleared altogether, as before this hint existed).

    What a rewrite that changes static sizes (a channel prune) leaves on a value before :func:`infer_shapes` runs
    again. Cleared to nothing, ONNX inference names every axis it cannot follow through an op (a Reshape whose
    target is computed from ``Shape``, for one) with a fresh symbol (``unk__12``), a different one per value: the
    queries' and the keys' sequence axes stop comparing equal and ``token_drop`` refuses every block. Inference keeps
    a dim name it finds on a value (and fills a static size over an unknown dim), and the size of an axis named by
    an input's dim comes from the inputs, not from the weights, so such a name stays true through the rewrite.
    Static sizes are dropped (the rewrite may have changed them), and so are other names: an expression such as
    ``4*sequence`` may count pruned channels, and an ``unk__N`` of an earlier inference names nothing.
    """
    if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in symbols for d in shape):
        return None
    return ir.Shape([d if isinstance(d, ir.SymbolicDim) and d.value in symbols else None for d in shape])


__all__ = ["NameScope", "additive_mask", "const_value", "constant_node", "dim", "infer_shapes", "input_symbols",
           "mask_min", "rank", "symbol_hint", "unmap"]
