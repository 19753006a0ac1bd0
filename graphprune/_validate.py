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
  * inputs and outputs are numeric or bool tensors (no strings, sequences or maps).
"""

from __future__ import annotations

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
    return out


def _known_at(op_type: str, version: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, min(version, onnx.defs.onnx_opset_version()), "")
    except onnx.defs.SchemaError:
        return False
    return True
