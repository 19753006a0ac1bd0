"""Structural checks on a loaded model: what would make every later step fail, named in one line.

``problems(model)`` returns the reasons (empty when the model is usable); ``io.load_model`` raises the first as a
:class:`~graphprune.errors.ModelLoadError`. Checked, on the main graph (the ONNX checker's rules where they
matter to us, without serialising the weights):

  * IR version and default-domain opset no newer than the installed ``onnx`` knows;
  * every node input is a graph input, an initializer or the output of an *earlier* node (undefined values and
    cycles / unsorted graphs);
  * every op exists: a standard op ``onnx.defs`` knows at the model's opset, an op with a model-local function,
    or a domain ONNX Runtime provides (``com.microsoft``, ``ai.onnx.ml``);
  * no negative dims on inputs, outputs or value infos;
  * inputs and outputs are numeric or bool tensors (no strings, sequences or maps);
  * every stored tensor (initializers, tensor attributes such as ``Constant`` values, in every graph and function)
    has non-negative dims and holds exactly the data its shape and type need: ``raw_data`` bytes, typed-field
    values or external-data length. Only sizes are compared; no weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx
import onnx_ir as ir

#: Domains whose ops come from ONNX Runtime itself rather than from the model.
RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training"}
_NUMERIC = {t for t in ir.DataType if t not in (ir.DataType.UNDEFINED, ir.DataType.STRING)}


def _shape_problem(kind: str, value: ir.Value) -> str | None:
    if value.shape is not None:
        for axis, d in enumerate(value.shape):
            if isinstance(d, int) and d < 0:
                return f"{kind} {value.name!r} has a negative dim ({d}) on axis {axis}"
    return None


def _stored_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """(where, tensor) for every tensor the model stores: initializers and tensor-valued attributes."""
    graphs = (model.graph, *(f.graph for f in model.functions.values()))
    for graph in graphs:
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield f"initializer {value.name!r}", value.const_value
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield f"node {node.name or node.op_type!r} attribute {attr.name!r}", attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for i, t in enumerate(attr.value or ()):
                        yield f"node {node.name or node.op_type!r} attribute {attr.name!r}[{i}]", t


def _stored_count(proto: onnx.TensorProto) -> int:
    """Values a TensorProto's typed fields hold (a complex number counts two, a packed int32 holds one entry)."""
    return (len(proto.float_data) + len(proto.int32_data) + len(proto.string_data) + len(proto.int64_data)
            + len(proto.double_data) + len(proto.uint64_data))


def _tensor_problem(where: str, tensor: ir.TensorProtocol) -> str | None:
    """Why ``tensor``'s dims or stored size cannot be right, or ``None``; sizes only, the data is never read."""
    dims = [int(d) for d in tensor.shape.dims] if tensor.shape is not None else []
    for axis, d in enumerate(dims):
        if d < 0:
            return f"{where} has a negative dim ({d}) on axis {axis}"
    dtype, numel = tensor.dtype, math.prod(dims)
    shape = f"shape {dims} of {dtype.name.lower()}"
    if isinstance(tensor, ir.ExternalTensor):
        need = math.ceil(numel * dtype.itemsize)
        if tensor.length is not None and tensor.length != need:
            return f"{where} has {tensor.length} bytes of external data, but its {shape} needs {need}"
        return None
    proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else None
    if proto is None:
        return None  # built in memory from an array: its size is its shape
    if proto.HasField("raw_data"):
        need = math.ceil(numel * dtype.itemsize)
        if len(proto.raw_data) != need:
            return f"{where} holds {len(proto.raw_data)} bytes of data, but its {shape} needs {need}"
        return None
    per_entry = {4: 2, 2: 4}.get(dtype.bitwidth, 1) if dtype != ir.DataType.STRING else 1
    need = math.ceil(numel / per_entry) * (2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1)
    have = _stored_count(proto)
    if have != need:
        held = f"holds {have} values" if have else "holds no data"
        return f"{where} {held}, but its {shape} needs {need}"
    return None


def problems(model: ir.Model) -> list[str]:
    """Why ``model`` cannot be optimized, one line each (empty when nothing is wrong)."""
    out: list[str] = []
    if model.ir_version > onnx.IR_VERSION:
        out.append(f"IR version {model.ir_version} is newer than this onnx supports ({onnx.IR_VERSION})")
    opset = model.graph.opset_imports.get("", model.opset_imports.get(""))
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        out.append(f"default-domain opset {opset} is newer than this onnx supports ({onnx.defs.onnx_opset_version()})")
    graph = model.graph
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for v in values:
            if v.name in graph.initializers:
                continue
            if v.type is not None and not isinstance(v.type, ir.TensorType):
                out.append(f"{kind} {v.name!r} is a {type(v.type).__name__}, not a tensor; graphprune handles tensors")
            elif v.dtype is not None and v.dtype not in _NUMERIC:
                out.append(f"{kind} {v.name!r} is a {v.dtype.name.lower()} tensor; graphprune handles numeric tensors")
            if (p := _shape_problem(kind, v)) is not None:
                out.append(p)
    functions = {(f.domain, f.name) for f in model.functions.values()}
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    producer_of: dict[int, ir.Node] = {}
    for node in graph:
        for out_v in node.outputs:
            producer_of[id(out_v)] = node
    seen_nodes: set[int] = set()
    for node in graph:
        where = f"node {node.name or node.op_type!r} ({node.domain + '::' if node.domain else ''}{node.op_type})"
        for v in node.inputs:
            if v is None or id(v) in defined:
                continue
            prod = producer_of.get(id(v))
            if prod is None:
                if v.name in graph.initializers or v.const_value is not None:
                    continue
                out.append(f"{where} reads {v.name!r}, which no input, initializer or node produces")
            elif id(prod) not in seen_nodes:
                out.append(f"{where} reads {v.name!r}, produced later by {prod.name or prod.op_type!r}: the graph has "
                           "a cycle or is not topologically sorted")
        seen_nodes.add(id(node))
        defined.update(id(o) for o in node.outputs)
        if (node.domain, node.op_type) in functions:
            continue
        if node.domain in ("", "ai.onnx"):
            version = opset if opset is not None else onnx.defs.onnx_opset_version()
            if not onnx.defs.has(node.op_type) or not _known_at(node.op_type, version):
                out.append(f"{where}: no standard op {node.op_type!r} at opset {version}")
        elif node.domain not in RUNTIME_DOMAINS:
            out.append(f"{where}: domain {node.domain!r} is not one ONNX Runtime provides and the model has no "
                       "function body for the op")
        if len(out) > 20:
            break
    for node in graph:
        for v in node.outputs:
            if (p := _shape_problem("value", v)) is not None:
                out.append(p)
                break
    for where, tensor in _stored_tensors(model):
        if (p := _tensor_problem(where, tensor)) is not None:
            out.append(p)
            if len(out) > 20:
                break
    return out


def _known_at(op_type: str, version: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, min(version, onnx.defs.onnx_opset_version()), "")
    except onnx.defs.SchemaError:
        return False
    return True
