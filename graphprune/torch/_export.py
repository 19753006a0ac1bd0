"""``export`` / ``export_program``: a module to ONNX with ``torch.onnx.export(dynamo=True)``, the ``ai.graphprune``
op translations and bodies attached. The FX passes, ``apply_plan`` and ``optimize`` import it from here, so no module
of ``graphprune.torch`` imports the package ``__init__`` (which re-exports these names)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from graphprune.errors import GraphpruneError
from graphprune.ops import DOMAIN, add_node_function
from graphprune.torch._ops import TRANSLATIONS  # registers torch.ops.graphprune.*
from graphprune.torch._registry import reused_registry

BATCH_RANGE = (1, 1024)
"""``(min, max)`` declared to ``torch.export`` for a dynamic axis 0 (the batch)."""
AXIS_RANGE = (2, 4096)
"""``(min, max)`` declared for any other dynamic axis (e.g. the sequence). The minimum is 2 because torch.export
specialises sizes 0 and 1; the maximum is a declaration only: ONNX records no range, and a model may still fail
above its own limit (BERT's 512 learned positions, for instance), which torch.export does not always detect."""

# torch.onnx warns once per input when several inputs share one symbolic dim that carries the same custom name;
# with one name applied to every input that is the expected case. A conflict between *different* names still warns.
_SAME_NAME_WARNING = r"# The axis name: (\S+) will not be used, since it shares the same shape constraints with another axis: \1\."


def _dynamic_shapes(args: tuple, axes: Mapping[int, str]) -> tuple[dict, ...]:
    """``torch.export`` dynamic shapes: one ``Dim`` per *name*, shared by every input, on the axes of ``axes``."""
    dims: dict[str, torch.export.Dim] = {}
    for name in dict.fromkeys(axes.values()):
        if not isinstance(name, str) or not name.isidentifier():
            raise GraphpruneError(f"dynamic_axes: dim name {name!r} must be a Python identifier")
        lo, hi = BATCH_RANGE if any(a == 0 for a, n in axes.items() if n == name) else AXIS_RANGE
        dims[name] = torch.export.Dim(name, min=lo, max=hi)
    shapes = []
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise GraphpruneError(f"dynamic_axes: input {i} is a {type(arg).__name__}, not a tensor")
        spec = {}
        for axis, name in axes.items():
            if not isinstance(axis, int) or not -arg.dim() <= axis < arg.dim():
                raise GraphpruneError(f"dynamic_axes: axis {axis!r} does not exist on input {i} "
                                      f"(shape {tuple(arg.shape)})")
            spec[axis % arg.dim()] = dims[name]
        shapes.append(spec)
    return tuple(shapes)


def export(
    module: torch.nn.Module,
    args: tuple,
    path: str | Path,
    opset: int = 18,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    *,
    dynamic_axes: Mapping[int, str] | None = None,
    output_names: list[str] | None = None,
) -> Path:
    """Export ``module`` (put in eval mode) with example inputs ``args`` to ``path`` (+ ``<path>.data``).

    Args:
        module: the module; ``module.eval()`` is called, and export runs under ``torch.no_grad()``.
        args: positional example inputs, all tensors when any axis is dynamic.
        path: the ``.onnx`` file to write (parent folders are created).
        opset: opset 18 writes attention as MatMul/Softmax chains; opset ≥ 23 writes
            ``scaled_dot_product_attention`` as the standard ``Attention`` op. ``graphprune.analysis`` reads both.
        dynamic_batch: when ``dynamic_axes`` is None, make axis 0 of every input dynamic (named ``batch``);
            False with ``dynamic_axes=None`` exports static shapes.
        input_names: ONNX names of the inputs, in order (default: the ``forward`` argument names).
        dynamic_axes: axis index → dim name, applied to *every* input, e.g. ``{0: "batch", 1: "sequence"}``; when
            given it replaces ``dynamic_batch``. Each name becomes one ``torch.export.Dim`` shared by all inputs
            (so the exported graph may assume equal sizes there) and the ONNX dim is given that name. Axis 0 is
            declared in ``BATCH_RANGE``, others in ``AXIS_RANGE``. Negative axes count from the end.
        output_names: ONNX names of the outputs, in order (default: the exporter's names).

    Returns:
        ``Path(path)``.

    Raises:
        GraphpruneError: a ``dynamic_axes`` entry that is not a valid axis of some input, a dim name that is not
            an identifier, or a non-tensor input with dynamic axes. torch.export's own errors (for instance a
            dynamic axis that the model specialises to a constant) propagate unchanged.

    The example inputs should be at least 2 long on every dynamic axis except the batch: torch.export specialises a
    size of 1 there. Sizes outside the declared ranges are not rejected by the ONNX model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(module, args, opset, dynamic_batch, input_names, dynamic_axes=dynamic_axes,
                             output_names=output_names)
    program.save(str(path), external_data=True)
    return path


def export_program(
    module: torch.nn.Module,
    args: tuple,
    opset: int = 18,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    *,
    dynamic_axes: Mapping[int, str] | None = None,
    output_names: list[str] | None = None,
):
    """``export`` without writing: the ``torch.onnx.ONNXProgram`` (``.model``: the ONNX IR with the ai.graphprune
    bodies attached; ``.exported_program``: the torch.export program it was translated from, whose node names are
    the ONNX value names). Same arguments as :func:`export`."""
    if dynamic_axes is None and dynamic_batch:
        dynamic_axes = {0: "batch"}
    shapes = _dynamic_shapes(tuple(args), dynamic_axes) if dynamic_axes else None
    return _to_onnx(module, args, opset, shapes, input_names, output_names)


def _to_onnx(module: torch.nn.Module, args: tuple, opset: int, shapes, input_names, output_names):
    """torch.onnx.export (dynamo) with ``torch.export`` ``shapes``, graphprune's ops translated and given bodies."""
    module.eval()
    with torch.no_grad(), warnings.catch_warnings(), reused_registry():
        warnings.filterwarnings("ignore", message=_SAME_NAME_WARNING, category=UserWarning)
        program = torch.onnx.export(module, args, None, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                    input_names=input_names, output_names=output_names, verbose=False,
                                    custom_translation_table=dict(TRANSLATIONS))
    _attach_bodies(program.model)
    return program


def _attach_bodies(model) -> None:
    """Give every exported ``ai.graphprune`` node (from ``torch.ops.graphprune.*``) its function body."""
    nodes = [n for n in model.graph.all_nodes() if n.domain == DOMAIN]
    for node in nodes:
        add_node_function(model, node)
