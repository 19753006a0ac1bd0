"""torch.fx rewrites of an exported module: shape constants after channel pruning, for modules whose ``forward``
hard-codes a shape.

The module is traced the way :func:`graphprune.torch.export` traces it (``torch.onnx.export(dynamo=True)``), and
the ``torch.export`` program behind the ONNX graph becomes a ``GraphModule`` (``ExportedProgram.module()``). Its
node names are the ONNX value names, so the plan's ``value_shapes`` (value, axis, new size) address FX nodes
directly. Rewritten, for the listed (node, axis):
  1. ``view`` / ``reshape`` / ``_unsafe_view`` / ``expand`` targets and ``new_*`` / ``zeros`` / ``ones`` /
     ``full`` / ``empty`` sizes: the static entry at that axis (``-1`` stays);
  2. ``split`` / ``split_with_sizes``: the sizes, from the new sizes of the ``getitem`` users on the split axis.
Then the plan's parameter slices (``_apply.resolve``) are applied to the GraphModule's tensors (same FQNs), and
``layer_norm``'s ``normalized_shape`` follows its sliced weight (a pruned embedding width).
Preserved: dynamic axes of the export (batch by default), parameter names, ``requires_grad``.
Values the plan lists that are not FX nodes (``val_*``: made inside one op's ONNX translation) carry no torch
shape argument and are ignored. The rewritten graph is run once on the example inputs; a failure there is a
:class:`GraphpruneError`.
Limitations: the graph is the export's (eval mode: dropout is gone, BatchNorm uses its running statistics and
does not update them).
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import nn

from graphprune.errors import GraphpruneError
from graphprune.torch._export import export_program
from graphprune.torch._tensors import flat_tensors, slice_module

aten = torch.ops.aten
_SHAPE_ARG1 = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
               aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default}
_SHAPE_ARG0 = {aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default}
FX_META = "graphprune_fx"
"""``GraphModule.meta`` key: the example input specs and dynamic axes that rebuild an FX-rewritten module."""
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default}


def trace(module: nn.Module, example_inputs: tuple, dynamic_axes: dict[int, str] | None = None) -> torch.fx.GraphModule:
    """The GraphModule behind ``graphprune.torch.export(module, example_inputs)`` (module deep-copied), as a plain
    ``torch.fx.GraphModule``: ``ExportedProgram.module()`` refuses ``train()`` / ``eval()``, which an optimizer
    loop calls; the graph itself is the eval-mode export either way."""
    m = copy.deepcopy(module)
    program = export_program(m, example_inputs, dynamic_axes=dynamic_axes)
    gm = program.exported_program.module()
    return torch.fx.GraphModule(gm, gm.graph)


def _new_shape(shape, axes: dict[int, int]) -> list | None:
    shape = list(shape)
    changed = False
    for axis, dim in axes.items():
        if axis < len(shape) and isinstance(shape[axis], int) and shape[axis] not in (-1, dim):
            shape[axis] = dim
            changed = True
    return shape if changed else None


def retarget_shapes(gm: torch.fx.GraphModule, value_shapes: list[dict]) -> int:
    """Rewrite the static shape arguments the plan's ``value_shapes`` change (see module docstring); returns how
    many nodes changed."""
    want: dict[str, dict[int, int]] = {}
    for e in value_shapes:
        want.setdefault(e["value"], {})[int(e["axis"])] = int(e["dim"])
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SHAPE_ARG1 and node.name in want and len(node.args) > 1:
            new = _new_shape(node.args[1], want[node.name])
            if new is not None:
                node.args = (node.args[0], new, *node.args[2:])
                changed += 1
        elif node.target in _SHAPE_ARG0 and node.name in want:
            new = _new_shape(node.args[0], want[node.name])
            if new is not None:
                node.args = (new, *node.args[1:])
                changed += 1
        elif node.target in _SPLITS:
            changed += _retarget_split(node, want)
    gm.graph.lint()
    gm.recompile()
    return changed


def _retarget_norms(gm: torch.fx.GraphModule) -> None:
    """``layer_norm``'s ``normalized_shape`` literal follows its (sliced) weight: a pruned embedding width."""
    changed = False
    params = dict(gm.named_parameters())
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _NORMS or len(node.args) < 3:
            continue
        w = node.args[2]
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target in params):
            continue
        shape = list(params[w.target].shape)
        if list(node.args[1]) != shape:
            node.args = (node.args[0], shape, *node.args[2:])
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _retarget_split(node: torch.fx.Node, want: dict[str, dict[int, int]]) -> int:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    src = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if src is not None and dim < 0:
        dim += src.dim()
    parts = {}
    for user in node.users:
        if user.target is operator.getitem and user.name in want and dim in want[user.name]:
            parts[user.args[1]] = want[user.name][dim]
    if not parts:
        return 0
    if node.target is aten.split.Tensor:
        sizes = set(parts.values())
        if len(sizes) != 1:
            raise GraphpruneError(f"apply_plan (fx): split {node.name!r} would need unequal sizes {sorted(parts.items())}")
        node.args = (node.args[0], sizes.pop(), *node.args[2:])
    else:
        sizes = list(node.args[1])
        for i, s in parts.items():
            sizes[i] = s
        node.args = (node.args[0], sizes, *node.args[2:])
    return 1


def rewrite_shapes(module: nn.Module, plan: dict, slicing, example_inputs: tuple,
                   dynamic_axes: dict[int, str] | None = None) -> torch.fx.GraphModule:
    """The pruned module as a GraphModule: traced, shapes retargeted, tensors sliced (``apply_plan``'s FX path)."""
    gm = trace(module, example_inputs, dynamic_axes)
    retarget_shapes(gm, plan.get("value_shapes", []))
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    unknown = sorted(f for f in slicing.axes if f not in tensors)
    if unknown:
        raise GraphpruneError(f"apply_plan (fx): parameter {unknown[0]!r} is not in the traced module")
    pruned = slice_module(gm, slicing)
    _retarget_norms(pruned)
    pruned.train(module.training)
    try:
        with torch.no_grad():
            flat_tensors(pruned(*example_inputs))
    except Exception as e:  # noqa: BLE001 - any failure here means a shape the rewrite did not reach
        raise GraphpruneError(f"apply_plan (fx): the rewritten graph does not run: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    pruned.meta[FX_META] = {"inputs": [(list(x.shape), str(x.dtype).removeprefix("torch.")) for x in example_inputs],
                             "dynamic_axes": {str(k): v for k, v in dynamic_axes.items()} if dynamic_axes else None}
    return pruned
