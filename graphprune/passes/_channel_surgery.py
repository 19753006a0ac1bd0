"""Apply a channel prune plan (``_channel_plan``) to a model, in place, with onnx-ir.

Steps
  1. Slices: every (node, input) listed gets the kept indices along each listed axis. An initializer whose
     users all take the same slices is sliced in place and keeps its name (torch parameter names survive). An
     initializer shared by users with different slices (the dynamo exporter deduplicates identical tensors, e.g.
     every LayerNorm weight of ones) is copied per distinct slicing (``<name>.pruned<k>``), so no other user is
     affected; the original stays for users that take it whole and is dropped when none is left.
  2. Shape constants (Reshape/Expand targets, Split sizes, Slice bounds) and Gather indices: the constant is
     copied with the new entries and the node input re-pointed (shape constants are shared between blocks too).
  3. Attributes: conv ``group``, GroupNorm ``num_groups``, ``q_num_heads``/``kv_num_heads``, ``num_heads``.
  4. Value shapes: ONNX shape inference is run again over shapes that keep only the inputs' dim names (``batch``,
     ``sequence``); a value it cannot infer gets its old shape with the channel dims the plan lists.

Preconditions, checked: every named node exists (names are unique), every sliced tensor still has the shape the
plan recorded. A mismatch raises :class:`GraphpruneError` before anything is changed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from graphprune._ir import NameScope, const_value, constant_node, infer_shapes, input_symbols, symbol_hint, unmap
from graphprune.errors import GraphpruneError


def _nodes_by_name(model: ir.Model) -> dict[str, ir.Node]:
    out: dict[str, ir.Node] = {}
    for node in model.graph:
        if node.name in out:
            raise GraphpruneError(f"node name {node.name!r} is not unique; a prune plan cannot address it")
        out[node.name] = node
    return out


def _set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    node.replace_input_with(index, value)


def _check(plan: dict, nodes: dict[str, ir.Node]) -> None:
    if not str(plan.get("format", "")).startswith("graphprune.channel_plan/"):
        raise GraphpruneError("plan_in: not a graphprune channel plan (missing 'format')")
    for key in ("slices", "shape_edits", "gather_edits"):
        for e in plan.get(key, []):
            if e["node"] not in nodes:
                raise GraphpruneError(f"plan_in: node {e['node']!r} is not in this model")
    for e in plan.get("slices", []):
        v = nodes[e["node"]].inputs[e["input"]]
        arr = const_value(v)
        if arr is None or (e.get("shape") is not None and list(arr.shape) != list(e["shape"])):
            raise GraphpruneError(
                f"plan_in: input {e['input']} of node {e['node']!r} ({e.get('initializer')}) does not have the "
                f"shape the plan was made for ({e.get('shape')}); was the plan written for another model?")


def apply_plan(model: ir.Model, plan: dict) -> dict:
    """Apply ``plan`` in place; returns counts of what changed."""
    graph = model.graph
    nodes = _nodes_by_name(model)
    _check(plan, nodes)
    names = NameScope(graph)
    # 1. slices, grouped per (node, input) then per source value
    per_use: dict[tuple[str, int], list[tuple[int, list[int]]]] = defaultdict(list)
    for e in plan.get("slices", []):
        per_use[(e["node"], e["input"])].append((e["axis"], e["keep"]))
    by_value: dict[ir.Value, dict[tuple, list[tuple[ir.Node, int]]]] = defaultdict(lambda: defaultdict(list))
    for (name, idx), specs in per_use.items():
        node = nodes[name]
        spec = tuple(sorted((a, tuple(k)) for a, k in specs))
        by_value[node.inputs[idx]][spec].append((node, idx))
    copies = 0
    for value, specs in by_value.items():
        arr = const_value(value)
        whole_users = [(u, i) for u, i in value.uses() if not any((u, i) in uses for uses in specs.values())]
        in_place = value.is_initializer() and len(specs) == 1 and not whole_users
        source = ir.convenience.get_const_tensor(value)
        for k, (spec, uses) in enumerate(specs.items()):
            new = _lazy_slice(source, arr.shape, spec, value.name if in_place else names.fresh(f"{value.name}.pruned{k}"))
            if in_place:
                value.const_value = new
                value.shape = ir.Shape(new.shape)
                continue
            nv = ir.Value(name=new.name, shape=ir.Shape(new.shape), type=ir.TensorType(new.dtype), const_value=new)
            graph.register_initializer(nv)
            copies += 1
            for node, idx in uses:
                _set_input(node, idx, nv)
        if not in_place and value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name, None)
    # 2. shape constants and gather indices
    edits: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    bases: dict[tuple[str, int], list[int]] = {}
    for e in plan.get("shape_edits", []):
        if "attr" in e:
            nodes[e["node"]].attributes[e["attr"]] = ir.AttrInt64(e["attr"], int(e["value"]))
        else:
            edits[(e["node"], e["input"])].append((e["pos"], int(e["value"])))
            if "base" in e:
                bases[(e["node"], e["input"])] = e["base"]
    for (name, idx), entries in edits.items():
        node = nodes[name]
        if (name, idx) in bases and (len(node.inputs) <= idx or node.inputs[idx] is None):
            node.resize_inputs(idx + 1)  # Split with num_outputs: explicit sizes replace the attribute
            node.attributes.pop("num_outputs", None)
            arr = np.asarray(bases[(name, idx)], dtype=np.int64)
            old = None
        else:
            old = node.inputs[idx]
            arr = np.array(const_value(old))
        flat = arr.reshape(-1)
        for pos, val in entries:
            flat[pos] = val
        _set_input(node, idx, names.initializer(f"{name}.{idx}.pruned", flat.reshape(arr.shape)))
        if old is not None:
            _drop_if_unused(graph, old)
    for e in plan.get("gather_edits", []):
        node = nodes[e["node"]]
        old = node.inputs[e["input"]]
        arr = np.asarray(e["value"], dtype=np.asarray(const_value(old)).dtype)
        _set_input(node, e["input"], names.initializer(f"{node.name}.{e['input']}.pruned", arr))
        _drop_if_unused(graph, old)
    _set_shapes(model, plan.get("value_shapes", []))
    return {"slices": len(plan.get("slices", [])), "copies": copies, "shape_edits": len(plan.get("shape_edits", [])),
            "gather_edits": len(plan.get("gather_edits", []))}


def _lazy_slice(source, shape: tuple[int, ...], spec: tuple, name: str) -> ir.LazyTensor:
    """The kept slices of ``source`` as a tensor computed when read (``cache=False``): a memory-mapped weight is
    read, sliced and written one tensor at a time when the model is saved, instead of every slice being held."""
    dims = list(shape)
    for axis, keep in spec:
        dims[axis] = len(keep)

    def compute() -> ir.Tensor:
        new = source.numpy()
        for axis, keep in spec:
            new = np.take(new, np.asarray(keep, dtype=np.int64), axis=axis)
        unmap(source)
        return ir.Tensor(np.ascontiguousarray(new), dtype=source.dtype, name=name)

    return ir.LazyTensor(compute, dtype=source.dtype, shape=ir.Shape(dims), name=name)


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.is_initializer() and not value.uses() and not value.is_graph_output():
        graph.initializers.pop(value.name, None)
    prod = constant_node(value)
    if prod is not None and not value.uses():
        graph.remove(prod, safe=True)


def _set_io_shapes(model: ir.Model, entries: list[dict]) -> None:
    """The declared dims the plan changes on graph inputs and outputs (a decoder's KV cache: its head axis)."""
    io = {v.name: v for v in (*model.graph.inputs, *model.graph.outputs) if v.name}
    for e in entries:
        v = io.get(e["value"])
        if v is not None and v.shape is not None and e["axis"] < len(v.shape):
            dims = list(v.shape)
            dims[e["axis"]] = int(e["dim"])
            v.shape = ir.Shape(dims)


def _set_shapes(model: ir.Model, entries: list[dict]) -> None:
    """Re-infer value shapes. Inference runs on shapes cleared but for the inputs' dim names (``_ir.symbol_hint``:
    later passes compare those names, e.g. the queries' and keys' sequence axes); where it infers nothing beyond
    that (e.g. behind Hugging Face mask logic), the value keeps its old shape with the new channel dims the plan
    lists (exact, from the analysis)."""
    outputs = set(model.graph.outputs)
    _set_io_shapes(model, entries)
    values = {o.name: o for node in model.graph for o in node.outputs if o not in outputs}
    saved = {name: (list(v.shape) if v.shape is not None else None) for name, v in values.items()}
    for e in entries:
        dims = saved.get(e["value"])
        if dims is not None and e["axis"] < len(dims):
            dims[e["axis"]] = int(e["dim"])
    symbols = input_symbols(model)
    hints = {name: symbol_hint(v.shape, symbols) for name, v in values.items()}
    for name, v in values.items():
        v.shape = hints[name]
    infer_shapes(model)
    for name, v in values.items():
        if saved[name] is not None and (v.shape is None or v.shape == hints[name]):
            v.shape = ir.Shape(saved[name])
